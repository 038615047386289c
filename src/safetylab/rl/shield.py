"""A discrete-time control-barrier-function (CBF) shield for the navigation task.

For hazard ``i`` with centre ``c_i`` and radius ``r_i`` the barrier is
``h_i(p) = ||p - c_i||^2 - (r_i + margin)^2`` (``h_i >= 0`` is safe). The
discrete-time CBF condition (Agrawal & Sreenath, RSS 2017, eq. 9) asks
``h_i(p_{t+1}) >= (1 - gamma) h_i(p_t)`` with ``0 < gamma <= 1``. With the
single-integrator step ``p_{t+1} = p_t + step_size * u``,

    h_i(p + d u) = h_i(p) + 2 d (p - c_i) . u + d^2 ||u||^2,

and since ``d^2 ||u||^2 >= 0`` the *linear* condition
``2 d (p - c_i) . u >= -gamma h_i(p)`` is sufficient; it is the usual convex
(QP-friendly) form. Together with the action box ``[-1, 1]^2`` and the arena
walls (``p + d u`` must stay inside, so the environment's clipping never moves the
agent) this gives a convex polygon of safe actions. The shield returns the
minimal-norm correction, i.e. the Euclidean projection of the proposed action onto
that polygon (Ames et al., ECC 2019, the CBF-QP safety filter):

    u* = argmin_u ||u - a||^2   s.t.   G u >= b.

Because ``u`` is 2-D the QP is solved exactly by enumerating active sets: the
optimum is either ``a`` itself, the projection onto one constraint line, or the
intersection of two constraint lines; the feasible candidate nearest to ``a`` is
the optimum. That is vectorised over a batch (all seeds × all environments at once).

``u = 0`` satisfies every constraint whenever the state is safe, so the QP is
always feasible from a safe state and the safe set is forward invariant: a
shielded agent that starts safe never enters a hazard.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable

import gymnasium as gym
import numpy as np

_INWARD = 1e-12  # relative inward shift of the constraint lines that candidates are built on


def cbf_constraints(
    pos: np.ndarray,
    hazards: np.ndarray,
    *,
    margin: float,
    gamma: float,
    step_size: float,
    arena_half_width: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear safe-action constraints ``G u >= b`` for a batch of states.

    Args:
        pos: (n, 2) positions.
        hazards: (n, n_hazards, 3) rows ``(x, y, radius)``.
        margin: safety margin added to every radius (>= 0).
        gamma: DCBF decay rate in (0, 1]; 1 lets the agent reach the margin in one step.
        step_size: distance moved per unit action.
        arena_half_width: the arena is ``[-L, L]^2``.

    Returns:
        ``G`` (n, n_hazards + 4, 2) and ``b`` (n, n_hazards + 4): one row per hazard,
        then ``u_x >= lo_x``, ``u_y >= lo_y``, ``-u_x >= -hi_x``, ``-u_y >= -hi_y``.
    """
    pos = np.asarray(pos, dtype=np.float64)
    hazards = np.asarray(hazards, dtype=np.float64)
    rel = pos[:, None, :] - hazards[:, :, :2]  # (n, H, 2) = p - c_i
    h = rel[..., 0] ** 2 + rel[..., 1] ** 2 - (hazards[:, :, 2] + margin) ** 2  # (n, H)
    # 2 d (p - c).u >= -gamma h  (sufficient discrete-time CBF condition, see module docstring)
    g_haz = 2.0 * step_size * rel
    b_haz = -gamma * h
    lo = np.maximum(-1.0, (-arena_half_width - pos) / step_size)  # (n, 2)
    hi = np.minimum(1.0, (arena_half_width - pos) / step_size)
    n = pos.shape[0]
    eye = np.broadcast_to(np.eye(2), (n, 2, 2))
    G = np.concatenate([g_haz, eye, -eye], axis=1)
    b = np.concatenate([b_haz, lo, -hi], axis=1)
    return G, b


_PAIRS_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    if k not in _PAIRS_CACHE:
        jj, kk = zip(*combinations(range(k), 2))
        _PAIRS_CACHE[k] = (np.asarray(jj), np.asarray(kk))
    return _PAIRS_CACHE[k]


def cbf_project(action: np.ndarray, G: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean projection of 2-D actions onto ``{u : G u >= b}``.

    Args:
        action: (n, 2) proposed actions.
        G: (n, k, 2) constraint normals.
        b: (n, k) constraint offsets.

    Returns:
        ``(u, feasible)``: (n, 2) projected actions and (n,) bool. Where the polygon
        is empty (only possible from an already unsafe state) ``u`` is the candidate
        with the smallest worst-case violation and ``feasible`` is False.
    """
    a = np.asarray(action, dtype=np.float64)
    n, k, _ = G.shape
    u = a.copy()
    feasible = np.ones(n, dtype=bool)
    # Most proposed actions are already safe and pass unchanged; solve the QP only for the rest.
    slack_a = G[..., 0] * a[:, None, 0] + G[..., 1] * a[:, None, 1] - b
    todo = np.flatnonzero(np.any(slack_a < 0, axis=1))  # exact: no tolerance lets an action through
    if todo.size:
        u[todo], feasible[todo] = _project_active_sets(a[todo], G[todo], b[todo])
    return u, feasible


def _project_active_sets(a: np.ndarray, G: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k, _ = G.shape
    gg = G[..., 0] ** 2 + G[..., 1] ** 2
    # Candidates lie on lines moved inwards by far more than rounding (and far less than any
    # tolerance a user sees), so the one chosen satisfies G u >= b exactly, in floating point.
    b_in = b + _INWARD * (np.sqrt(gg) + np.abs(b))
    # Candidate 0: the action itself; candidate 1: no move (exactly safe from any safe state).
    cands = [a[:, None, :], np.zeros_like(a)[:, None, :]]
    # Candidates 2..k+1: projection onto each constraint line.
    ga = G[..., 0] * a[:, None, 0] + G[..., 1] * a[:, None, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(gg > 0, (b_in - ga) / gg, np.nan)
    cands.append(a[:, None, :] + step[..., None] * G)
    # Candidates for each pair of constraints: the vertex where both are tight (Cramer's rule).
    jj, kk = _pairs(k)
    gj, gk, bj, bk = G[:, jj], G[:, kk], b_in[:, jj], b_in[:, kk]
    det = gj[..., 0] * gk[..., 1] - gj[..., 1] * gk[..., 0]
    ok = np.abs(det) > 1e-12
    det = np.where(ok, det, 1.0)
    vx = np.where(ok, (bj * gk[..., 1] - bk * gj[..., 1]) / det, np.nan)
    vy = np.where(ok, (gj[..., 0] * bk - gk[..., 0] * bj) / det, np.nan)
    cands.append(np.stack([vx, vy], axis=-1))
    cand = np.concatenate(cands, axis=1)  # (n, 1 + k + k(k-1)/2, 2)
    slack = (G[:, None, :, 0] * cand[:, :, None, 0] + G[:, None, :, 1] * cand[:, :, None, 1]
             - b[:, None, :]) / (1.0 + np.abs(b)[:, None, :])  # (n, c, k)
    worst = slack.min(axis=2)  # nan where the candidate is undefined
    worst = np.where(np.isnan(worst), -np.inf, worst)
    dist = np.sum((cand - a[:, None, :]) ** 2, axis=2)
    feasible_c = worst >= 0
    score = np.where(feasible_c, dist, np.inf)
    best = np.argmin(score, axis=1)
    feasible = feasible_c[np.arange(n), best]
    if not feasible.all():
        # No safe action exists (state already inside a grown hazard): least violation.
        best = np.where(feasible, best, np.argmax(worst, axis=1))
    u = cand[np.arange(n), best]
    return u, feasible


@dataclass(frozen=True)
class CBFShield:
    """The safety filter: parameters plus a batched :meth:`filter`.

    Attributes:
        margin: distance kept from every hazard edge (arena units).
        gamma: DCBF decay rate in (0, 1]; 1 (default) intervenes only on actions whose
            step would cross into the margin, the essay's 'replace any unsafe action'.
        step_size: the environment's distance per unit action.
        arena_half_width: the environment's arena half width.
    """

    margin: float = 0.02
    gamma: float = 1.0
    step_size: float = 0.05
    arena_half_width: float = 1.0

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin={self.margin} is negative; use margin >= 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} is outside (0, 1]; the DCBF decay rate must lie in (0, 1]")

    def filter(self, pos: np.ndarray, hazards: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project proposed actions onto the safe set.

        Args:
            pos: (n, 2) positions; hazards: (n, n_hazards, 3); action: (n, 2) in [-1, 1].

        Returns:
            ``(safe_action, correction)``: (n, 2) and (n,) ``||safe - proposed||``.
        """
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        G, b = cbf_constraints(
            pos, hazards, margin=self.margin, gamma=self.gamma,
            step_size=self.step_size, arena_half_width=self.arena_half_width,
        )
        u, _ = cbf_project(a, G, b)
        return u, np.sqrt(np.sum((u - a) ** 2, axis=1))

    def __call__(self, pos: np.ndarray, hazards: np.ndarray, action: np.ndarray) -> np.ndarray:
        return self.filter(pos, hazards, action)[0]


class ShieldWrapper(gym.Wrapper):
    """Puts a :class:`CBFShield` between a learner and a :class:`~safetylab.rl.nav.NavEnv`.

    The projection happens inside :meth:`step`, so a learner (e.g. Stable-Baselines3)
    stores the action it proposed and its log-probability, never the corrected one —
    the agent is not told that it was corrected, as in the essay.

    Args:
        env: a ``NavEnv`` (the shield reads its ``pos`` and ``hazards``).
        shield: the filter.
        signal_coef: reward subtracted per unit of correction norm (0 = silent shield).
        shield_prob: probability that an episode is shielded, as a function of the
            number of steps this wrapper has taken (for annealing); ``None`` = always.
        seed: seed of the wrapper's own coin for ``shield_prob`` (kept apart from the
            environment's generator so that shielding never changes the layout draws).
    """

    def __init__(
        self,
        env: gym.Env,
        shield: CBFShield,
        *,
        signal_coef: float = 0.0,
        shield_prob: Callable[[int], float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(env)
        self.shield = shield
        self.signal_coef = float(signal_coef)
        self.shield_prob = shield_prob
        self.total_steps = 0
        self.active = True
        self._coin = np.random.default_rng(seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if self.shield_prob is not None:
            self.active = bool(self._coin.random() < self.shield_prob(self.total_steps))
        obs, info = self.env.reset(seed=seed, options=options)
        info["shield_active"] = self.active
        return obs, info

    def step(self, action):
        base = self.env.unwrapped
        proposed = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        correction = 0.0
        applied = proposed
        if self.active:
            u, corr = self.shield.filter(base.pos[None], base.hazards[None], proposed[None])
            applied, correction = u[0], float(corr[0])
        obs, reward, term, trunc, info = self.env.step(applied)
        self.total_steps += 1
        reward = float(reward) - self.signal_coef * correction
        info.update(shield_correction=correction, shield_active=self.active)
        return obs, reward, term, trunc, info
