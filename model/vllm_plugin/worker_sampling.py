"""The bot's generation options as vLLM ``SamplingParams``, with the reference's repetition penalty.

Runs inside the vLLM environment (``.venv-vllm``), in the worker and in vLLM's engine-core process
(which loads :class:`GeneratedOnlyRepetitionPenalty` by its qualified name).

Why a logits processor: vLLM's own ``repetition_penalty`` penalises every token of the prompt and of
the answer.  The reference (transformers 4.30 ``generate(inputs_embeds=…)``) penalises only
``{BOS placeholder} ∪ generated`` — the output starts with a BOS that is never fed to the model, and
the prompt is not in ``input_ids`` at all (see :mod:`model.sampling`).  So the bot leaves vLLM's
penalty at 1.0 and passes the penalty and the BOS id in ``SamplingParams.extra_args``; this V1 logits
processor applies transformers' rule (positive logits divided, negative multiplied) to exactly that
set.  vLLM runs non-argmax-invariant custom processors before its penalties and temperature, the
reference's order (penalty → min-length → temperature → top-k → top-p).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

__all__ = ["PENALTY_KEY", "GeneratedOnlyRepetitionPenalty", "sampling_params"]

PENALTY_KEY = "minigpt4_repetition_penalty"
BOS_KEY = "minigpt4_bos_id"
QUALNAME = "model.vllm_plugin.worker_sampling:GeneratedOnlyRepetitionPenalty"


class GeneratedOnlyRepetitionPenalty(AdapterLogitsProcessor):
    """transformers' ``RepetitionPenaltyLogitsProcessor`` over ``[BOS] + generated`` (never the prompt)."""

    def is_argmax_invariant(self) -> bool:
        return False  # a penalty can change the greedy choice

    def new_req_logits_processor(
        self, params: SamplingParams
    ) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        extra = params.extra_args or {}
        penalty = float(extra.get(PENALTY_KEY, 1.0))
        if penalty == 1.0:
            return None
        bos = int(extra.get(BOS_KEY, 1))

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            ids = torch.tensor(sorted({bos, *output_ids}), dtype=torch.long, device=logits.device)
            scores = logits.index_select(-1, ids)
            logits.index_copy_(-1, ids, torch.where(scores < 0, scores * penalty, scores / penalty))
            return logits

        return apply


def sampling_params(options: Mapping[str, Any]) -> SamplingParams:
    """The request's ``options`` (sent by ``bot/cli/vllm_backend.py``) as streaming ``SamplingParams``.

    ``min_length`` counts the 4.30 BOS placeholder, so EOS is forbidden for ``min_length - 1`` tokens.
    Sampling with a seed is reproducible in vLLM but draws another stream than torch's ``multinomial``
    in the local engine (vLLM samples by exponential races per request generator).
    """
    greedy = not options.get("do_sample", True)
    stop = [s for s in options.get("stop", ()) if s]
    return SamplingParams(
        n=1,
        max_tokens=int(options["max_new_tokens"]),
        min_tokens=max(0, int(options.get("min_length", 1)) - 1),
        temperature=0.0 if greedy else float(options.get("temperature", 1.0)),
        top_p=1.0 if greedy else float(options.get("top_p", 1.0)),
        top_k=0 if greedy else int(options.get("top_k", 0)),
        seed=None if greedy or options.get("seed") is None else int(options["seed"]),
        repetition_penalty=1.0,
        stop=stop or None,
        skip_special_tokens=True,
        detokenize=bool(stop),  # stop strings need vLLM's text; the bot decodes the ids itself
        output_kind=RequestOutputKind.DELTA,
        extra_args={PENALTY_KEY: float(options.get("repetition_penalty", 1.0)), BOS_KEY: int(options.get("bos_id", 1))},
    )
