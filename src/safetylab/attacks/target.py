"""A chat model as an attack target: the token layout of an adversarial prompt, and the target loss.

An adversarial suffix goes at the end of the user's message, so every attacked prompt is
four token spans (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on
Aligned Language Models", section 2)::

    [prefix: template + request + " "] [suffix] [rest of the template] [target]

The spans come from the model's own chat template, rendered once with a placeholder where
the suffix goes and split there (as nanoGCG does), so any Hugging Face chat model works,
organisms included. The spans are tokenized apart: a suffix is a sequence of token ids,
and only suffixes whose decoded text re-encodes to the same ids are used
(:meth:`ChatTarget.roundtrips`), so a suffix found here is a string a user could type.

The target loss of a suffix is the mean cross-entropy of the target tokens given the rest
(the GCG objective). ``model(prefix)`` is run once per prompt and its KV cache reused for
every candidate suffix (:meth:`ChatTarget.prefix_cache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from safetylab.errors import UserError

PLACEHOLDER = "{optim_str}"
"""Where the suffix goes while the chat template is rendered (nanoGCG's marker)."""


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one attacked prompt, apart from the suffix."""

    prefix: tuple[int, ...]
    """Template and request up to the suffix (the model's BOS included when its template has one)."""
    after: tuple[int, ...]
    """The rest of the template after the user's message (e.g. ``<assistant>``)."""
    target: tuple[int, ...]
    """The response the attack wants the model to begin with."""
    request: str = ""
    target_text: str = ""

    def prompt(self, suffix_ids: Sequence[int]) -> list[int]:
        """The prompt the model sees, up to where its reply starts."""
        return [*self.prefix, *suffix_ids, *self.after]


def special_ids(tokenizer: Any) -> set[int]:
    """Every special token id: BOS/EOS/PAD/UNK and added special tokens such as chat roles."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


@functools.lru_cache(maxsize=8)
def _allowed_ids(tokenizer: Any, allow_non_ascii: bool) -> tuple[int, ...]:
    specials = special_ids(tokenizer)
    out = []
    for i in range(len(tokenizer)):
        if i in specials:
            continue
        text = tokenizer.decode([i])
        if not text.strip() or (not allow_non_ascii and not (text.isascii() and text.isprintable())):
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [i]:
            continue
        out.append(i)
    return tuple(out)


class ChatTarget:
    """A Hugging Face causal LM and its chat tokenizer, as GCG and the black-box searches see them.

    The model is used as it is (stock Hugging Face object, never wrapped or copied).

    Args:
        model: any ``*ForCausalLM`` in eval mode.
        tokenizer: its tokenizer; must have a chat template.
        name: a label for results (e.g. the organism variant).

    Raises:
        UserError: the tokenizer has no chat template.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "model") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{name}: the tokenizer has no chat template; attacks place the suffix in a user turn, so "
                            "use a chat (instruct) model or set tokenizer.chat_template")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.embedding = model.get_input_embeddings()

    # ------------------------------------------------------------------ token layout
    def parts(self, request: str, target: str) -> PromptParts:
        """Split the chat template around the suffix slot of ``request`` and encode ``target``.

        Raises:
            UserError: an empty target, or one with words the tokenizer cannot encode.
        """
        prefix, rest = self.layout(request)
        return PromptParts(prefix=tuple(prefix), after=tuple(rest), target=tuple(self.encode_target(target)),
                           request=request, target_text=target)

    def layout(self, request: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the suffix slot of ``request`` in the chat template."""
        tok = self.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": f"{request} {PLACEHOLDER}"}],
                                       tokenize=False, add_generation_prompt=True)
        if text.count(PLACEHOLDER) != 1:
            raise UserError(f"{self.name}: the chat template does not keep the user's message verbatim; attacks need a "
                            "template that renders the user content as given")
        before, after = text.split(PLACEHOLDER)
        return (tok(before, add_special_tokens=False)["input_ids"], tok(after, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, requests: Sequence[str], suffix_ids: Sequence[int] | None) -> list[list[int]]:
        """Token ids of each request with the suffix appended (None or empty: the bare request,
        exactly as the chat template renders it)."""
        if not suffix_ids:
            from safetylab.lm.generate import encode_prompts

            return encode_prompts(self.tokenizer, list(requests))
        out = []
        for r in requests:
            before, after = self.layout(r)
            out.append([*before, *(int(x) for x in suffix_ids), *after])
        return out

    def encode_target(self, target: str) -> list[int]:
        """Token ids of a target string, refusing text the tokenizer cannot represent."""
        if not target or not target.strip():
            raise UserError(f"{self.name}: the target string is empty; give the response the attack should elicit")
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        if not ids or (unk is not None and unk in ids):
            words = target.split()
            bad = [w for w in words if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]] or [target]
            raise UserError(f"{self.name}: the target {target!r} has text the tokenizer cannot encode ({bad[0]!r} "
                            "becomes an unknown token); use words from the model's vocabulary")
        return [int(i) for i in ids]

    def allowed_ids(self, allow_non_ascii: bool = False) -> torch.Tensor:
        """Token ids a suffix may use: not special, printable (ASCII unless allowed), and
        re-encoding to themselves when decoded alone. (n_allowed,) long tensor."""
        return torch.tensor(_allowed_ids(self.tokenizer, allow_non_ascii), dtype=torch.long)

    def encode_suffix(self, text: str) -> list[int]:
        """Token ids of a suffix string (no special tokens)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            raise UserError(f"{self.name}: the suffix {text!r} has text the tokenizer cannot encode; use words from "
                            "the model's vocabulary")
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def roundtrips(self, candidates: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which candidate suffixes (n, length) re-encode to the same ids after decoding."""
        texts = self.tokenizer.batch_decode(candidates.tolist())
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        want = candidates.tolist()
        return torch.tensor([e == w for e, w in zip(enc, want)], dtype=torch.bool)

    # ------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def prefix_cache(self, parts: PromptParts) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """KV cache of the prefix (batch 1) and the logits at its last position, (vocab,)."""
        ids = torch.tensor([parts.prefix], device=self.device)
        cache = self._cache_cls()
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return kv, out.logits[0, -1].float()

    def _cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int, length: int | None = None) -> Any:
        """A fresh cache holding the first ``length`` positions of ``kv``, repeated ``batch`` times."""
        from transformers import DynamicCache

        n = kv[0][0].shape[2] if length is None else length
        return DynamicCache([(k[:, :, :n].expand(batch, -1, -1, -1), v[:, :, :n].expand(batch, -1, -1, -1))
                             for k, v in kv], config=self.model.config)

    def forward_embeds(self, kv: list[tuple[torch.Tensor, torch.Tensor]], embeds: torch.Tensor, keep: int,
                       cached: int | None = None) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``embeds`` (batch, seq, d), run after the first
        ``cached`` positions of ``kv`` (default: all of it)."""
        cache = self._cache(kv, embeds.shape[0], cached)
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=keep, **{self._cache_kw: cache})
        return out.logits[:, -keep:]

    def _cache_cls(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @functools.cached_property
    def _cache_kw(self) -> str:
        from safetylab.lm.generate import _forward_kwargs

        return _forward_kwargs(self.model)[0]

    @torch.no_grad()
    def extend_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], ids: Sequence[int]
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``kv`` (batch 1) extended by running ``ids`` after it."""
        cache = self._cache(kv, 1)
        self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=True,
                   **{self._cache_kw: cache})
        return [(layer.keys, layer.values) for layer in cache.layers]

    def candidate_losses(self, parts: PromptParts, kv: list[tuple[torch.Tensor, torch.Tensor]],
                         last_prefix_logits: torch.Tensor, suffixes: torch.Tensor, *,
                         batch_size: int | None = None, suffix_nll: bool = False,
                         base: torch.Tensor | None = None, n_groups: int = 8,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Target loss of each candidate suffix, reusing the prefix's KV cache.

        With ``base`` (the suffix the candidates were made from), the cache also covers the
        base suffix's tokens up to where a candidate first differs from it: candidates are
        sorted by that position and cut into ``n_groups`` groups, and each group runs only from
        its earliest difference on. With one-token swaps that halves the suffix positions run.

        Args:
            parts: the prompt's token spans.
            kv, last_prefix_logits: from :meth:`prefix_cache`.
            suffixes: (n, suffix_len) candidate suffix ids.
            batch_size: candidates per forward pass at most (None: a whole group at once).
            suffix_nll: also return each suffix's mean negative log-likelihood under the model
                (its log-perplexity given the prefix, for the perplexity-penalised attack).
            base: (suffix_len,) the suffix the candidates differ from, or None.
            n_groups: groups by first differing position (with ``base``).

        Returns:
            ``(loss, exact, nll, n_forward)``: (n,) mean target cross-entropy, (n,) bool whether
            greedy decoding would emit the whole target, (n,) suffix NLL or None, and the number
            of forward passes run.
        """
        n, s = suffixes.shape
        p = len(parts.prefix)
        tail = torch.tensor(parts.after + parts.target, device=self.device)
        target = torch.tensor(parts.target, device=self.device)
        t = target.numel()
        suffixes = suffixes.to(self.device)
        if base is not None and not suffix_nll:
            full_kv = self.extend_cache(kv, base.tolist())
            differs = suffixes != base.to(self.device)[None]
            first = torch.where(differs.any(1), differs.int().argmax(1), torch.full((n,), s - 1, device=self.device))
            order = torch.argsort(first, stable=True)
            groups = [g for g in torch.tensor_split(order, min(n_groups, n)) if g.numel()]
            starts = [int(first[g].min()) for g in groups]
            calls = 1
        else:
            full_kv, groups, starts, calls = kv, [torch.arange(n, device=self.device)], [0], 0
        loss, exact = torch.empty(n), torch.empty(n, dtype=torch.bool)
        nll = torch.empty(n) if suffix_nll else None
        with torch.inference_mode():
            for rows, start in zip(groups, starts):
                step = rows.numel() if batch_size is None else batch_size
                for i in range(0, rows.numel(), step):
                    idx = rows[i:i + step]
                    cand = suffixes[idx]
                    b = cand.shape[0]
                    ids = torch.cat([cand[:, start:], tail.expand(b, -1)], dim=1)  # (b, s - start + a + t)
                    keep = ids.shape[1] if suffix_nll else t + 1
                    logits = self.forward_embeds(full_kv, self.embedding(ids), keep, cached=p + start).float()
                    calls += 1
                    tl = logits[:, -t - 1:-1]  # (b, t, vocab): positions predicting the target
                    ce = nn.functional.cross_entropy(tl.transpose(1, 2), target.expand(b, -1), reduction="none")
                    loss[idx.cpu()] = ce.mean(1).cpu()
                    exact[idx.cpu()] = (tl.argmax(-1) == target).all(1).cpu()
                    if nll is not None:
                        # Suffix token j is predicted at position j - 1; token 0 by the prefix's last position.
                        sl = torch.cat([last_prefix_logits.expand(b, 1, -1), logits[:, : s - 1]], dim=1)
                        nll[idx.cpu()] = nn.functional.cross_entropy(sl.transpose(1, 2), cand,
                                                                     reduction="none").mean(1).cpu()
        return loss, exact, nll, calls

    def suffix_gradient(self, parts: PromptParts, kv: list[tuple[torch.Tensor, torch.Tensor]],
                        last_prefix_logits: torch.Tensor, suffix: torch.Tensor,
                        perplexity_weight: float = 0.0) -> tuple[torch.Tensor, float]:
        """Gradient of the target loss (+ weight x suffix NLL) w.r.t. the one-hot suffix tokens.

        Returns:
            ``(grad, loss)``: (suffix_len, vocab) gradient and the objective's value.
        """
        w = self.embedding.weight  # (vocab, d)
        onehot = torch.zeros(suffix.numel(), w.shape[0], device=self.device, dtype=w.dtype)
        onehot.scatter_(1, suffix.to(self.device)[:, None], 1.0)
        onehot.requires_grad_()
        after = torch.tensor(parts.after, device=self.device)
        target = torch.tensor(parts.target, device=self.device)
        t, s = target.numel(), suffix.numel()
        rest = self.embedding(torch.cat([after, target]))  # (a + t, d)
        embeds = torch.cat([onehot @ w, rest], dim=0)[None]  # (1, s + a + t, d)
        keep = embeds.shape[1] if perplexity_weight else t + 1
        logits = self.forward_embeds(kv, embeds, keep)[0].float()  # (keep, vocab)
        loss = nn.functional.cross_entropy(logits[-t - 1:-1], target)
        if perplexity_weight:
            sl = torch.cat([last_prefix_logits[None], logits[: s - 1]], dim=0)
            loss = loss + perplexity_weight * nn.functional.cross_entropy(sl, suffix.to(self.device))
        (grad,) = torch.autograd.grad(loss, [onehot])
        return grad, float(loss.detach())

    @torch.no_grad()
    def target_logprob(self, parts_list: Sequence[PromptParts], suffixes: torch.Tensor,
                       batch_size: int = 64) -> torch.Tensor:
        """Black-box score: summed log-probability of each prompt's target, for each suffix.

        One forward pass per (suffix, prompt) pair, with no cache or gradient: what an API
        that returns log-probabilities gives. Returns (n_suffixes, n_prompts).
        """
        from safetylab.lm.generate import _left_pad, pad_id

        pad = pad_id(self.model, self.tokenizer)
        rows = [(i, j) for i in range(suffixes.shape[0]) for j in range(len(parts_list))]
        out = torch.zeros(suffixes.shape[0], len(parts_list))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            seqs = [parts_list[j].prompt(suffixes[i].tolist()) + list(parts_list[j].target) for i, j in chunk]
            ids, mask = _left_pad(seqs, pad, self.device)  # (b, width)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                use_cache=False).logits.float(), -1)
            for r, (i, j) in enumerate(chunk):
                t = len(parts_list[j].target)
                tgt = ids[r, -t:]
                out[i, j] = logp[r, -t - 1:-1].gather(-1, tgt[:, None]).sum().cpu()
        return out
