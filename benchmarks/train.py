"""Stage-2 training throughput: ``model.training``'s step vs a step built the way the reference builds it.

Both run one optimizer step per batch (frozen ViT + Q-Former, ``llama_proj`` trained with AdamW, loss on the
answer tokens) on the same random weights and batches, and must agree on the loss:

* **reference-style**: per-sample prompt splicing (``prompt_wrap``: every segment tokenised and embedded
  row by row, ``torch.cat``, pad embeddings), answers tokenised with padding, ``concat_emb_input_output``
  row by row, then ``LlamaForCausalLM(labels=…)`` — logits for every position of the batch;
* **minigpt4-bot**: :class:`model.training.batch.BatchBuilder` (one id view, one embedding lookup, one
  scatter of the visual tokens) and logits only over the answer window.

    python benchmarks/train.py --small                      # CPU, small shapes (about a minute)
    python benchmarks/train.py --shape 7b --device cuda     # GPU, real Vicuna-7B shapes, fp16 + AMP

Prints a markdown table: samples/s, median ms per step, peak GPU memory, the losses (both systems agree).
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

PROMPT = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
_TEXT = (
    "the picture shows a red circle next to a green square on a white table with tomatoes onions garlic and "
    "basil so you could cook a simple pasta sauce while children play with a ball in the background"
)
WORDS = _TEXT.split()


def _answers(batch: int, seed: int) -> list[str]:
    """Detailed descriptions of varying length, like cc_sbu_align's (≈ 40–110 words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 110))).capitalize() + "." for _ in range(batch)]


def _pixels(model, batch: int, seed: int):
    import torch
    from PIL import Image, ImageDraw

    from model.image_processing import load_image

    out = []
    for i in range(batch):
        image = Image.new("RGB", (320, 240), (20 * ((seed + i) % 12), 100, 200))
        ImageDraw.Draw(image).ellipse([40 + i % 50, 40, 200, 200], fill=(200, 30 + i % 200, 40))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(model.preprocess(load_image(buffer.getvalue())))
    return torch.stack(out)


def reference_style_loss(model, pixels, answers, end_sym: str, max_txt_len: int, pad_id: int):
    """The reference's ``MiniGPTBase.forward`` data flow, row by row (written from the recipe)."""
    import torch

    tok, embed = model.tokenizer, model.llm.get_input_embeddings()
    out = model.encode_images_detailed(pixels)
    features = (out.qformer_out if out.qformer_out is not None else out.grouped).clone()
    image_embeds = model.llama_proj(features).to(model.llm_dtype)
    device = image_embeds.device
    rows = []
    for image in image_embeds:  # prompt_wrap
        before, after = PROMPT.split("<ImageHere>")
        ids_before = torch.tensor(tok(before, add_special_tokens=False).input_ids, device=device)
        ids_after = torch.tensor(tok(after, add_special_tokens=False).input_ids, device=device)
        rows.append(torch.cat([embed(ids_before), image, embed(ids_after)]))
    width = max(r.shape[0] for r in rows)
    pad = embed(torch.tensor(pad_id, device=device))
    cond = pad.expand(len(rows), width, -1).clone()
    cond_mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        cond[i, : r.shape[0]] = r
        cond_mask[i, : r.shape[0]] = 1
    texts = [a + end_sym for a in answers]
    encoded = [tok(t, add_special_tokens=False).input_ids[:max_txt_len] for t in texts]
    length = max(len(e) for e in encoded)
    regress = torch.full((len(texts), length), pad_id, dtype=torch.long, device=device)
    regress_mask = torch.zeros_like(regress)
    for i, e in enumerate(encoded):
        regress[i, : len(e)] = torch.tensor(e, device=device)
        regress_mask[i, : len(e)] = 1
    targets_part = regress.masked_fill(regress == pad_id, -100)
    regress_embeds = embed(regress)
    embs, masks, lens = [], [], []
    for i in range(len(rows)):  # concat_emb_input_output
        n = int(cond_mask[i].sum())
        lens.append(n)
        embs.append(torch.cat([cond[i, :n], regress_embeds[i], cond[i, n:]]))
        masks.append(torch.cat([cond_mask[i, :n], regress_mask[i], cond_mask[i, n:]]))
    inputs = torch.stack(embs)
    mask = torch.stack(masks)
    bos = embed(torch.full((len(rows), 1), model.bos_id, dtype=torch.long, device=device))
    inputs = torch.cat([bos, inputs], dim=1)
    mask = torch.cat([cond_mask[:, :1], mask], dim=1)
    targets = torch.full(mask.shape, -100, dtype=torch.long, device=device)
    for i, t in enumerate(targets_part):
        targets[i, lens[i] + 1 : lens[i] + 1 + len(t)] = t
    return model.llm(inputs_embeds=inputs, attention_mask=mask, labels=targets, use_cache=False).loss


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    from _models import random_minigpt4

    from model.training.batch import BatchBuilder
    from model.training.checkpoint import trainable_named_parameters
    from model.training.loss import LossModule as _LossModule
    from model.training.loss import text_tensors as _text_tensors
    from model.training.optim import build_optimizer

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    model = random_minigpt4(args.shape, args.device, dtype)
    model.llama_proj.float().requires_grad_(True)
    named = trainable_named_parameters(model)
    builder = BatchBuilder(
        model.tokenizer, num_visual_tokens=model.spec.num_visual_tokens, end_sym="###", max_txt_len=160
    )
    module = _LossModule(model)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    systems = ("reference-style", "minigpt4-bot")
    initial = [p.detach().clone() for _, p in named]
    rows = []
    for batch_size in args.batch:
        batches = [
            (_pixels(model, batch_size, s).to(args.device), _answers(batch_size, s)) for s in range(args.steps + 1)
        ]
        # Both systems start from the same weights and keep their own weights and AdamW state; their steps
        # alternate (A B A B …) so that a slowdown of the machine hits both alike. Median step time.
        weights = {name: [w.clone() for w in initial] for name in systems}
        optimizers = {name: build_optimizer(named, init_lr=3e-5, weight_decay=0.05) for name in systems}
        times: dict[str, list[float]] = {name: [] for name in systems}
        losses: dict[str, list[float]] = {name: [] for name in systems}
        peaks = dict.fromkeys(systems, 0.0)
        for step, (pixels, answers) in enumerate(batches):
            for system in systems:
                with torch.no_grad():
                    for (_, param), value in zip(named, weights[system], strict=True):
                        param.copy_(value)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                    if system == "minigpt4-bot":
                        loss = module(pixels, _text_tensors(builder.build(answers, PROMPT), model.device))
                    else:
                        loss = reference_style_loss(model, pixels, answers, "###", 160, builder.pad_id)
                scaler.scale(loss).backward()
                scaler.step(optimizers[system])
                scaler.update()
                optimizers[system].zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                    peaks[system] = max(peaks[system], torch.cuda.max_memory_allocated() / 2**20)
                if step:  # the first step warms up
                    times[system].append(time.perf_counter() - started)
                losses[system].append(float(loss.detach()))
                weights[system] = [p.detach().clone() for _, p in named]
        for system in systems:
            step_s = statistics.median(times[system])
            rows.append(dict(batch=batch_size, system=system, samples_s=batch_size / step_s, step_ms=1000 * step_s,
                             peak_mb=peaks[system] if cuda else None, first_loss=losses[system][0],
                             last_loss=losses[system][-1]))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU, small shapes (same as --shape small --device cpu)")
    parser.add_argument("--shape", default="small", choices=["small", "7b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4, 12])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per cell (after one warm-up)")
    args = parser.parse_args()
    if args.small:
        args.shape, args.device = "small", "cpu"
    import torch

    torch.manual_seed(0)
    rows = run(args)
    print(f"# stage-2 training step: shape={args.shape} device={args.device} ({torch.__version__})")
    print()
    print("| batch | system | samples/s | vs reference-style | ms / step (median) | peak GPU MB | loss step 1 → last |")
    print("|---:|---|---:|---:|---:|---:|---|")
    base = {r["batch"]: r["samples_s"] for r in rows if r["system"] == "reference-style"}
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "—"
        print(f"| {r['batch']} | {r['system']} | {r['samples_s']:.2f} | {r['samples_s'] / base[r['batch']]:.2f}x | "
              f"{r['step_ms']:.0f} | {peak} | {r['first_loss']:.5f} → {r['last_loss']:.5f} |")  # fmt: skip
    if not args.device.startswith("cuda"):
        print(f"\nprocess peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
