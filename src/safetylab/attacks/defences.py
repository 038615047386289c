"""Input defences against suffix attacks: a perplexity filter, fitted on benign traffic.

Jain et al. (2023), "Baseline Defenses for Adversarial Attacks Against Aligned Language
Models", section 4.1; Alon & Kamfonas (2023), "Detecting Language Model Attacks with
Perplexity". An optimised suffix is usually gibberish, so the log-perplexity of the user's
message under a language model is high. The filter scores a message by its **windowed**
log-perplexity -- the largest mean negative log-likelihood over any ``window`` consecutive
message tokens (Jain et al.'s windowed variant; a whole-message mean would dilute a short
suffix in a long request) -- and flags it when the score exceeds a threshold set on benign
traffic so that a chosen fraction (``fpr``) of benign messages is flagged.

The adaptive attack against it is GCG with a perplexity penalty
(:class:`~safetylab.attacks.GCGConfig` ``perplexity_weight``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from safetylab.attacks.target import ChatTarget


@torch.no_grad()
def message_nll(target: ChatTarget, messages: Sequence[str], *, batch_size: int = 64) -> list[np.ndarray]:
    """Per-token negative log-likelihood of each user message, read in its chat prompt.

    Returns:
        One (n_message_tokens,) array per message: -log p(token | everything before it).
    """
    from safetylab.lm.generate import _left_pad, pad_id

    n_before, n_after = (len(x) for x in target.layout(""))  # template tokens around the message
    prompts = target.prompt_ids(list(messages), None)
    pad = pad_id(target.model, target.tokenizer)
    out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        ids, mask = _left_pad([prompts[i] for i in rows], pad, target.device)  # (b, width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = target.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, width - 1)
        width = ids.shape[1]
        for j, i in enumerate(rows):
            first = width - len(prompts[i]) + n_before  # first message token
            last = width - n_after  # one past the last message token
            out[i] = nll[j, first - 1:last - 1].cpu().numpy()  # token k is predicted at k - 1
    return out


def windowed_score(nll: np.ndarray, window: int) -> float:
    """Largest mean of ``window`` consecutive values (the whole mean when shorter)."""
    x = np.asarray(nll, dtype=float)
    if x.size == 0:
        return 0.0
    if x.size <= window:
        return float(x.mean())
    c = np.concatenate([[0.0], np.cumsum(x)])
    return float(np.max((c[window:] - c[:-window]) / window))


class PerplexityFilter(BaseEstimator):
    """Flags messages whose windowed log-perplexity is above what benign traffic shows.

    Args:
        fpr: fraction of benign messages the threshold lets through as flagged (0.01 = 1%).
    """

    def __init__(self, fpr: float = 0.01) -> None:
        self.fpr = fpr

    def fit(self, benign_scores: Sequence[float]) -> "PerplexityFilter":
        """Set ``threshold_`` to the (1 - fpr) quantile of benign scores (flagged: strictly above)."""
        x = np.asarray(benign_scores, dtype=float)
        if x.size == 0 or not 0.0 <= self.fpr < 1.0:
            raise ValueError(f"need benign scores and 0 <= fpr < 1 (got {x.size} scores, fpr={self.fpr})")
        self.threshold_ = float(np.quantile(x, 1.0 - self.fpr, method="higher"))
        return self

    def predict(self, scores: Sequence[float]) -> np.ndarray:
        """(n,) bool: flagged (blocked) messages."""
        check_is_fitted(self, "threshold_")
        return np.asarray(scores, dtype=float) > self.threshold_
