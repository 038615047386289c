"""Geometry of a loss around a point in parameter space: gradients, curvature, distances.

The essay "Stability of Safety" pictures safe behaviour as a region ``S`` of parameter
space and asks three things of a point ``theta`` inside it: how the task gradient lines up
with the safety gradient, how curved the safety loss is, and how far the boundary is. A
gradient step ``theta - eta * g`` moves ``eta * ||g||``; every point closer to ``theta``
than ``d(theta, dS)`` (the radius of the largest ball around ``theta`` inside ``S``) is in
``S``, so any single step with

    eta < d(theta, dS) / ||g||                                              (the step bound)

stays inside, whatever direction ``g`` points in.

* **Hessian-vector products** (Pearlmutter 1994) without forming the Hessian:
  ``H v = d/dt grad L(theta + t v)`` at ``t = 0``. :func:`hvp_fn` takes it either as the
  pullback of the gradient (``torch.func.vjp`` of ``torch.func.grad``; ``v^T H = (H v)^T``
  since ``H`` is symmetric) or forward-over-reverse (``torch.func.jvp`` of ``grad``).
* **Lanczos with full reorthogonalisation** (Lanczos 1950; Golub & Van Loan, *Matrix
  Computations*, sec. 10.1; Ghorbani, Krishnan & Xiao 2019 for neural-network spectra):
  ``m`` HVPs build an orthonormal Krylov basis ``Q`` and a tridiagonal ``T = Q^T H Q``
  whose extreme eigenvalues (Ritz values) converge to the extreme eigenvalues of ``H``
  first. Every new vector is orthogonalised against all previous ones (twice, "twice is
  enough", Parlett 1980), which prevents the spurious copies of converged eigenvalues that
  plain Lanczos produces in floating point (:func:`lanczos_top_eigenvalues`). A Ritz pair
  ``(theta_i, y_i = Q s_i)`` has residual ``||H y_i - theta_i y_i|| = |beta_m s_{m,i}|``
  (Golub & Van Loan, Thm. 10.1.1 and eq. 10.1.9), and some eigenvalue of ``H`` lies within that
  residual of ``theta_i``; the iteration stops when every top-k residual is below a stated
  tolerance, so the leading eigenvalue is not the only one that converged (10 iterations on a
  quick organism leave the 4th and 5th residuals as large as the values themselves).
* **Distance to the boundary along a direction** by line search: grow the step
  geometrically until the point leaves ``S``, then bisect between the last step inside and
  the first outside (:func:`boundary_distance`). The minimum over several directions is
  an upper bound on ``d(theta, dS)`` (the true distance is the minimum over *all*
  directions); a step bound computed from it can therefore fail, which is what makes
  checking it worthwhile.

Functions take flat parameter vectors or closures and return Python floats (or lists of
them), following the metrics package's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


# --------------------------------------------------------------------------- flat vectors
def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One 1-D vector from named tensors, in the mapping's order (detached)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors.values()])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    """Named tensors shaped like ``like`` from a flat vector (views into ``vector``)."""
    total = sum(t.numel() for t in like.values())
    if total != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the parameters have {total}")
    out: Params = {}
    i = 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[i: i + n].view_as(t)
        i += n
    return out


def trainable_params(model: torch.nn.Module) -> Params:
    """Detached copies of a module's trainable parameters, by name (the point ``theta``)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def functional_loss(model: torch.nn.Module,
                    loss: Callable[[Callable[..., object], object], torch.Tensor], batch: object) -> LossFn:
    """``params -> loss(forward, batch)``, where ``forward(**inputs)`` runs ``model`` with ``params``
    (``torch.func.functional_call``). Parameters not in ``params`` (frozen ones) and buffers keep
    the module's own values."""
    from torch.func import functional_call

    def f(params: Params) -> torch.Tensor:
        def forward(*args: object, **kwargs: object) -> object:
            return functional_call(model, params, args, kwargs, strict=False)

        return loss(forward, batch)

    return f


def gradient(f: LossFn, params: Params) -> torch.Tensor:
    """Flat gradient of ``f`` at ``params`` (``torch.func.grad``)."""
    from torch.func import grad

    return flatten(grad(f)(params))


def hvp_fn(f: LossFn, params: Params, mode: str = "reverse") -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for the Hessian of ``f`` at ``params``, on flat vectors.

    Args:
        f: scalar loss of named parameters.
        params: the point (named tensors).
        mode: ``reverse`` -- ``torch.func.vjp`` of ``torch.func.grad`` (reverse-over-reverse,
            "double backward"): the gradient's graph is built once and every product is one
            backward pass through it, the fastest on CPU (a quick organism: ~0.25 s per
            product vs ~0.5 s forward); ``forward`` -- ``torch.func.jvp`` of ``grad``
            (forward-over-reverse, Pearlmutter's R-operator), which rebuilds the graph each
            call. Both need attention without fused kernels (``attn_implementation="eager"``):
            PyTorch has no second derivative of its fused CPU attention.
    """
    from torch.func import grad, jvp, vjp

    if mode not in ("forward", "reverse"):
        raise ValueError(f"mode={mode!r}; choose 'forward' or 'reverse'")
    g = grad(f)
    dtype = next(iter(params.values())).dtype
    if mode == "forward":
        def hv_forward(v: torch.Tensor) -> torch.Tensor:
            return flatten(jvp(g, (params,), (unflatten(v.to(dtype), params),))[1])

        return hv_forward
    _, pullback = vjp(g, params)

    def hv_reverse(v: torch.Tensor) -> torch.Tensor:
        return flatten(pullback(unflatten(v.to(dtype), params))[0])

    return hv_reverse


def dense_hessian(f: LossFn, params: Params) -> torch.Tensor:
    """The full (n, n) Hessian of ``f`` at ``params`` (only for tiny models: tests)."""
    flat = flatten(params)

    def g(x: torch.Tensor) -> torch.Tensor:
        return f(unflatten(x, params))

    return torch.autograd.functional.hessian(g, flat, vectorize=True)


# --------------------------------------------------------------------------- Lanczos
@dataclass
class LanczosResult:
    eigenvalues: list[float]
    """Top-k Ritz values, largest first."""
    ritz_values: list[float]
    """Every Ritz value of the final tridiagonal, largest first."""
    residuals: list[float]
    """Residual bound ``|beta_m * s_m|`` of each top-k Ritz pair (0: converged exactly)."""
    n_iter: int
    """HVPs used."""
    converged: bool = False
    """Every top-k residual is at most ``tol * max(|theta_1|, 1e-12)`` (``False`` without a tolerance)."""
    tol: float | None = None
    """The relative residual the iteration ran to (``None``: a fixed number of iterations)."""
    seconds: float = 0.0
    vectors: torch.Tensor | None = None
    """(k, dim) unit Ritz vectors of the top-k values (``return_vectors=True``)."""


def lanczos_top_eigenvalues(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int = 5,
    n_iter: int = 30,
    *,
    rng: np.random.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    return_vectors: bool = False,
    tol: float | None = None,
) -> LanczosResult:
    """Largest ``k`` eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        matvec: ``v -> H v`` on flat vectors of length ``dim`` (e.g. :func:`hvp_fn`).
        dim: size of the operator.
        k: eigenvalues wanted (largest algebraic first).
        n_iter: Krylov dimension m (HVPs), at most ``dim``; with ``tol`` the most iterations
            allowed. Top eigenvalues converge first: m of a few times k is often enough for the
            leading one, not for the k-th.
        tol: stop as soon as every top-k residual is at most ``tol * |theta_1|`` (relative to the
            largest Ritz value); ``None`` runs all ``n_iter``. ``converged`` says whether it was met.
        rng: start vector source (a fixed generator when None, so results repeat).
        dtype: precision of the basis and the tridiagonal (float64: the basis is small).
        return_vectors: also return the top-k Ritz vectors ``Q s_i`` (e.g. the sharpest direction).

    Returns:
        :class:`LanczosResult`; ``residuals[i]`` bounds ``||H y - theta y||`` for Ritz pair i.
    """
    import time

    if k < 1 or dim < 1:
        raise ValueError(f"need k >= 1 and dim >= 1, got k={k}, dim={dim}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol={tol}: the residual tolerance must be > 0 (or None for a fixed n_iter)")
    m = min(n_iter, dim)
    if m < k:
        raise ValueError(f"n_iter={n_iter} < k={k}: Lanczos needs at least k iterations")
    t0 = time.perf_counter()
    rng = rng if rng is not None else np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal(dim)).to(dtype)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = matvec(basis[j].float()).to(dtype)
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        Q = torch.stack(basis)  # (j+1, dim)
        for _ in range(2):  # full reorthogonalisation, twice (Parlett's "twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        if j == m - 1:
            betas.append(beta)
            break
        if beta < 1e-10 * max(1.0, abs(alpha)):
            betas.append(0.0)  # an invariant subspace: the Ritz values are exact
            break
        betas.append(beta)
        if tol is not None and j + 1 >= k and _converged(alphas, betas, k, tol):
            break
        basis.append(w / beta)
    n = len(alphas)
    vals, vecs, resid = _ritz(alphas, betas)
    kk = min(k, n)
    converged = tol is not None and bool(np.all(resid[:kk] <= tol * max(abs(vals[0]), 1e-12)))
    vectors = None
    if return_vectors:
        Q = torch.stack(basis[:n])  # (n, dim)
        vectors = (torch.from_numpy(vecs[:, :kk].T.copy()).to(dtype) @ Q).float()  # (k, dim)
    return LanczosResult(eigenvalues=[float(v) for v in vals[:kk]], ritz_values=[float(v) for v in vals],
                         residuals=[float(r) for r in resid[:kk]], n_iter=n, converged=converged, tol=tol,
                         seconds=time.perf_counter() - t0, vectors=vectors)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (largest first), their vectors in the Krylov basis, and residuals ``|beta_n s_{n,i}|``
    of the tridiagonal built from ``alphas`` and the first ``len(alphas)`` ``betas``."""
    n = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: n - 1], 1) + np.diag(betas[: n - 1], -1)
    vals, vecs = np.linalg.eigh(T)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    last_beta = betas[n - 1] if len(betas) >= n else 0.0
    return vals, vecs, np.abs(last_beta * vecs[-1, :])


def _converged(alphas: list[float], betas: list[float], k: int, tol: float) -> bool:
    vals, _, resid = _ritz(alphas, betas)
    return bool(np.all(resid[:k] <= tol * max(abs(vals[0]), 1e-12)))


# --------------------------------------------------------------------------- directions, distances
def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two flat vectors, in [-1, 1] (nan if either is zero)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(torch.clamp((a.double() @ b.double()) / (na * nb), -1.0, 1.0))


@dataclass
class BoundarySearch:
    distance: float
    """Estimated distance along the direction to the first point outside S (``inf`` when none
    was found up to ``max_distance``); lies between ``inside`` and ``outside``."""
    inside: float
    """Largest probed distance known to be inside S (every probe below it was inside too)."""
    outside: float
    """Smallest probed distance found outside S (``inf`` if none)."""
    probes: list[tuple[float, bool]]
    """Every ``(distance, inside)`` probed, in order."""


def boundary_distance(
    inside: Callable[[float], bool],
    *,
    first_step: float,
    growth: float = 2.0,
    max_distance: float = 1e3,
    bisections: int = 6,
) -> BoundarySearch:
    """Distance to the first exit from S along a ray, by a geometric bracket and bisection.

    Args:
        inside: ``t -> whether theta + t * u is in S`` for a unit direction ``u`` (``inside(0)``
            is assumed true and not probed).
        first_step: first probed distance (> 0).
        growth: factor between bracket probes (> 1).
        max_distance: stop growing here and report ``inf``.
        bisections: halvings of the final bracket ``[inside, outside]``.

    Returns:
        :class:`BoundarySearch`. The bracket finds the first exit on the geometric grid; a
        region that is left and re-entered between two probes is not seen (the estimate is
        then too large, which the step-bound check exposes).
    """
    if not first_step > 0 or not growth > 1:
        raise ValueError(f"need first_step > 0 and growth > 1, got {first_step}, {growth}")
    probes: list[tuple[float, bool]] = []
    lo, hi = 0.0, math.inf
    t = first_step
    while t <= max_distance:
        ok = bool(inside(t))
        probes.append((t, ok))
        if not ok:
            hi = t
            break
        lo = t
        t *= growth
    if math.isinf(hi):
        return BoundarySearch(distance=math.inf, inside=lo, outside=math.inf, probes=probes)
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        ok = bool(inside(mid))
        probes.append((mid, ok))
        if ok:
            lo = mid
        else:
            hi = mid
    return BoundarySearch(distance=0.5 * (lo + hi), inside=lo, outside=hi, probes=probes)


def step_bound(distance: float, grad_norm: float) -> float:
    """The essay's bound on a gradient step size: ``eta < d(theta, dS) / ||grad L||``.

    Returns ``inf`` for a zero gradient (no step moves) and ``nan`` for a negative distance.
    """
    if distance < 0 or math.isnan(distance):
        return math.nan
    if grad_norm <= 0:
        return math.inf
    return float(distance / grad_norm)
