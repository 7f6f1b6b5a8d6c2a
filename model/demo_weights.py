"""Tiny random MiniGPT-4 weights in the *original* file layouts, for demos and tests.

``minigpt4-bot weights demo`` writes these so the bot starts on a fresh machine with no
downloads.  The files have exactly the structure of the published ones (LAVIS
``eva_vit_g.pth``, BLIP-2 ``{"model": …}``, stage-2 wrappers with optimizer state, an HF
LLaMA directory with a SentencePiece ``tokenizer.model``), so they exercise the same loader
as real weights — but the numbers are random: **the model answers with nonsense text.**
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.variants import QFormerDims, VisionDims, get_variant

__all__ = ["DEMO_MARKER", "DemoSizes", "DemoWeights", "is_demo_weights", "write_demo_weights"]

DEMO_NOTICE = "demo weights: tiny and random — answers are nonsense text; configure real weights in bot.toml"


@dataclass(frozen=True)
class DemoSizes:
    """Small sizes that keep every structural feature of the real models."""

    vision: VisionDims = field(
        default_factory=lambda: VisionDims(img_size=224, patch_size=14, width=48, depth=2, heads=4, mlp_hidden=209)
    )
    qformer: QFormerDims = field(
        default_factory=lambda: QFormerDims(
            hidden=32, layers=3, heads=4, intermediate=80, cross_attention_freq=2, num_query_token=8, encoder_width=48
        )
    )
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 2  # head_dim 32: the smallest vLLM's CPU attention kernel takes (16 is refused)
    llm_intermediate: int = 172
    vocab_size: int = 512
    lora_rank: int = 8
    extra_vit_blocks: int = 1  # the real file has the 40th block MiniGPT-4 drops


@dataclass
class DemoWeights:
    """Paths of one written set, plus the ``[model]`` settings that load it."""

    variant: str
    llm: Path
    vit: Path
    qformer: Path | None
    projection: Path
    vision: dict[str, Any] = field(default_factory=dict)
    qformer_dims: dict[str, Any] = field(default_factory=dict)

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`model.load_minigpt4`."""
        return dict(
            variant=self.variant,
            llm=str(self.llm),
            vit=str(self.vit),
            qformer=str(self.qformer) if self.qformer else None,
            projection=str(self.projection),
            vision=self.vision,
            qformer_dims=self.qformer_dims or None,
        )


_CORPUS = """Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it
to you. Please answer my questions.###Human: <Img><ImageHere></Img> What can I cook with this?###Assistant:
<s>[INST] <Img><ImageHere></Img> Describe this image in detail. [/INST] [vqa] [caption] [grounding] [refer]
The picture shows a red circle and a green square on a white table. There are tomatoes, onions, garlic and
basil, so you could cook a simple pasta sauce: chop the onion, fry it in olive oil, add the garlic and the
tomatoes, simmer for twenty minutes and finish with fresh basil. Write a short story about this picture.
Write a poem inspired by this image. Solve the problem shown in the picture step by step. Create a website
based on this hand-drawn sketch, answer with HTML in a code block. A dog is running across a grassy field
while children play with a ball in the background. The sky is blue with a few clouds, and the sun is bright.
"""


def _train_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a SentencePiece BPE model with LLaMA's settings (byte fallback, split digits, <unk>/<s>/</s> = 0/1/2)."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_CORPUS * 4, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(out / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


# Residual dimension 0 carries a constant, so the LLM can push pieces far down (see _steer_away).
ANCHOR = 0.25  # its value: a few times the other embedding columns' spread, so the norm stays dominated by them
BYTE_PUSH = 40.0  # the avoided pieces' head weight on it: logit ≈ -BYTE_PUSH · (normalised anchor)
EOS_PUSH = 0.15  # the end-of-text token's: demo answers of ~120 tokens (median; 0 gave many of 1-3 tokens)
EOS_ID = 2


def _avoided_pieces(tokenizer_model: Path) -> list[int]:
    """The pieces a demo answer should not contain: byte fallback (``<0x00>``…) and pieces with ``#``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    return [i for i in range(sp.get_piece_size()) if sp.is_byte(i) or "#" in sp.id_to_piece(i)]


def _steer_away(llm: Any, avoided: list[int]) -> None:
    """Make the random LLM (almost) never emit the ``avoided`` pieces (:func:`_avoided_pieces`).

    Half the demo vocabulary is byte fallback: random logits picked bytes that decode to no character, and the
    demo's answers were strings of U+FFFD.  And a random ``###`` (Vicuna v0's stop string) ended answers after
    a few dozen tokens.  Residual dimension 0 is held at :data:`ANCHOR` at every position (the text embeddings
    and the picture projection write it; no layer's output does), so after the final norm it is a positive
    constant; the head gives each avoided piece ``-BYTE_PUSH`` on it, the end-of-text token a little
    (``-EOS_PUSH``, so that answers are not cut to a few tokens) and every other piece 0.  Demo answers then end
    at the end-of-text token or the length limit.
    """
    with torch.no_grad():
        llm.model.embed_tokens.weight[:, 0] = ANCHOR
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = llm.lm_head.weight
        head[:, 0] = 0.0
        head[avoided, 0] = -BYTE_PUSH
        head[EOS_ID, 0] = -EOS_PUSH


def _write_llm(out: Path, sizes: DemoSizes, gen: torch.Generator) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _train_tokenizer(out, sizes.vocab_size)
    config = LlamaConfig(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.llm_hidden,
        intermediate_size=sizes.llm_intermediate,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    llm = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + _rand(gen, *param.shape, scale=0.1))
            else:
                param.copy_(_rand(gen, *param.shape, scale=0.08))
    _steer_away(llm, _avoided_pieces(out / "tokenizer.model"))
    # transformers' @wraps(nn.Module.to) hides `self` from mypy (typeshed's _Wrapped is no descriptor)
    llm.to(torch.float16).save_pretrained(out)  # type: ignore[arg-type]


def _write_vit(path: Path, v: VisionDims, sizes: DemoSizes, gen: torch.Generator) -> None:
    w = v.width
    sd: dict[str, torch.Tensor] = {
        "cls_token": _rand(gen, 1, 1, w),
        "pos_embed": _rand(gen, 1, 1 + v.num_patches, w),
        "patch_embed.proj.weight": _rand(gen, w, 3, v.patch_size, v.patch_size),
        "patch_embed.proj.bias": _rand(gen, w),
    }
    for i in range(v.depth + sizes.extra_vit_blocks):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + _rand(gen, w, scale=0.1),
            p + "norm1.bias": _rand(gen, w),
            p + "attn.q_bias": _rand(gen, w),
            p + "attn.v_bias": _rand(gen, w),
            p + "attn.qkv.weight": _rand(gen, 3 * w, w, scale=0.1),
            p + "attn.proj.weight": _rand(gen, w, w, scale=0.1),
            p + "attn.proj.bias": _rand(gen, w),
            p + "norm2.weight": 1 + _rand(gen, w, scale=0.1),
            p + "norm2.bias": _rand(gen, w),
            p + "mlp.fc1.weight": _rand(gen, v.mlp_hidden, w, scale=0.1),
            p + "mlp.fc1.bias": _rand(gen, v.mlp_hidden),
            p + "mlp.fc2.weight": _rand(gen, w, v.mlp_hidden, scale=0.1),
            p + "mlp.fc2.bias": _rand(gen, w),
        }
    torch.save({k: t.half() for k, t in sd.items()}, path)  # LAVIS ships the ViT in fp16


def _write_blip2(path: Path, q: QFormerDims, v: VisionDims, gen: torch.Generator) -> None:
    h, inter = q.hidden, q.intermediate
    sd: dict[str, torch.Tensor] = {
        "query_tokens": _rand(gen, 1, q.num_query_token, h, scale=0.5),
        "ln_vision.weight": 1 + _rand(gen, v.width, scale=0.1),
        "ln_vision.bias": _rand(gen, v.width),
        "Qformer.bert.embeddings.LayerNorm.weight": 1 + _rand(gen, h, scale=0.1),
        "Qformer.bert.embeddings.LayerNorm.bias": _rand(gen, h),
        "Qformer.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0),
        "t5_proj.weight": _rand(gen, 24, h),
        "t5_proj.bias": _rand(gen, 24),
    }

    def block(prefix: str, kv_in: int) -> None:
        for name, (o, i) in {"query": (h, h), "key": (h, kv_in), "value": (h, kv_in)}.items():
            sd[f"{prefix}.self.{name}.weight"] = _rand(gen, o, i, scale=0.1)
            sd[f"{prefix}.self.{name}.bias"] = _rand(gen, o)
        sd[f"{prefix}.output.dense.weight"] = _rand(gen, h, h, scale=0.1)
        sd[f"{prefix}.output.dense.bias"] = _rand(gen, h)
        sd[f"{prefix}.output.LayerNorm.weight"] = 1 + _rand(gen, h, scale=0.1)
        sd[f"{prefix}.output.LayerNorm.bias"] = _rand(gen, h)

    for j in range(q.layers):
        p = f"Qformer.bert.encoder.layer.{j}"
        block(f"{p}.attention", h)
        if j % q.cross_attention_freq == 0:
            block(f"{p}.crossattention", q.encoder_width)
        sd |= {
            f"{p}.intermediate_query.dense.weight": _rand(gen, inter, h, scale=0.1),
            f"{p}.intermediate_query.dense.bias": _rand(gen, inter),
            f"{p}.output_query.dense.weight": _rand(gen, h, inter, scale=0.1),
            f"{p}.output_query.dense.bias": _rand(gen, h),
            f"{p}.output_query.LayerNorm.weight": 1 + _rand(gen, h, scale=0.1),
            f"{p}.output_query.LayerNorm.bias": _rand(gen, h),
        }
    torch.save({"model": sd}, path)


def _write_projection(path: Path, in_features: int, sizes: DemoSizes, gen: torch.Generator, lora: bool) -> None:
    model: dict[str, torch.Tensor] = {
        "llama_proj.weight": _rand(gen, sizes.llm_hidden, in_features, scale=0.2),
        "llama_proj.bias": _rand(gen, sizes.llm_hidden),
    }
    model["llama_proj.weight"][0] = 0.0  # residual dimension 0 is the LLM's anchor (_steer_away)
    model["llama_proj.bias"][0] = ANCHOR
    if lora:
        r, h = sizes.lora_rank, sizes.llm_hidden
        for i in range(sizes.llm_layers):
            for proj in ("q_proj", "v_proj"):
                p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
                model[f"{p}.lora_A.weight"] = _rand(gen, r, h, scale=0.1)
                model[f"{p}.lora_B.weight"] = _rand(gen, h, r, scale=0.1)  # non-zero: trained
    optimizer = {"state": {0: {"step": torch.tensor(200.0), "exp_avg": torch.zeros(1)}}, "param_groups": []}
    torch.save({"model": model, "optimizer": optimizer, "config": {}, "scaler": None, "epoch": 4}, path)


_PROJECTION_FILES = {
    "vicuna0": "pretrained_minigpt4.pth",
    "llama2": "pretrained_minigpt4_llama2.pth",
    "minigptv2": "minigptv2_checkpoint.pth",
}


DEMO_MARKER = "DEMO_WEIGHTS"  # written beside every demo file: weights set up by `weights demo` stay known as demo


def is_demo_weights(path: str | Path) -> bool:
    """Whether ``path`` (a configured weight file or the LLM folder) was written by :func:`write_demo_weights`:
    bot.toml may point at them like real weights, and they must still be reported as demo weights."""
    if not path:
        return False
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    return (folder / DEMO_MARKER).is_file()


def write_demo_weights(
    out_dir: str | Path, variant: str = "vicuna0", seed: int = 0, sizes: DemoSizes | None = None
) -> DemoWeights:
    """Write one variant's files under ``out_dir`` (the LLM directory is shared between variants)."""
    sizes = sizes or DemoSizes()
    spec = get_variant(variant)
    vision = sizes.vision
    if variant == "minigptv2":
        # The published eva_vit_g.pth is a 224-px file; v2 interpolates it to 448 at load time.
        vision = VisionDims(**{**asdict(vision), "img_size": vision.img_size * 2})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    llm_dir = out / "llm"
    if not (llm_dir / "config.json").is_file():
        _write_llm(llm_dir, sizes, gen)
    vit = out / "eva_vit_g.pth"
    if not vit.is_file():
        _write_vit(vit, sizes.vision, sizes, gen)
    qformer = None
    if spec.has_qformer:
        qformer = out / "blip2_pretrained_flant5xxl.pth"
        if not qformer.is_file():
            _write_blip2(qformer, sizes.qformer, sizes.vision, gen)
        in_features = sizes.qformer.hidden
    else:
        in_features = 4 * vision.width
    projection = out / _PROJECTION_FILES[variant]
    if not projection.is_file():
        gen_proj = torch.Generator().manual_seed(seed + 1)
        _write_projection(projection, in_features, sizes, gen_proj, lora=spec.lora is not None)
    vision_table = asdict(vision)
    vision_table.pop("ln_vision_eps")  # not a [model.vision] key: ln_vision is fixed at 1e-5
    qformer_table = asdict(sizes.qformer) if spec.has_qformer else {}
    (out / "README.txt").write_text(DEMO_NOTICE + "\n")
    for folder in (out, llm_dir):
        (folder / DEMO_MARKER).write_text(DEMO_NOTICE + "\n")
    return DemoWeights(variant, llm_dir, vit, qformer, projection, vision_table, qformer_table)
