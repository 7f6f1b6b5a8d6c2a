"""A Hugging Face hub and a plain file server on loopback (aiohttp), for ``weights download`` tests.

The hub serves what huggingface_hub 2.4 asks of it (``shared/reference/openai-grounding-weights.md`` §4):
``GET /api/models/{repo}/revision/{rev}`` (model_info: ``sha``, ``siblings``), ``GET
/api/models/{repo}/tree/{rev}`` (the file list snapshot_download filters), ``HEAD``/``GET
/{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` (LFS files also
``X-Linked-Etag`` / ``X-Linked-Size``), ranges (206) for resumes, no ``X-Xet-*`` headers.  A gated
repo answers 401/403 with ``X-Error-Code: GatedRepo`` unless the request carries the granted token.

Both servers can cut a file's first GET halfway (``cut_once``), and record every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorized: bool


def _lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".model", ".pth"))


@dataclass
class Servers:
    """The hub (``hub_url``) and the file server (``files_url``), run on a background event loop."""

    repos: dict[str, Repo] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    announced: dict[str, int] = field(default_factory=dict)  # a HEAD length other than the bytes served
    cut_once: set[str] = field(default_factory=set)
    token: str = "hf_granted_token"
    seen: list[Seen] = field(default_factory=list)
    hub_url: str = ""
    files_url: str = ""

    # ------------------------------------------------------------------ hub

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def _repo(self, request: web.Request) -> Repo:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        if repo.gated and not self._authorized(request):
            status = web.HTTPForbidden if "Authorization" in request.headers else web.HTTPUnauthorized
            raise status(
                headers={"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo_id} is restricted."},
                text=f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
            )
        return repo

    async def model_info(self, request: web.Request) -> web.Response:
        self._record(request)
        repo = self._repo(request)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        siblings = [{"rfilename": name} for name in repo.files]
        return web.json_response({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        self._record(request)
        repo = self._repo(request)
        entries = []
        for name, data in repo.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if _lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo = self._repo(request)
        name = request.match_info["file"]
        if name not in repo.files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if _lfs(name):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        return await self._send(request, f"hub:{name}", data, headers)

    # ------------------------------------------------------------------ plain files (the LAVIS bucket)

    async def file(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        name = request.match_info["file"]
        if name not in self.files:
            raise web.HTTPNotFound()
        data = self.files[name]
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD" and name in self.announced:
            headers["Content-Length"] = str(self.announced[name])
            return web.Response(headers=headers)
        return await self._send(request, f"file:{name}", data, headers)

    # ------------------------------------------------------------------ shared

    async def _send(self, request: web.Request, key: str, data: bytes, headers: dict) -> web.StreamResponse:
        start = 0
        wanted = request.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start = int(wanted[6:].split("-", 1)[0])
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if key in self.cut_once:
            self.cut_once.discard(key)
            await response.write(body[: len(body) // 2])
            await response.drain()
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-file
            return response
        await response.write(body)
        await response.write_eof()
        return response

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.method, request.path, request.headers.get("Range"), self._authorized(request)))

    def ranges(self, suffix: str) -> list[str]:
        return [s.range for s in self.seen if s.method == "GET" and s.path.endswith(suffix) and s.range]

    # ------------------------------------------------------------------ running

    def app(self) -> web.Application:
        app = web.Application()
        repo = "/{org}/{name}"
        app.router.add_get(f"/api/models{repo}/revision/{{rev}}", self.model_info)
        app.router.add_get(f"/api/models{repo}/tree/{{rev}}", self.tree)
        app.router.add_route("*", f"{repo}/resolve/{{rev}}/{{file:.+}}", self.resolve)
        app.router.add_route("*", "/files/{file}", self.file)
        return app

    def __enter__(self) -> Servers:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            self._runner = web.AppRunner(self.app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.hub_url = f"http://127.0.0.1:{port}"
            self.files_url = f"http://127.0.0.1:{port}/files"
            ready.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop)
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def folder_files(folder: Path) -> dict[str, bytes]:
    """A folder's files by name (an LLM folder as a hub repo holds it)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "DEMO_WEIGHTS"}
