"""How likely a model finds a reply: per-token log-likelihood of responses.

Used as a coherence judge where no exact grader exists (real models in ``early-exit``):
a truncated model's reply is *coherent* when the full-depth model gives its tokens a
mean log-probability no lower than it gives most of its own full-depth replies. The
threshold is calibrated on the model's own replies, so it needs no labels and adapts to
the model's vocabulary and style (a perplexity filter, as in Jain et al. 2023, "Baseline
defenses for adversarial attacks against aligned language models", used here on outputs).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from safetylab.lm.generate import _batches, _left_pad


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad: int,
    batch_size: int = 64,
) -> list[float | None]:
    """Mean log-probability per response token under ``model``, given its prompt.

    Args:
        model: a causal LM (any Hugging Face ``*ForCausalLM``), run at full depth.
        prompt_ids: token ids of each prompt (chat template applied).
        response_ids: token ids of each reply (no prompt); an empty reply gives ``None``.
        pad: padding id (left padding, masked out).
        batch_size: sequences per forward pass.

    Returns:
        One float per reply, in (-inf, 0]: mean over the reply's tokens of log p(token | prefix).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; pass one reply per prompt")
    device = next(model.parameters()).device
    full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    out: list[float | None] = [None] * len(full)
    for idx in _batches(full, batch_size):
        rows = [i for i in idx if response_ids[i]]
        if not rows:
            continue
        ids, mask = _left_pad([full[i] for i in rows], pad, device)  # (batch, seq)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=False).logits.float()  # (batch, seq, vocab)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (batch, seq-1)
        width = ids.shape[1]
        for j, i in enumerate(rows):
            n = len(response_ids[i])
            out[i] = float(logp[j, width - 1 - n:].mean())
    return out


def coherence_threshold(full_depth_scores: Sequence[float | None], quantile: float = 0.05) -> float:
    """The ``quantile`` of the full-depth model's scores on its own replies (5%: nearly all
    of its own replies count as coherent). ``-inf`` when there is nothing to calibrate on."""
    x = np.asarray([s for s in full_depth_scores if s is not None and math.isfinite(s)], dtype=float)
    if x.size == 0:
        return -math.inf
    return float(np.quantile(x, quantile))
