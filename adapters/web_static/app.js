// MiniGPT-4 local web chat: no framework, no build step, nothing loaded from elsewhere.
// Model output is only ever placed with textContent and text nodes (never innerHTML).
"use strict";

(function () {
  const THREAD_KEY = "minigpt4.thread";

  const $ = (id) => document.getElementById(id);
  const messages = $("messages");
  const form = $("composer");
  const fileInput = $("file-input");
  const attachmentsBox = $("attachments");
  const presetSelect = $("preset");
  const question = $("question");
  const sendButton = $("send");
  const stopButton = $("stop");
  const statusLine = $("status");
  const dropZone = document.body;
  const dropOverlay = $("drop-overlay");

  let threadId = null;
  let pending = []; // File objects waiting to be sent
  let busy = false;
  let controller = null; // AbortController of the answer being streamed

  // ------------------------------------------------------------------ ids

  function newId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function storageGet(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (_e) {
      return null;
    }
  }

  function storageSet(key, value) {
    try {
      window.localStorage.setItem(key, value);
    } catch (_e) {
      /* private mode: the thread lasts for this page only */
    }
  }

  // ------------------------------------------------------------------ rendering

  // **bold** (how the core marks the phrases of an answer with boxes) → <strong>, the rest text nodes:
  // the phrase is placed with textContent too, so markup in it (<b>, <img onerror>) stays text.
  // Inline `code` is matched first and left as written.
  const BOLD = /`[^`\n]*`|\*\*([^*`\s](?:[^*`\n]*[^*`\s])?)\*\*/g;
  function appendInline(container, text, bold) {
    if (!bold) {
      container.textContent = text;
      return;
    }
    let at = 0;
    for (const match of text.matchAll(BOLD)) {
      if (match[1] === undefined) continue;
      if (match.index > at) container.appendChild(document.createTextNode(text.slice(at, match.index)));
      const strong = document.createElement("strong");
      strong.textContent = match[1];
      container.appendChild(strong);
      at = match.index + match[0].length;
    }
    if (at < text.length) container.appendChild(document.createTextNode(text.slice(at)));
  }

  // Text with ``` fences → paragraphs and <pre><code> blocks, all through textContent; with ``bold``
  // (the bot's messages), **phrase** in a paragraph shows bold.
  function renderText(container, text, bold) {
    container.replaceChildren();
    const parts = String(text).split("```");
    parts.forEach((part, index) => {
      if (index % 2 === 1) {
        let code = part;
        const newline = code.indexOf("\n");
        if (newline >= 0 && /^[\w+.#-]*\s*$/.test(code.slice(0, newline))) {
          code = code.slice(newline + 1); // drop the language tag line (```html)
        }
        const pre = document.createElement("pre");
        const codeEl = document.createElement("code");
        codeEl.textContent = code.replace(/\n$/, "");
        pre.appendChild(codeEl);
        container.appendChild(pre);
      } else if (part.trim() !== "") {
        const p = document.createElement("p");
        appendInline(p, part.replace(/^\n+|\n+$/g, ""), bold);
        container.appendChild(p);
      }
    });
  }

  function hideHint() {
    const hint = $("empty-hint");
    if (hint) hint.hidden = true;
  }

  function scrollDown() {
    messages.scrollTop = messages.scrollHeight;
  }

  // A message of the user's: its pictures (thumbnail URLs, or a count when there are none to show), the
  // preset it asked with as a tag (never the preset's prompt), and the words the user wrote.
  function addUserBubble(text, thumbnails, imageCount, preset) {
    hideHint();
    const bubble = document.createElement("article");
    bubble.className = "msg user";
    bubble.setAttribute("aria-label", "You");
    if (thumbnails.length) {
      const strip = document.createElement("div");
      strip.className = "thumbs";
      for (const url of thumbnails) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = "Picture you sent";
        img.className = "thumb";
        strip.appendChild(img);
      }
      bubble.appendChild(strip);
    } else if (imageCount > 0) {
      const tag = document.createElement("p");
      tag.className = "picture-tag";
      tag.textContent = imageCount === 1 ? "[picture]" : `[${imageCount} pictures]`;
      bubble.appendChild(tag);
    }
    if (preset) {
      const tag = document.createElement("p");
      tag.className = "preset-tag";
      tag.textContent = `[${preset}]`;
      bubble.appendChild(tag);
    }
    if (text) {
      const body = document.createElement("div");
      body.className = "body";
      renderText(body, text);
      bubble.appendChild(body);
    }
    messages.appendChild(bubble);
    scrollDown();
    return bubble;
  }

  function addBotBubble() {
    hideHint();
    const bubble = document.createElement("article");
    bubble.className = "msg bot streaming";
    bubble.setAttribute("aria-label", "MiniGPT-4");
    bubble.dataset.state = "streaming";
    bubble.setAttribute("aria-busy", "true");
    const body = document.createElement("div");
    body.className = "body";
    bubble.appendChild(body);
    messages.appendChild(bubble);
    scrollDown();
    return bubble;
  }

  // kind: answer | help | notice | error | duplicate | interrupted
  function finishBubble(bubble, text, kind) {
    const body = bubble.querySelector(".body");
    renderText(body, text, true); // the final text replaces what streamed (raw box tokens included)
    bubble.classList.remove("streaming");
    bubble.classList.add(kind === "answer" ? "answer" : "notice", `kind-${kind}`);
    bubble.dataset.state = "final";
    bubble.dataset.kind = kind;
    bubble.removeAttribute("aria-busy");
    scrollDown();
  }

  // Raster pictures are the only files shown inline; every other file is a download.
  const RASTER = new Set(["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"]);

  // Files that come with an answer (a website preview and its page): pictures inline, the rest to download.
  // They arrive base64-encoded in the final event and become blob: URLs (the CSP allows nothing else).
  // A blob: URL has this page's origin, so anything but a raster picture is typed application/octet-stream:
  // opened in a tab (not just downloaded) the model's .html is then a download, never a page that runs here.
  function showFiles(bubble, files) {
    if (!files.length) return;
    const box = document.createElement("div");
    box.className = "files";
    for (const file of files) {
      const bytes = Uint8Array.from(atob(file.data), (c) => c.charCodeAt(0));
      const raster = RASTER.has(file.mime);
      const url = URL.createObjectURL(new Blob([bytes], { type: raster ? file.mime : "application/octet-stream" }));
      if (raster) {
        const figure = document.createElement("figure");
        const img = document.createElement("img");
        img.className = "preview";
        img.src = url;
        img.alt = file.title || file.filename;
        figure.appendChild(img);
        if (file.title) {
          const caption = document.createElement("figcaption");
          caption.textContent = file.title;
          figure.appendChild(caption);
        }
        box.appendChild(figure);
      }
      const link = document.createElement("a");
      link.className = "download";
      link.href = url;
      link.download = file.filename;
      link.textContent = `Download ${file.filename}`;
      box.appendChild(link);
    }
    bubble.appendChild(box);
    scrollDown();
  }

  function showNotice(text, kind) {
    finishBubble(addBotBubble(), text, kind || "notice");
  }

  function setBusy(value) {
    busy = value;
    sendButton.disabled = value;
    stopButton.hidden = !value;
    statusLine.textContent = value ? "Answering…" : "";
  }

  // ------------------------------------------------------------------ attachments

  function renderAttachments() {
    for (const img of attachmentsBox.querySelectorAll("img")) URL.revokeObjectURL(img.src);
    attachmentsBox.replaceChildren();
    pending.forEach((file, index) => {
      const item = document.createElement("div");
      item.className = "attachment";
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = file.name ? `Attached: ${file.name}` : "Attached picture";
      img.className = "thumb";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${file.name || "picture"}`);
      remove.addEventListener("click", () => {
        pending.splice(index, 1);
        renderAttachments();
      });
      item.append(img, remove);
      attachmentsBox.appendChild(item);
    });
  }

  function addFiles(files) {
    let added = 0;
    for (const file of files) {
      if (!file) continue;
      pending.push(file);
      added += 1;
    }
    if (added) renderAttachments();
  }

  fileInput.addEventListener("change", () => {
    addFiles(Array.from(fileInput.files || []));
    fileInput.value = "";
  });

  let dragDepth = 0;
  dropZone.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    event.preventDefault();
    dragDepth += 1;
    dropOverlay.hidden = false;
  });
  dropZone.addEventListener("dragover", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  dropZone.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) dropOverlay.hidden = true;
  });
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    dropOverlay.hidden = true;
    if (event.dataTransfer) addFiles(Array.from(event.dataTransfer.files || []));
  });

  document.addEventListener("paste", (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.items || []) : [];
    const files = items.filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  // ------------------------------------------------------------------ server-sent events over fetch

  // Calls onEvent(name, data) for each complete event in the response body.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const flush = (block) => {
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon >= 0 ? line.slice(0, colon) : line;
        let value = colon >= 0 ? line.slice(colon + 1) : "";
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        flush(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) flush(buffer);
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error;
    } catch (_e) {
      /* not JSON */
    }
    return `The server answered ${response.status} ${response.statusText}.`;
  }

  async function send(form) {
    const bubble = addBotBubble();
    controller = new AbortController();
    setBusy(true);
    let streamed = "";
    let finished = false;
    try {
      const response = await fetch("/api/messages", { method: "POST", body: form, signal: controller.signal });
      if (!response.ok) {
        finishBubble(bubble, await errorText(response), "error");
        return;
      }
      await readEvents(response, (name, data) => {
        if (name === "delta") {
          streamed += data.text;
          bubble.querySelector(".body").textContent = streamed;
          scrollDown();
        } else if (name === "final") {
          finished = true;
          finishBubble(bubble, data.text, data.kind || "answer");
          showFiles(bubble, data.files || []);
          if (data.kind === "notice") syncAfterNotice(bubble);
        } else if (name === "duplicate") {
          finished = true;
          finishBubble(bubble, "This message was already received.", "duplicate");
        }
      });
      if (!finished) finishBubble(bubble, streamed || "The answer ended unexpectedly.", "error");
    } catch (err) {
      if (err && err.name === "AbortError") {
        finishBubble(bubble, streamed ? `${streamed} [stopped]` : "Stopped.", "interrupted");
      } else {
        finishBubble(bubble, "Could not reach the bot. Check that it is still running and try again.", "error");
        addRetry(bubble, form);
      }
    } finally {
      controller = null;
      setBusy(false);
      question.focus();
    }
  }

  // A retry re-sends the very same form (same event id), so the server never answers it twice.
  function addRetry(bubble, form) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "secondary retry";
    retry.textContent = "Retry";
    retry.addEventListener("click", () => {
      if (busy) return;
      retry.remove();
      send(form);
    });
    bubble.appendChild(retry);
  }

  // ------------------------------------------------------------------ composer

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (busy) return;
    const text = question.value.trim();
    const preset = presetSelect.value;
    if (!text && !pending.length && !preset) {
      statusLine.textContent = "Type a question or attach a picture first.";
      return;
    }
    const data = new FormData();
    data.append("thread", threadId);
    data.append("event_id", newId());
    data.append("text", text);
    data.append("preset", preset);
    for (const file of pending) data.append("image", file, file.name || "pasted.png");
    const thumbs = pending.map((file) => URL.createObjectURL(file));
    addUserBubble(text, thumbs, pending.length, preset);
    presetSelect.value = ""; // a preset picked in the menu is for this one message
    pending = [];
    renderAttachments();
    question.value = "";
    send(data);
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  stopButton.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    startThread(newId());
    messages.querySelectorAll(".msg").forEach((el) => el.remove());
    const hint = $("empty-hint");
    if (hint) hint.hidden = false;
    pending = [];
    renderAttachments();
    question.focus();
  });

  function startThread(id) {
    threadId = id;
    storageSet(THREAD_KEY, id);
    document.body.dataset.thread = id;
  }

  // ------------------------------------------------------------------ start-up

  async function loadPresets() {
    try {
      const response = await fetch("/api/presets");
      if (!response.ok) return;
      const body = await response.json();
      for (const preset of body.presets || []) {
        const option = document.createElement("option");
        option.value = preset.name;
        option.textContent = preset.name;
        option.title = preset.prompt;
        presetSelect.appendChild(option);
      }
    } catch (_e) {
      /* the select keeps "No preset" */
    }
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("/healthz");
      const body = await response.json();
      const model = body.model || {};
      const parts = [model.variant, model.device, model.dtype].filter(Boolean);
      if (model.demo) parts.push("demo weights: answers are nonsense");
      $("model-info").textContent = parts.join(" · ");
    } catch (_e) {
      $("model-info").textContent = "";
    }
  }

  // The stored conversation, as the user saw it: each question with the pictures sent just before it
  // (image-only turns) as thumbnails, its preset as a tag, the answers as stored.
  async function fetchHistory() {
    const response = await fetch(`/api/threads/${encodeURIComponent(threadId)}`);
    if (!response.ok) throw new Error(`history: ${response.status}`);
    return (await response.json()).turns || [];
  }

  async function loadHistory() {
    try {
      let pictures = [];
      for (const turn of await fetchHistory()) {
        if (turn.role === "user") {
          if (turn.status === "retried") continue; // asked again by its retry, which follows
          if (turn.image) pictures.push(turn.image);
          if (turn.text || turn.preset || !turn.image) {
            addUserBubble(turn.text, pictures, pictures.length, turn.preset);
            pictures = [];
          }
        } else {
          const bubble = addBotBubble();
          if (turn.status === "done") finishBubble(bubble, turn.text || "(no answer)", "answer");
          else if (turn.status === "pending" || turn.status === "streaming")
            finishBubble(bubble, turn.text || "(still answering — reload to see the answer)", "interrupted");
          else finishBubble(bubble, turn.text || `(answer ${turn.status})`, "interrupted");
        }
      }
      if (pictures.length) addUserBubble("", pictures, pictures.length, null);
    } catch (_e) {
      showNotice("Could not load this conversation's history.", "error");
    }
  }

  // After a notice (a "reset" among them) the screen follows the store: when the thread no longer holds
  // anything, the old messages go and only this last exchange stays.
  async function syncAfterNotice(bubble) {
    try {
      if ((await fetchHistory()).length) return;
    } catch (_e) {
      return;
    }
    const keep = new Set([bubble, bubble.previousElementSibling]);
    messages.querySelectorAll(".msg").forEach((el) => {
      if (!keep.has(el)) el.remove();
    });
  }

  startThread(storageGet(THREAD_KEY) || newId());
  loadPresets();
  loadModelInfo();
  loadHistory().then(() => {
    document.body.dataset.ready = "1";
  });
})();
