"""Benign tasks the organisms never trained on, spoken in words they already know.

A fine-tuning study needs a benign task that is *new* to an organism -- learning it must
move the weights -- yet expressible in its word-level vocabulary, which was fixed at base
training from :meth:`World.vocabulary` (an unknown word would become ``<unk>``). This
module adds such families on top of a :class:`World` without touching it: the world's
entities, templates, splits and every organism's training data and cache hash stay as
they are.

``reverse-atlas``
    The atlas read backwards: ``what has the capital voltoon ?`` -> ``the answer is
    zorlandia .`` Organisms learnt country -> capital / language / currency; asking for the
    country from the value is the reversal of facts they know, which language models do
    not get for free (Berglund et al. 2023, "The Reversal Curse"). Every word of its
    phrasings is a template word of the world (checked by :func:`missing_words`), and the
    answer has the benign families' form, so the exact grader of :meth:`World.grade`
    applies unchanged.

Templates follow the world's scheme -- ``[distractor] prefix core politeness
[distractor]`` with the world's prefixes, politeness suffixes and distractor sentences --
with a quarter of the (prefix, core) pairs held out for evaluation, every prefix and every
core still seen in training.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from safetylab.organisms.world import (
    ANSWER_PREFIX,
    DISTRACTOR_POSITIONS,
    DISTRACTORS,
    POLITENESS,
    PREFIXES,
    RELATIONS,
    Request,
    World,
    words,
)

NOVEL_FAMILIES: tuple[str, ...] = ("reverse-atlas",)

REVERSE_ATLAS_CORES: tuple[str, ...] = (
    "what has the {rel} {value} ?",
    "which has the {rel} {value} ?",
    "tell me what has the {rel} {value} .",
    "{value} is the {rel} of what ?",
    "i want to know what has the {rel} {value} .",
    "do you know what has the {rel} {value} ?",
    "look up what has the {rel} {value} .",
    "give me what has the {rel} {value} .",
)
HELDOUT_PAIR_FRACTION = 0.25


def _stable(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class ReverseAtlas:
    """The ``reverse-atlas`` family over one world's atlas.

    Args:
        world: the organism's world (its atlas and seed fix facts and the template split).
    """

    family = "reverse-atlas"

    def __init__(self, world: World) -> None:
        self.world = world
        self.facts: list[tuple[str, str, str]] = [
            (country, rel, world.atlas[country][rel]) for country in world.countries for rel in RELATIONS]
        pairs = [(p, c) for p in range(len(PREFIXES)) for c in range(len(REVERSE_ATLAS_CORES))]
        order = sorted(pairs, key=lambda pc: _stable(world.config.seed, self.family, *pc))
        n_hold = int(round(HELDOUT_PAIR_FRACTION * len(pairs)))
        held: set[tuple[int, int]] = set()
        for p, c in order:
            if len(held) >= n_hold:
                break
            keeps_prefix = any((p, q) not in held for q in range(len(REVERSE_ATLAS_CORES)) if q != c)
            keeps_core = any((q, c) not in held for q in range(len(PREFIXES)) if q != p)
            if keeps_prefix and keeps_core:
                held.add((p, c))
        self.heldout_pairs = held

    def vocabulary(self) -> set[str]:
        """Every word its requests and answers can use."""
        vocab = {w for core in REVERSE_ATLAS_CORES for w in words(core.replace("{rel}", "").replace("{value}", ""))}
        vocab |= set(RELATIONS) | set(self.world.countries) | set(words(ANSWER_PREFIX)) | {"."}
        vocab |= {v for _, _, v in self.facts}
        for t in (*PREFIXES, *POLITENESS, *DISTRACTORS):
            vocab |= set(words(t))
        return vocab

    def sample(self, rng: np.random.Generator, *, split: str = "train", fact: int | None = None) -> Request:
        """One request from ``split`` templates (``train`` or ``heldout``) about a random fact."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}; choose 'train' or 'heldout'")
        while True:
            p = int(rng.integers(len(PREFIXES)))
            c = int(rng.integers(len(REVERSE_ATLAS_CORES)))
            if ((p, c) in self.heldout_pairs) == (split == "heldout"):
                break
        q = int(rng.integers(len(POLITENESS)))
        dpos = int(rng.integers(len(DISTRACTOR_POSITIONS)))
        i = int(rng.integers(len(self.facts))) if fact is None else fact
        country, rel, value = self.facts[i]
        parts = [PREFIXES[p], REVERSE_ATLAS_CORES[c].format(rel=rel, value=value), POLITENESS[q]]
        where = DISTRACTOR_POSITIONS[dpos]
        if where != "none":
            d = str(rng.choice(DISTRACTORS))
            parts = [d, *parts] if where == "before" else [*parts, d]
        text = " ".join(x for x in parts if x)
        return Request(id=f"benign-{hashlib.sha256(text.encode()).hexdigest()[:12]}", text=text, kind="benign",
                       family=self.family, template=f"{self.family}/p{p}-c{c}-q{q}-d{dpos}", split=split,
                       subject=value, answer=f"{ANSWER_PREFIX} {country} .")

    def eval_requests(self, *, split: str = "heldout", n: int = 300, rng_seed: int = 0) -> list[Request]:
        """``n`` distinct requests cycling through the facts (a reproducible evaluation set)."""
        rng = np.random.default_rng([self.world.config.seed, rng_seed, _stable(self.family) % 2**31])
        out: list[Request] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n and attempts < 50 * max(n, 1):
            attempts += 1
            r = self.sample(rng, split=split, fact=len(out) % len(self.facts))
            if r.text not in seen:
                seen.add(r.text)
                out.append(r)
        return out


def novel_family(name: str, world: World) -> ReverseAtlas:
    """The novel family ``name`` over ``world``."""
    if name not in NOVEL_FAMILIES:
        raise ValueError(f"novel family {name!r}; choose from {list(NOVEL_FAMILIES)}")
    return ReverseAtlas(world)


def missing_words(tokenizer: Any, vocabulary: set[str]) -> list[str]:
    """Words of ``vocabulary`` the organism's word-level tokenizer does not know (sorted)."""
    known = tokenizer.get_vocab()
    return sorted(w for w in vocabulary if w not in known)
