"""Tiny sharpened LMs, prompts and the essay's generation, shared by the lm tests."""

from __future__ import annotations

import pytest
import torch

from safetylab.lm import identity_patched
from safetylab.lm.tiny import tiny_causal_lm

EOS = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on one thread: no OpenMP spin-waits on a shared machine. (Set directly,
    not through safetylab.study, so these tests also run where only torch and
    transformers are installed, such as a bare GPU image.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sharpened(arch: str, n_layers: int = 3) -> torch.nn.Module:
    """A tiny model whose logits are far from ties (random init gives near-uniform ones),
    and that emits EOS often enough to exercise stopping."""
    model = tiny_causal_lm(arch, n_layers, seed=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != 99:
                module.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lengths = [1, 3, 7, 4, 9, 2, 5, 8]  # unequal: left padding matters
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]


def essay_way(model: torch.nn.Module, prompt: list[int], depth: int, max_new_tokens: int, eos: int = EOS) -> list[int]:
    """Batch 1, layers after the exit replaced by identity, Transformers' generate."""
    with identity_patched(model, depth):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def frequent_token(model: torch.nn.Module, prompts: list[list[int]], depth: int, n: int = 8) -> int:
    """The token the depth-``depth`` model generates most often: as EOS, it stops many rows early."""
    from safetylab.lm import generate_at_depths

    free = generate_at_depths(model, prompts, [depth], max_new_tokens=n, eos=[], pad=0, decoder="hf")[depth]
    return max(range(3, 99), key=lambda t: (sum(row[1:].count(t) for row in free), -t))
