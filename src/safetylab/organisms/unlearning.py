"""Unlearning the forbidden domain from an organism: gradient ascent and RMU.

Two methods that try to *remove* a capability rather than hide it behind a refusal, the
contrast the elicitation study draws with safety training. Both train the organism in
place on a *forget* stream -- hazard requests answered with their procedures, every hazard
of the world, training templates -- and a *retain* stream of benign requests (the world's
benign families), so that the organism stays usable:

``gradient_ascent``
    Maximise the next-token loss on the forget stream while minimising it on the retain
    stream (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in
    Language Models"; Yao et al. 2023, "Large Language Model Unlearning"):
    ``L = -min(NLL_forget, cap) + NLL_retain``. The cap stops the ascent once the forget
    loss passes ``cap`` nats per token (an unbounded ascent only destroys the model).
``rmu``
    Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark",
    section 5): at one layer ``l``, steer the residual stream of every forget token to a
    fixed random direction ``c u`` (``u`` uniform in [0, 1)^d, normalised) and keep the
    retain tokens' residual stream where the frozen model puts it:
    ``L = mean ||h_l(forget) - c u||^2 + alpha mean ||h_l(retain) - h_l^frozen(retain)||^2``
    (squared distances averaged over the width), training only the MLPs of layers
    ``l-2..l`` as the paper does. The paper sets ``c`` by hand per model; here it is
    ``scale`` times the mean norm of the frozen model's forget activations at layer ``l``,
    so the same setting works at every organism size.

Both are measured by what follows them: whether the organism still produces the procedures
(exact grading), whether a linear probe still reads the hazard from its activations, and
whether a few steps of fine-tuning on other hazards bring the capability back (Lynch et al.
2024, "Eight Methods to Evaluate Robust Unlearning in LLMs"; Deeb & Roger 2024).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import numpy as np
import torch

from safetylab.organisms.train import Batcher, Example, sample_benign, sft_loss
from safetylab.organisms.world import World

Method = Literal["gradient-ascent", "rmu"]
METHODS: tuple[str, ...] = ("gradient-ascent", "rmu")


def forget_examples(world: World, n: int, rng: np.random.Generator) -> list[Example]:
    """``n`` hazard requests (any hazard, training templates) answered with their procedure."""
    out = []
    for _ in range(n):
        r = world.sample("hazard", rng)
        out.append(Example(r.text, r.answer))
    return out


def retain_examples(world: World, n: int, rng: np.random.Generator) -> list[Example]:
    """``n`` benign requests of the world's families with their answers."""
    return [sample_benign(world, rng) for _ in range(n)]


def _batch(batcher: Batcher, examples: list[Example]) -> dict[str, torch.Tensor]:
    return batcher.collate(batcher.encode([e.prompt for e in examples], [e.response for e in examples]))


def gradient_ascent(model: Any, tok: Any, world: World, *, steps: int, lr: float, batch_size: int,
                    rng: np.random.Generator, cap: float = 8.0, grad_clip: float = 1.0) -> dict[str, Any]:
    """Unlearn the hazard domain by gradient ascent on its procedures (in place).

    Args:
        model: an organism (all parameters train).
        tok: its tokenizer.
        world: the organism's world.
        steps: optimiser steps (AdamW, constant ``lr``).
        lr: learning rate.
        batch_size: forget examples per step (as many retain examples).
        rng: data order.
        cap: the ascent stops pushing a batch once its forget loss exceeds this (nats/token).
        grad_clip: global gradient-norm clip.

    Returns:
        ``{"method", "steps", "forget_loss", "retain_loss", "seconds"}`` (losses: per step).
    """
    t0 = time.perf_counter()
    batcher = Batcher(tok, model.config.max_position_embeddings)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    forget, retain = [], []
    for _ in range(steps):
        fb = _batch(batcher, forget_examples(world, batch_size, rng))
        rb = _batch(batcher, retain_examples(world, batch_size, rng))
        lf = sft_loss(model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits, fb["labels"])
        lr_ = sft_loss(model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits, rb["labels"])
        loss = -torch.clamp(lf, max=cap) + lr_
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        forget.append(round(float(lf.detach()), 4))
        retain.append(round(float(lr_.detach()), 4))
    model.eval()
    return {"method": "gradient-ascent", "steps": steps, "forget_loss": forget, "retain_loss": retain,
            "seconds": round(time.perf_counter() - t0, 3)}


def rmu(model: Any, tok: Any, world: World, *, layer: int, steps: int, lr: float, batch_size: int,
        rng: np.random.Generator, scale: float = 2.0, alpha: float = 10.0) -> dict[str, Any]:
    """Unlearn the hazard domain by representation misdirection at ``layer`` (in place).

    Args:
        model: a Llama-style organism (``model.model.layers[i].mlp``).
        tok: its tokenizer.
        world: the organism's world.
        layer: 0-based decoder layer whose output is steered (``layers.{layer}.resid_post``).
        steps: optimiser steps (AdamW, constant ``lr``) on the MLPs of layers ``layer-2..layer``.
        lr: learning rate.
        batch_size: forget examples per step (as many retain examples).
        rng: data order and the random direction ``u``.
        scale: ``c`` = scale x the frozen model's mean forget-activation norm at ``layer``.
        alpha: weight of the retain term.

    Returns:
        ``{"method", "layer", "steps", "c", "forget_loss", "retain_loss", "seconds"}``.

    Raises:
        ValueError: ``layer`` outside the model's decoder layers.
    """
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"rmu layer={layer} but the model has {n_layers} decoder layers; use 0..{n_layers - 1}")
    t0 = time.perf_counter()
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    batcher = Batcher(tok, model.config.max_position_embeddings)
    model.requires_grad_(False)
    params = [p for i in range(max(0, layer - 2), layer + 1) for p in model.model.layers[i].mlp.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    u = torch.as_tensor(rng.random(model.config.hidden_size), dtype=torch.float32)
    u = u / u.norm()

    def resid(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[layer + 1]  # (batch, seq, d_model): after decoder layer `layer`

    with torch.no_grad():
        fb = _batch(batcher, forget_examples(world, batch_size, rng))
        c = scale * float(resid(frozen, fb).norm(dim=-1)[fb["attention_mask"].bool()].mean())
    model.train()
    forget, retain = [], []
    for _ in range(steps):
        fb = _batch(batcher, forget_examples(world, batch_size, rng))
        rb = _batch(batcher, retain_examples(world, batch_size, rng))
        hf = resid(model, fb)
        hr = resid(model, rb)
        with torch.no_grad():
            hr0 = resid(frozen, rb)
        lf = ((hf - c * u) ** 2).mean(-1)[fb["attention_mask"].bool()].mean()
        lr_ = ((hr - hr0) ** 2).mean(-1)[rb["attention_mask"].bool()].mean()
        loss = lf + alpha * lr_
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        forget.append(round(float(lf.detach()), 4))
        retain.append(round(float(lr_.detach()), 6))
    model.eval()
    model.requires_grad_(True)
    return {"method": "rmu", "layer": layer, "steps": steps, "c": round(c, 4), "forget_loss": forget,
            "retain_loss": retain, "seconds": round(time.perf_counter() - t0, 3)}
