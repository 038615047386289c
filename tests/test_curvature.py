"""Hessian-vector products and Lanczos against the dense Hessian of tiny models; line search; bounds."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from safetylab.metrics.curvature import (
    boundary_distance,
    cosine_similarity,
    dense_hessian,
    flatten,
    functional_loss,
    gradient,
    hvp_fn,
    lanczos_top_eigenvalues,
    step_bound,
    trainable_params,
    unflatten,
)


def _mlp_problem(seed: int = 0):
    """A 10 -> 12 -> 3 tanh MLP (171 parameters) with a cross-entropy loss on fixed data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x = torch.randn(40, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))

    def loss(forward, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(forward(xb), yb)

    params = trainable_params(model)
    return model, functional_loss(model, loss, (x, y)), params


def _llama_problem():
    """A tiny random Llama (eager attention); only its RMSNorm weights vary (160 parameters), so the
    Hessian runs through attention, MLPs and the LM head but stays small enough to form densely."""
    import transformers as tf

    from safetylab.lm.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", n_layers=2)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))  # away from all-ones, where some curvature vanishes
    ids = torch.randint(3, 99, (4, 12))

    def loss(forward, batch):
        out = forward(input_ids=batch, labels=batch)
        return out.loss

    params = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    return model, functional_loss(model, loss, ids), params


PROBLEMS = {"mlp": _mlp_problem, "llama-norms": _llama_problem}


@functools.cache
def _with_hessian(name):
    """The problem and its dense Hessian, formed once per test session."""
    _, f, params = PROBLEMS[name]()
    return f, params, dense_hessian(f, params)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hvp_matches_dense_hessian(problem, mode):
    f, params, H = _with_hessian(problem)
    n = H.shape[0]
    assert 100 <= n <= 400
    assert torch.allclose(H, H.T, atol=1e-8)
    hv = hvp_fn(f, params, mode)
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = torch.from_numpy(rng.standard_normal(n))
        assert torch.allclose(hv(v), H @ v, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_lanczos_top_eigenvalues_match_dense(problem):
    f, params, H = _with_hessian(problem)
    exact = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1]
    res = lanczos_top_eigenvalues(hvp_fn(f, params), H.shape[0], k=5, n_iter=60, return_vectors=True)
    assert np.allclose(res.eigenvalues, exact[:5], rtol=1e-6, atol=1e-9)
    assert max(res.residuals) < 1e-6
    # Ritz vectors are eigenvectors: H v = lambda v.
    v = res.vectors[0].double()
    assert torch.allclose(H @ v, res.eigenvalues[0] * v, atol=1e-5)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-5)


def _plain_lanczos(d: np.ndarray, m: int) -> np.ndarray:
    """Textbook three-term Lanczos on diag(d), no reorthogonalisation: Ritz values, largest first."""
    q = np.random.default_rng(0).standard_normal(d.size)
    q /= np.linalg.norm(q)
    q_prev, beta, alphas, betas = np.zeros_like(q), 0.0, [], []
    for _ in range(m):
        w = d * q - beta * q_prev
        alpha = w @ q
        w -= alpha * q
        beta = np.linalg.norm(w)
        alphas.append(alpha)
        betas.append(beta)
        q_prev, q = q, w / beta
    T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    return np.sort(np.linalg.eigvalsh(T))[::-1]


def test_lanczos_gives_each_converged_eigenvalue_once():
    """Two dominant eigenvalues and 80 iterations, long after they converged: plain Lanczos in floating
    point grows ghost copies of them; with full reorthogonalisation each appears once and the third
    Ritz value is the bulk's largest."""
    d = np.concatenate([[100.0, 50.0], np.linspace(0, 1, 198)])
    assert _plain_lanczos(d, 80)[1] > 99.0  # a ghost of 100
    t = torch.from_numpy(d)
    res = lanczos_top_eigenvalues(lambda v: t * v.double(), 200, k=3, n_iter=80)
    assert np.allclose(res.eigenvalues[:2], [100.0, 50.0])
    assert res.eigenvalues[2] < 1.0 + 1e-6
    with pytest.raises(ValueError, match="at least k"):
        lanczos_top_eigenvalues(lambda v: v, 10, k=5, n_iter=3)


def test_lanczos_runs_to_a_stated_residual():
    """Five leading eigenvalues close together above a bulk: 10 iterations converge none of the
    lower ones (their residuals are as large as their errors, ~1 here); run to a residual
    tolerance, every one of the five is within it and matches the exact spectrum."""
    d = np.concatenate([[10.0, 9.0, 8.5, 8.2, 8.0], np.linspace(0, 7.5, 395)])
    t = torch.from_numpy(d)
    few = lanczos_top_eigenvalues(lambda v: t * v.double(), d.size, k=5, n_iter=10)
    assert not few.converged and few.tol is None
    assert min(few.residuals[3:]) > 0.1 and abs(few.eigenvalues[4] - 8.0) > 0.5
    res = lanczos_top_eigenvalues(lambda v: t * v.double(), d.size, k=5, n_iter=200, tol=1e-6)
    assert res.converged and res.tol == 1e-6 and res.n_iter < 200
    assert max(res.residuals) <= 1e-6 * res.eigenvalues[0]
    # an eigenvalue lies within each residual of its Ritz value (here the error is far smaller still)
    assert np.allclose(res.eigenvalues, [10.0, 9.0, 8.5, 8.2, 8.0], atol=1e-5)
    capped = lanczos_top_eigenvalues(lambda v: t * v.double(), d.size, k=5, n_iter=12, tol=1e-6)
    assert not capped.converged and capped.n_iter == 12  # ran out of iterations: says so
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        lanczos_top_eigenvalues(lambda v: v, 10, k=2, n_iter=5, tol=0.0)


def test_flatten_roundtrip_and_gradient():
    _, f, params = _mlp_problem()
    flat = flatten(params)
    back = unflatten(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    g = gradient(f, params)
    eps = 1e-6
    e = torch.zeros_like(flat)
    e[7] = eps
    numeric = (f(unflatten(flat + e, params)) - f(unflatten(flat - e, params))) / (2 * eps)
    assert math.isclose(float(g[7]), float(numeric), rel_tol=1e-5, abs_tol=1e-9)
    with pytest.raises(ValueError, match="entries"):
        unflatten(flat[:-1], params)


def test_boundary_distance_brackets_the_exit():
    calls = []

    def inside(t):
        calls.append(t)
        return t < 1.3

    res = boundary_distance(inside, first_step=0.1, bisections=8)
    assert res.inside < 1.3 <= res.outside
    assert abs(res.distance - 1.3) < 0.01
    assert all((t < 1.3) == ok for t, ok in res.probes)
    never = boundary_distance(lambda t: True, first_step=1.0, max_distance=100.0)
    assert math.isinf(never.distance) and never.inside == 64.0
    with pytest.raises(ValueError):
        boundary_distance(lambda t: True, first_step=0.0)


def test_step_bound_and_cosine():
    assert step_bound(0.5, 10.0) == 0.05
    assert step_bound(1.0, 0.0) == math.inf
    assert math.isnan(step_bound(-1.0, 1.0))
    a = torch.tensor([1.0, 0.0])
    assert cosine_similarity(a, torch.tensor([0.0, 2.0])) == 0.0
    assert cosine_similarity(a, -3 * a) == -1.0
    assert math.isnan(cosine_similarity(a, torch.zeros(2)))
