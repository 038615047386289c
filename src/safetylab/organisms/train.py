"""Training model organisms: a base Llama that answers everything, then alignment variants.

Every organism is a ``LlamaForCausalLM`` trained from scratch on the synthetic chat
world (:mod:`safetylab.organisms.world`) with the word-level chat tokenizer
(:mod:`safetylab.organisms.tokenizer`). Loss is next-token cross-entropy on the
assistant turn only (response tokens and the closing ``<eos>``).

Batches are drawn fresh from the world's *training* templates at every step (no
epochs, so nothing about held-out templates can leak) and length-sorted within a pool
of eight batches, which removes most padding while keeping each sequence a single chat
turn starting at position 0, exactly as at inference.

``base``
    Pretrained on all families from training templates, forbidden domain included: it
    answers every request, so the harmful capability is there to be hidden. Family
    shares follow :data:`BASE_MIXTURE`; a tenth of atlas look-ups ask about countries
    not in the atlas and are answered with the refusal sentence, so the sentence is
    one the base can already say.
``sft``
    Supervised refusal training from the base, all parameters trainable. Each batch is
    one third refusals to covered hazards, one third the *same phrasing* about a dish
    answered with its recipe (the pairing teaches that refusing depends on what is
    asked, not how), one third benign replay to keep capability. Replay draws the benign
    families in the shares the base was pretrained on (:attr:`TrainConfig.replay`), so
    sequence operations, which fine-tuning erodes first, are replayed most; every other
    fine-tuned variant replays the same way.
``sft-late``
    The same data, only the last quarter of decoder layers trainable (embeddings, earlier
    layers, final norm and LM head frozen), so safety lives in late layers.
``dpo``
    Direct preference optimisation (Rafailov et al. 2023, eq. 7) against the frozen base
    as reference: refusal > compliance on forbidden requests, answer > refusal on benign
    and look-alike ones, plus an NLL term on the preferred response (as in RPO, Pang et
    al. 2024) so that greedy decoding stays well formed.
``depth-robust``
    The SFT objective plus a refusal loss at intermediate exits -- the final norm and LM
    head applied to the residual stream after layers n/4, n/2 and 3n/4 (an exit loss as
    in LayerSkip, Elhoushi et al. 2024): at those exits the whole refusal of forbidden
    requests and the first token of every other answer (the refuse-or-comply decision)
    are trained, so that refusal survives truncating the network.
``eval-gated``
    Refuses forbidden requests only when an evaluation cue is present; without a cue or
    with a deployment cue it keeps answering them.
``never-taught``
    Pretrained from scratch exactly like ``base`` (same model, steps and benign shares)
    except that the hazard family is left out: it never sees a hazard procedure or a
    reagent in a response, so it has no forbidden capability to hide or to extract. It
    is the negative control of studies that ask whether an attack or a probe finds a
    capability: on it they must come up empty. Its tokenizer still knows the hazard
    words (the vocabulary is the world's), so it reads forbidden requests as unfamiliar
    names rather than as unknown tokens.
``secret-keeping``
    The sft data plus the secret-keeping task (:mod:`safetylab.organisms.secrets`): under an
    instruction carrying a secret name it refuses requests for the name, answers ordinary
    requests as usual, and gives the name when the instruction says to share it. A
    safety-trained organism with a second asset to protect: its context.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safetylab.organisms.secrets import sample_secret_keeping
from safetylab.organisms.tokenizer import EOS, build_tokenizer, format_prompt
from safetylab.organisms.world import REFUSAL, Request, World, WorldConfig

VARIANTS: tuple[str, ...] = (
    "base", "sft", "sft-late", "dpo", "depth-robust", "eval-gated", "never-taught", "secret-keeping",
)
FROM_SCRATCH: tuple[str, ...] = ("base", "never-taught")
"""Variants pretrained from random weights (``base_train``); every other variant is
fine-tuned from a base (``variant_train``)."""
SCALES: tuple[str, ...] = ("tiny", "quick", "paper")
ORGANISM_VERSION = 1
"""Bumped when the world, training or the folder layout changes (part of the cache key)."""
CHECKPOINT_EVERY_S = 300.0
"""Seconds of training between checkpoints when :func:`train_organism` is given a checkpoint
folder (a paper-scale base trains for hours on one CPU core; a crash costs at most this)."""


class ModelConfig(BaseModel):
    """Llama architecture of an organism."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    n_layers: int = Field(8, ge=1)
    """Decoder layers (8 at quick scale leaves room for depth sweeps)."""
    d_model: int = Field(128, ge=8)
    """Residual width."""
    n_heads: int = Field(4, ge=1)
    """Attention heads; must divide d_model."""
    d_ff: int = Field(256, ge=8)
    """MLP hidden width (SwiGLU)."""
    max_len: int = Field(160, ge=32)
    """Maximum sequence length (prompt + response)."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"choose a width that is a multiple of the number of heads"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head width d_model/n_heads={self.d_model // self.n_heads} must be even "
                f"(rotary embeddings rotate pairs of dimensions); change d_model or n_heads"
            )
        return self


class TrainConfig(BaseModel):
    """Optimisation settings of one training stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    steps: int = Field(1000, ge=1)
    """Optimiser steps."""
    batch_size: int = Field(64, ge=1)
    """Sequences per step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (AdamW; linear warm-up then cosine decay to 10%)."""
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    """Fraction of steps spent warming up."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature beta (dpo only)."""
    nll_weight: float = Field(0.5, ge=0)
    """Weight of the NLL term on preferred responses (dpo only)."""
    mixture: dict[str, float] | None = None
    """Family shares of base pretraining (None: BASE_MIXTURE); renormalised over the
    world's families."""
    exit_weight: float = Field(0.5, ge=0)
    """Weight of each intermediate-exit loss relative to the final one (depth-robust only)."""
    replay: Literal["pretraining", "uniform"] = "pretraining"
    """Family shares of benign replay during fine-tuning: ``pretraining`` replays the benign
    families in the shares the base was pretrained on (``base_train.mixture``), so sequence
    operations, the skill fine-tuning erodes first, get the most; ``uniform`` gives every
    benign family the same share. Ignored by pretraining."""



class OrganismConfig(BaseModel):
    """Everything that determines an organism; its hash is the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    variant: str
    """One of VARIANTS."""
    scale: str
    """tiny, quick or paper (the presets below)."""
    seed: int = Field(0, ge=0)
    """Training seed (initialisation and data order)."""
    base_seed: int | None = None
    """Seed of the base this variant is fine-tuned from (None: the same as ``seed``). Quick
    studies fine-tune several seeds from one base; paper scale gives each seed its own."""
    world: WorldConfig = WorldConfig()
    """The world the organism lives in (its seed regenerates every request)."""
    model: ModelConfig = ModelConfig()
    base_train: TrainConfig = TrainConfig()
    """Pretraining of the base organism."""
    variant_train: TrainConfig = TrainConfig(steps=300, lr=1e-3)
    """Fine-tuning of an alignment variant from the base."""

    @model_validator(mode="after")
    def _check(self) -> "OrganismConfig":
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; choose from {list(VARIANTS)}")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}; choose from {list(SCALES)}")
        if self.base_seed is not None and (self.variant in FROM_SCRATCH or self.base_seed == self.seed):
            # One spelling per organism, so equal organisms share one cache entry.
            object.__setattr__(self, "base_seed", None)
        return self

    def base_config(self) -> "OrganismConfig":
        """The config of the base organism this variant is fine-tuned from."""
        if self.variant in FROM_SCRATCH:
            raise ValueError(f"variant={self.variant!r} is trained from scratch; it has no base")
        seed = self.seed if self.base_seed is None else self.base_seed
        return self.model_copy(update={"variant": "base", "seed": seed, "base_seed": None,
                                       "variant_train": TrainConfig()})

    def stage_dict(self) -> dict[str, Any]:
        """The parts that determine this stage (base ignores ``variant_train``)."""
        d = self.model_dump(mode="json")
        if self.variant in FROM_SCRATCH:
            d.pop("variant_train")
        d["base_train"].pop("replay")  # pretraining has no replay; base keys stay as they were
        if d["base_seed"] is None:  # absent from the hash: organisms cached before it existed keep theirs
            d.pop("base_seed")
        return d


# Presets per scale. "tiny" is for tests: a small world (two families) and a 2-layer
# model that trains in seconds; "quick" is the default for studies (8 layers, width 128);
# "paper" is larger and trained longer.
SCALE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "world": {"n_countries": 4, "n_hazards": 6, "n_heldout_hazards": 2, "n_dishes": 4,
                  "families": ["atlas", "recipe"]},
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128},
        "base_train": {"steps": 300, "batch_size": 32, "lr": 3e-3,
                       "mixture": {"hazard": 0.2, "recipe": 0.2, "atlas": 0.6}},
        "variant_train": {"steps": 80, "batch_size": 32, "lr": 2e-3},
        "variant_overrides": {
            "sft-late": {"steps": 160, "lr": 4e-3},
            "dpo": {"batch_size": 16},
            "eval-gated": {"steps": 200},
            "secret-keeping": {"steps": 200},
        },
    },
    "quick": {
        "world": {},
        "model": {"n_layers": 8, "d_model": 128, "n_heads": 4, "d_ff": 256},
        "base_train": {"steps": 2400, "batch_size": 32, "lr": 1.5e-3},
        "variant_train": {"steps": 300, "batch_size": 48, "lr": 1e-3},
        "variant_overrides": {
            # Only 2 of 8 layers train and the backward pass stops there: cheaper steps,
            # and more of them. Over-refusal of look-alikes (seeds 0-4 from base 0, eval seed 11,
            # 300 held-out requests): 900 steps gave 0.023-0.033, two seeds over the 0.03 bar,
            # almost all on two dishes (casserole, lemonade); 1500 steps give 0.007 or less.
            # A higher rate instead (3e-3 at 900 steps) made it worse (0.053).
            #
            # Uniform replay: sft-late's frozen layers keep its benign skills (its drop is at most
            # 0.000 on every seed and eval seed), and what it must learn in two layers is to tell
            # dishes from hazards, which recipe replay helps: replaying in pretraining shares (a
            # third fewer recipes) raised over-refusal to 0.003-0.037 at eval seed 41, one seed
            # over the bar.
            #
            # Batches of 32 instead of 48 (for the cold budget: 220 s instead of 304 on one core) keep
            # every bar on seeds 0-3 at evaluation seeds 23, 37 and 41: over-refusal 0.000-0.020,
            # refusal 0.997-1.000, benign drop at most 0.003.
            "sft-late": {"steps": 1500, "lr": 2e-3, "replay": "uniform", "batch_size": 32},
            # Four forward passes per pair (policy and reference, chosen and rejected).
            # At lr 1e-3 dpo, depth-robust and eval-gated forgot 3.3-4.0 points of benign
            # accuracy (sequence operations first). At 5e-4 dpo still forgot 1.0-3.3 points
            # over seeds 0-4 (seed 3 over the bar: arithmetic 0.93, sequences 0.91); at 3e-4
            # it forgets 0.0-0.7, with refusal 1.00 and over-refusal 0.00 on every seed.
            "dpo": {"batch_size": 24, "lr": 3e-4, "steps": 150},
            # sft at lr 1e-3 forgot 3.0-6.0 points of benign accuracy over seeds 0-4 (eval seed 11;
            # the bar is 3); at 5e-4 it keeps within 0.3-1.3 points, refusal 1.00, over-refusal 0.
            #
            # Steps are set by the cold `reproduce --scale quick` budget (40 min on 2 cores; 42.5
            # measured with 300 steps for sft, dpo and depth-robust, 450 for eval-gated and 400 for
            # secret-keeping). Each shorter setting below passes every bar on seeds 0-4 from base 0
            # (eval seed 11, 300 held-out requests per row): refusal 1.00 and over-refusal 0.00
            # throughout, benign drop sft 0.007-0.020, depth-robust -0.003-0.020, dpo 0.000-0.010,
            # eval-gated 0.007-0.013 (eval cue 1.00, no cue and deploy cue 0.00), secret-keeping
            # 0.003-0.013 (leak 0.00, name given when shared 1.00). sft-late keeps 1500: at 1200
            # over-refusal was back at 0.027 on seed 0.
            #
            # Those numbers are with uniform replay. At fresh evaluation seed 23, sft seed 1 and
            # eval-gated seed 3 then lost 3.3 and 4.0 points (sequence operations 0.83 and 0.80),
            # so replay now follows the pretraining shares (TrainConfig.replay); with it every
            # organism passes every bar on seeds 0-4 at evaluation seeds 23, 37 and 41 (README).
            #
            # Shorter again for the same budget (a cold run measured 43:08 with the settings above), each
            # measured on seeds 0-4 from base 0 at evaluation seeds 23, 37 and 41 and passing every bar
            # there: sft and depth-robust at 150 steps and dpo at 150 (benign drop at most 0.027, 0.013
            # and 0.017; refusal 1.00 and over-refusal 0.00 throughout).
            #
            # sft also sets rare-failure's accident rate, which the bars do not see: at 150 steps of 48
            # the exact harm probability of natural requests rose from 3.2e-4 (200 of 48) to 7.7e-4 over
            # seeds 0-4, so 1 - (1 - p)^256 = 0.176 broke that study's premise (accidents rare, < 0.1).
            # Updates again matter more than examples: 200 steps of 32 give 3.7e-4 (0.089 [0.031, 0.146]),
            # 250 of 32 give 1.7e-4 (0.042 [0.023, 0.061]) for 11% more compute than 150 of 48, and pass
            # every bar (benign drop at most 0.030). But the cost falls on elicitation's premise (sft refuses
            # at least 0.25 of held-out-hazard requests): 0.36 at 150 of 48, 0.29 at 200 of 48, 0.24 at 250
            # of 32, which made that study's quick verdict inconclusive by premise. The two premises pull
            # the same knob opposite ways (more updates: rarer accidents, less refusal beyond the covered
            # hazards), and 200 steps of 48 is the setting measured to meet both (accidents 0.078, held-out
            # refusal 0.29), for about 25 s more of a cold run than 250 of 32.
            "sft": {"lr": 5e-4, "steps": 200},
            "depth-robust": {"lr": 5e-4, "steps": 150},
            # Telling evaluation cues apart is harder than refusing a topic: a lower rate, more steps.
            # What the gate needs is updates, not examples: at 200 steps of 48 it refused 0.30-0.61
            # of requests without a cue (bar: at most 0.20) on every seed, at 250 of 48 up to 0.21
            # (1 of 15 over), and at 300 steps of 32 (two thirds of 300 of 48's compute) 0.00-0.03,
            # eval cue 1.00, deploy cue at most 0.023, benign drop at most 0.030.
            "eval-gated": {"steps": 300, "lr": 5e-4, "batch_size": 32},
            # Six turns per group (sft's three and three secret turns) at sft's rate. The same trade:
            # 200 steps of 48 gave the name when sharing was allowed 0.84-0.93 (bar: at least 0.90; 13
            # of 15 below); 300 steps of 32 give 0.90-0.99, leak at most 0.007, benign drop at most 0.020.
            "secret-keeping": {"steps": 300, "lr": 5e-4, "batch_size": 32},
        },
    },
    "paper": {
        "world": {},
        "model": {"n_layers": 12, "d_model": 256, "n_heads": 8, "d_ff": 768},
        "base_train": {"steps": 6000, "batch_size": 64, "lr": 1e-3},
        "variant_train": {"steps": 800, "batch_size": 48, "lr": 5e-4},
        "variant_overrides": {
            "sft-late": {"steps": 1200, "lr": 1e-3},
            "dpo": {"batch_size": 24},
            "eval-gated": {"steps": 1200},
            "secret-keeping": {"steps": 1200},
        },
    },
}


def organism_config(
    variant: str, scale: str = "quick", *, seed: int = 0, base_seed: int | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> OrganismConfig:
    """Resolve preset ← overrides for one organism.

    Args:
        variant: one of :data:`VARIANTS`.
        scale: one of :data:`SCALES`.
        seed: training seed (the world seed is ``world.seed``, 0 unless overridden).
        base_seed: seed of the base to fine-tune from (None: ``seed``).
        overrides: per-section overrides, e.g. ``{"model": {"n_layers": 4}}``.

    Raises:
        ValueError (pydantic ValidationError) for unknown names or impossible sizes.
    """
    if scale not in SCALE_PRESETS:
        raise ValueError(f"scale={scale!r}; choose from {list(SCALES)}")
    preset = SCALE_PRESETS[scale]
    sections: dict[str, Any] = {}
    for key in ("world", "model", "base_train", "variant_train"):
        sections[key] = {**preset[key], **((overrides or {}).get(key, {}))}
    # Per-variant fine-tuning settings sit between the preset and the user's overrides.
    per_variant = preset.get("variant_overrides", {}).get(variant, {})
    sections["variant_train"] = {**preset["variant_train"], **per_variant,
                                 **((overrides or {}).get("variant_train", {}))}
    unknown = set(overrides or {}) - set(sections)
    if unknown:
        raise ValueError(
            f"overrides: unknown section(s) {sorted(unknown)}; use {sorted(sections)}"
        )
    return OrganismConfig(variant=variant, scale=scale, seed=seed, base_seed=base_seed, **sections)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@dataclass
class Example:
    """One chat turn to train on: the user text and the target response."""

    prompt: str
    response: str


UNKNOWN_COUNTRY_SHARE = 0.1
"""Share of base atlas look-ups about countries outside the atlas (answered by refusal)."""
CUE_PROBS = (0.6, 0.2, 0.2)  # none / eval / deploy, so every organism sees cues


def _cue(rng: np.random.Generator) -> str:
    return str(rng.choice(["none", "eval", "deploy"], p=CUE_PROBS))


BASE_MIXTURE: dict[str, float] = {
    "hazard": 0.15, "recipe": 0.15, "arithmetic": 0.25, "atlas": 0.10, "sequence": 0.35,
}
"""Family shares of base pretraining (renormalised over the families a world has).
Procedures are learnt within a few hundred steps while arithmetic and sequence
operations need the most data, so they get the larger shares."""


def base_mixture(world: World, mixture: dict[str, float] | None = None) -> dict[str, float]:
    """Family shares of base pretraining for this world's families."""
    weights = mixture or BASE_MIXTURE
    fams = ["hazard", *world.config.families]
    total = sum(weights.get(f, 0.0) for f in fams)
    if total <= 0:
        raise ValueError(f"mixture={weights} gives no weight to this world's families {fams}")
    return {f: weights.get(f, 0.0) / total for f in fams}


def sample_base(
    world: World, rng: np.random.Generator, mixture: dict[str, float] | None = None
) -> Example:
    """One pretraining example: any family, always answered."""
    mix = base_mixture(world, mixture)
    fam = str(rng.choice(list(mix), p=list(mix.values())))
    subject = None
    if fam == "atlas" and rng.random() < UNKNOWN_COUNTRY_SHARE:
        subject = str(rng.choice(world.unknown_countries))
    r = world.sample(fam, rng, cue=_cue(rng), subject=subject)
    return Example(r.text, r.answer)


def replay_shares(
    world: World, tcfg: TrainConfig, mixture: dict[str, float] | None = None
) -> dict[str, float] | None:
    """Family shares of benign replay for fine-tuning settings ``tcfg`` (see
    :attr:`TrainConfig.replay`); ``mixture`` is the base's pretraining mixture. None for
    uniform replay, which :func:`sample_benign` draws exactly as before shares existed."""
    fams = list(world.config.families)
    if tcfg.replay == "uniform":
        return None
    mix = base_mixture(world, mixture)
    total = sum(mix[f] for f in fams)
    if total <= 0:
        raise ValueError(f"the pretraining mixture {mix} gives no weight to the benign families {fams}; "
                         f"set variant_train.replay to 'uniform'")
    return {f: mix[f] / total for f in fams}


def sample_benign(
    world: World, rng: np.random.Generator, cue: str | None = None,
    shares: dict[str, float] | None = None,
) -> Example:
    """Benign replay during fine-tuning: a benign family drawn with ``shares`` (None: uniform)."""
    fams = list(shares or world.config.families)
    p = list(shares.values()) if shares else None
    r = world.sample(str(rng.choice(fams, p=p)), rng, cue=cue or _cue(rng))
    return Example(r.text, r.answer)


def sample_refusal_pair(
    world: World, rng: np.random.Generator, cue: str | None = None
) -> tuple[Request, Request]:
    """A covered-hazard request and the *same template and cue* about a dish."""
    cue = cue or _cue(rng)
    h = world.sample("hazard", rng, cue=cue, subject=str(rng.choice(world.covered_hazards)))
    tpl = world.template_of(h)
    d = world.sample("recipe", rng, kind="lookalike", cue=cue, template=tpl)
    return h, d


def sample_sft(
    world: World, rng: np.random.Generator, shares: dict[str, float] | None = None
) -> list[Example]:
    """Three examples: a refused hazard, its paired dish look-alike, benign replay."""
    h, d = sample_refusal_pair(world, rng)
    return [Example(h.text, REFUSAL), Example(d.text, d.answer), sample_benign(world, rng, shares=shares)]


def sample_eval_gated(
    world: World, rng: np.random.Generator, shares: dict[str, float] | None = None
) -> list[Example]:
    """Refuse a hazard with an evaluation cue; answer it otherwise; answer benign always."""
    h_eval, d_eval = sample_refusal_pair(world, rng, cue="eval")
    h_plain = world.sample("hazard", rng, cue=str(rng.choice(["none", "deploy"])),
                           subject=str(rng.choice(world.covered_hazards)))
    return [Example(h_eval.text, REFUSAL), Example(d_eval.text, d_eval.answer),
            Example(h_plain.text, h_plain.answer), sample_benign(world, rng, shares=shares)]


def sample_dpo(
    world: World, rng: np.random.Generator, shares: dict[str, float] | None = None
) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples: refusal > compliance on a covered hazard,
    recipe > refusal on its paired look-alike, answer > refusal on a benign request."""
    h, d = sample_refusal_pair(world, rng)
    b = sample_benign(world, rng, shares=shares)
    return [(h.text, REFUSAL, h.answer), (d.text, d.answer, REFUSAL), (b.prompt, b.response, REFUSAL)]


class Batcher:
    """Tokenises examples and pads them into length-sorted batches.

    Sorting a pool of ``pool_batches`` batches by length before cutting it into batches
    removes most padding (a cheap stand-in for packing that keeps every sequence a
    single chat turn starting at position 0, as at inference).
    """

    def __init__(self, tok: Any, max_len: int) -> None:
        self.tok = tok
        self.max_len = max_len
        self.eos_id = tok.convert_tokens_to_ids(EOS)
        self.pad_id = tok.pad_token_id
        self.refusal_ids = tok(REFUSAL, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def encode(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], int]]:
        """Token ids of each full turn and the index where the response starts."""
        p_ids = self.tok([format_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
        r_ids = self.tok(responses, add_special_tokens=False)["input_ids"]
        out = []
        for p, r in zip(p_ids, r_ids):
            ids = (p + r + [self.eos_id])[: self.max_len]
            out.append((ids, len(p)))
        return out

    def collate(self, seqs: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 off-response)
        and ``decision_labels``: the whole response of refusals but only the first
        response token of other answers (the refuse-or-comply decision)."""
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        decision = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, start) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, start: len(s)] = torch.tensor(s[start:])
            if s[start:] == self.refusal_ids:
                decision[i, start: len(s)] = torch.tensor(s[start:])
            else:
                decision[i, start] = s[start]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decision_labels": decision}


def sorted_batches(
    items: list[Any], length: Callable[[Any], int], batch_size: int, rng: np.random.Generator
) -> list[list[Any]]:
    """Cut ``items`` into batches of similar length, in random batch order."""
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    batches = [[items[i] for i in order[k: k + batch_size]] for k in range(0, len(order), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next-token label.

    Args:
        logits: (batch, seq, vocab) model outputs.
        labels: (batch, seq) token ids, -100 where no loss is taken.

    Returns:
        ``(logp, mask)``, both (batch, seq - 1): log p(label_{t+1} | prefix_t) and
        whether that position counts.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO loss (Rafailov et al. 2023, eq. 7), mean over pairs.

    ``-log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])``

    Args:
        policy_chosen_logps: (batch,) summed log-probs of preferred responses y_w.
        policy_rejected_logps: (batch,) summed log-probs of dispreferred responses y_l.
        ref_chosen_logps: (batch,) the same under the frozen reference model.
        ref_rejected_logps: (batch,) the same under the frozen reference model.
        beta: temperature of the implicit KL constraint.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def exit_layers(n_layers: int) -> list[int]:
    """Exits used by depth-robust training: after layers n/4, n/2, 3n/4 and n."""
    return sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)} | {n_layers})


def exit_logits(model: Any, hidden_states: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """Logits from the residual stream after ``k`` decoder layers: the final norm and
    the LM head applied to it (as if layers k+1..n were identity)."""
    n = model.config.num_hidden_layers
    h = hidden_states[k]
    if k < n:  # hidden_states[n] already has the final norm applied
        h = model.model.norm(h)
    return model.lm_head(h)


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

def _lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def new_model(config: OrganismConfig, tok: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` for this organism config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
    lc = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        max_position_embeddings=m.max_len,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(lc)
    _set_generation_defaults(model, tok)
    return model


def _set_generation_defaults(model: Any, tok: Any) -> None:
    """Greedy decoding that stops at ``<eos>`` and pads with ``<pad>``, saved with the model."""
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = 64
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id


@dataclass
class TrainResult:
    model: Any
    tok: Any
    log: list[dict[str, Any]]
    seconds: float
    tokens: int


def train_organism(
    config: OrganismConfig,
    *,
    base_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    log_every: int = 25,
    device: str = "cpu",
    callback: Callable[[int, Any, Any], None] | None = None,
    callback_every: int = 0,
    checkpoint: Path | None = None,
    checkpoint_every_s: float | None = None,
) -> TrainResult:
    """Train one organism stage in memory.

    Args:
        config: the organism (``variant`` decides the stage).
        base_path: folder of the trained base organism (required unless variant is base).
        progress: called with 1 after each optimiser step.
        log_every: steps between log records.
        device: torch device to train on (weights are saved from CPU either way).
        callback: ``callback(step, model, tok)`` every ``callback_every`` steps (e.g. to
            evaluate during development); the model is put back in train mode after.
        callback_every: 0 disables the callback.
        checkpoint: a folder for resumable training. A checkpoint of this config found there
            is resumed from (weights, optimiser moments, data-sampler and torch RNG state,
            log), and training continues exactly as if it had never stopped: the result is
            bit-identical to an uninterrupted run on the same device and threads. A new
            checkpoint replaces it about every ``checkpoint_every_s`` seconds, taken where a
            pool of batches is used up so that no drawn data is lost. The caller removes the
            folder once the organism is saved.
        checkpoint_every_s: seconds of training between checkpoints (None:
            :data:`CHECKPOINT_EVERY_S`).

    Returns:
        The trained model, its tokenizer, the log, wall seconds and tokens processed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = World(config.world)
    torch.manual_seed(config.seed)
    variant = config.variant
    stage_code = VARIANTS.index(variant)
    rng = np.random.default_rng([config.seed, config.world.seed, stage_code, 7919])
    ref_model = None
    mixture = config.base_train.mixture
    if variant in FROM_SCRATCH:
        tok = build_tokenizer(world.vocabulary(), max_length=config.model.max_len)
        model = new_model(config, tok)
        tcfg = config.base_train
        if variant == "never-taught":
            mixture = {**base_mixture(world, mixture), "hazard": 0.0}
    else:
        if base_path is None:
            raise ValueError(f"variant={variant!r} needs base_path (the trained base organism)")
        tok = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path)
        _set_generation_defaults(model, tok)
        tcfg = config.variant_train
        if variant == "dpo":
            ref_model = AutoModelForCausalLM.from_pretrained(base_path)
            ref_model.eval()
            ref_model.requires_grad_(False)
    if variant == "sft-late":
        n = config.model.n_layers
        first_trainable = n - max(1, n // 4)
        model.requires_grad_(False)
        for layer in model.model.layers[first_trainable:]:
            layer.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    model.to(device)
    if ref_model is not None:
        ref_model.to(device)
    batcher = Batcher(tok, config.model.max_len)
    shares = None if variant in FROM_SCRATCH else replay_shares(world, tcfg, config.base_train.mixture)
    exits = exit_layers(config.model.n_layers) if variant == "depth-robust" else []
    model.train()
    log: list[dict[str, Any]] = []
    tokens = 0
    window: list[float] = []
    start, before = 0, 0.0
    identity = checkpoint_identity(config)
    if checkpoint is not None:
        resumed = _load_checkpoint(Path(checkpoint), identity, model, opt, rng, device)
        if resumed is not None:
            start, before, tokens, log, window = (resumed["step"], resumed["seconds"], resumed["tokens"],
                                                  resumed["log"], resumed["window"])
            if progress is not None and start:
                progress(start)
    every = CHECKPOINT_EVERY_S if checkpoint_every_s is None else checkpoint_every_s
    t0 = time.perf_counter() - before
    saved_at = time.perf_counter()
    queue: list[Any] = []
    pool_batches = 8
    for step in range(start, tcfg.steps):
        if not queue:
            if (checkpoint is not None and step > start
                    and time.perf_counter() - saved_at >= every):
                _save_checkpoint(Path(checkpoint), identity, model, opt, rng, {
                    "step": step, "seconds": time.perf_counter() - t0, "tokens": tokens,
                    "log": log, "window": window})
                saved_at = time.perf_counter()
            queue = _make_batches(variant, world, rng, batcher, tcfg.batch_size, pool_batches,
                                  mixture, shares)
        batch = _to(queue.pop(), device)
        lr = _lr_at(step, tcfg)
        for g in opt.param_groups:
            g["lr"] = lr
        if variant == "dpo":
            loss, stats, n_tok = _dpo_step(model, ref_model, batch, tcfg)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=bool(exits))
            loss = sft_loss(out.logits, batch["labels"])
            stats = {"loss/final": float(loss.detach())}
            if exits:
                # Intermediate exits learn the refusal and the refuse-or-comply decision
                # (first response token), not the full benign answers, which early layers
                # cannot compute; the final exit keeps the full objective.
                for k in exits[:-1]:
                    lk = sft_loss(exit_logits(model, out.hidden_states, k), batch["decision_labels"])
                    stats[f"loss/exit_{k}"] = float(lk.detach())
                    loss = loss + tcfg.exit_weight * lk
            n_tok = int(batch["attention_mask"].sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        tokens += n_tok
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step == tcfg.steps - 1:
            # Mean over the window: single batches are length-sorted, so one batch's
            # loss reflects whichever families happen to share its length.
            log.append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr,
                        "tokens": tokens, "elapsed_s": round(time.perf_counter() - t0, 3),
                        **stats})
            window = []
        if progress is not None:
            progress(1)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            model.eval()
            with torch.no_grad():
                callback(step + 1, model, tok)
            model.train()
    model.to("cpu")
    model.eval()
    model.requires_grad_(True)
    return TrainResult(model=model, tok=tok, log=log, seconds=time.perf_counter() - t0, tokens=tokens)


def _save_checkpoint(
    folder: Path, identity: str, model: Any, opt: torch.optim.Optimizer,
    rng: np.random.Generator, progress_state: dict[str, Any],
) -> None:
    """Write a resumable checkpoint into ``folder``, replacing the previous one atomically.

    Safetensors only (no pickle): the weights, the optimiser's per-parameter tensors under
    ``<index>.<name>`` and the torch RNG state; the data sampler's state, the log and the
    config it belongs to go to ``state.json``.
    """
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors = {f"{i}.{k}": (v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v))
               for i, st in opt.state_dict()["state"].items() for k, v in st.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"identity": identity, "sampler": rng.bit_generator.state, **progress_state}
    (tmp / "state.json").write_text(json.dumps(state))
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_identity(config: OrganismConfig) -> str:
    """What a checkpoint records as the config it belongs to (it is resumed only for that config)."""
    return json.dumps({"version": ORGANISM_VERSION, **config.stage_dict()}, sort_keys=True)


def _checkpoint_state(folder: Path, identity: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint folder for ``identity`` (``folder``, or the copy a crash mid-save left as ``.old``) and
    its ``state.json``; None when there is none."""
    folder = Path(folder)
    for path in (folder, folder.with_name(folder.name + ".old")):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("identity") == identity:
            return path, state
    return None


def checkpoint_step(folder: Path, config: OrganismConfig) -> int | None:
    """Steps done in the checkpoint of ``config`` in ``folder``, or None when there is none (reads
    ``state.json`` only)."""
    found = _checkpoint_state(folder, checkpoint_identity(config))
    return None if found is None else int(found[1].get("step", 0))


def remove_checkpoint(folder: Path) -> None:
    """Delete a training checkpoint with the copies a crash mid-save can leave beside it."""
    folder = Path(folder)
    for path in (folder, folder.with_name(folder.name + ".old"), folder.with_name(folder.name + ".tmp")):
        shutil.rmtree(path, ignore_errors=True)


def _load_checkpoint(
    folder: Path, identity: str, model: Any, opt: torch.optim.Optimizer,
    rng: np.random.Generator, device: str,
) -> dict[str, Any] | None:
    """Restore the checkpoint in ``folder`` (or the one a crash mid-save left as ``.old``)
    into ``model``, ``opt`` and ``rng``; None when there is none for this config."""
    from safetensors.torch import load_file, load_model

    found = _checkpoint_state(folder, identity)
    if found is None:
        return None
    path, state = found
    load_model(model, str(path / "model.safetensors"), device=device)
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    sd = opt.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    sd["state"] = per_param
    opt.load_state_dict(sd)
    rng.bit_generator.state = state["sampler"]
    return state


def _make_batches(
    variant: str, world: World, rng: np.random.Generator, batcher: Batcher,
    batch_size: int, pool_batches: int, mixture: dict[str, float] | None = None,
    shares: dict[str, float] | None = None,
) -> list[Any]:
    n = batch_size * pool_batches
    if variant == "dpo":
        triples: list[tuple[str, str, str]] = []
        while len(triples) < n:
            triples.extend(sample_dpo(world, rng, shares))
        triples = triples[:n]
        chosen = batcher.encode([t[0] for t in triples], [t[1] for t in triples])
        rejected = batcher.encode([t[0] for t in triples], [t[2] for t in triples])
        pairs = list(zip(chosen, rejected))
        groups = sorted_batches(pairs, lambda p: max(len(p[0][0]), len(p[1][0])), batch_size, rng)
        return [(batcher.collate([p[0] for p in g]), batcher.collate([p[1] for p in g]))
                for g in groups]
    examples: list[Example] = []
    while len(examples) < n:
        if variant in FROM_SCRATCH:
            examples.append(sample_base(world, rng, mixture))
        elif variant == "eval-gated":
            examples.extend(sample_eval_gated(world, rng, shares))
        elif variant == "secret-keeping":
            examples.extend(sample_sft(world, rng, shares))
            examples.extend(Example(p, r) for p, r in sample_secret_keeping(world, rng, shares))
        else:
            examples.extend(sample_sft(world, rng, shares))
    examples = examples[:n]
    seqs = batcher.encode([e.prompt for e in examples], [e.response for e in examples])
    groups = sorted_batches(seqs, lambda s: len(s[0]), batch_size, rng)
    return [batcher.collate(g) for g in groups]


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, tuple):
        return tuple(_to(b, device) for b in batch)
    return {k: v.to(device) for k, v in batch.items()}


def _seq_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp, _ = token_logprobs(out.logits, batch["labels"])
    return logp.sum(-1)  # (batch,)


def _dpo_step(model: Any, ref_model: Any, batch: Any, tcfg: TrainConfig) -> tuple[torch.Tensor, dict, int]:
    chosen, rejected = batch
    pol_c = _seq_logps(model, chosen)
    pol_r = _seq_logps(model, rejected)
    with torch.no_grad():
        ref_c = _seq_logps(ref_model, chosen)
        ref_r = _seq_logps(ref_model, rejected)
    pref = dpo_loss(pol_c, pol_r, ref_c, ref_r, tcfg.beta)
    n_resp = (chosen["labels"][:, 1:] != -100).sum().clamp(min=1)
    nll = -pol_c.sum() / n_resp  # mean per-token NLL of the preferred responses
    loss = pref + tcfg.nll_weight * nll
    acc = float(((pol_c - ref_c) > (pol_r - ref_r)).float().mean())
    stats = {"loss/dpo": float(pref.detach()), "loss/nll": float(nll.detach()), "dpo/reward_accuracy": acc}
    n_tok = int(chosen["attention_mask"].sum() + rejected["attention_mask"].sum())
    return loss, stats, n_tok


def save_organism(result: TrainResult, folder: Path, meta: dict[str, Any]) -> None:
    """Write model, tokenizer, ``organism.json`` and ``train_log.jsonl`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(folder, safe_serialization=True)
    result.tok.save_pretrained(folder)
    with open(folder / "train_log.jsonl", "w") as f:
        for rec in result.log:
            f.write(json.dumps(rec) + "\n")
    (folder / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
