"""CBF shield: safety, minimal intervention, exact projection (property tests)."""

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from safetylab.rl import BatchNavEnv, CBFShield, NavConfig, NavEnv, ShieldWrapper, cbf_constraints, cbf_project

coord = st.floats(-0.98, 0.98, allow_nan=False)
unit = st.floats(-1.0, 1.0, allow_nan=False)
hazard = st.tuples(st.floats(-0.8, 0.8), st.floats(-0.8, 0.8), st.floats(0.05, 0.35))


@st.composite
def safe_state(draw, margin_max=0.1):
    """A position outside every hazard grown by the margin, plus hazards, margin, gamma, action."""
    hazards = np.asarray(draw(st.lists(hazard, min_size=1, max_size=5)))
    margin = draw(st.floats(0.0, margin_max))
    pos = np.array([draw(coord), draw(coord)])
    d = np.hypot(*(pos[None] - hazards[:, :2]).T)
    if np.any(d < hazards[:, 2] + margin):
        # Push the point out radially from the hazard that contains it, then re-check all.
        i = int(np.argmin(d - hazards[:, 2] - margin))
        direction = (pos - hazards[i, :2]) / max(d[i], 1e-9) if d[i] > 1e-9 else np.array([1.0, 0.0])
        pos = hazards[i, :2] + direction * (hazards[i, 2] + margin + draw(st.floats(0.0, 0.05)))
    pos = np.clip(pos, -1.0, 1.0)
    d = np.hypot(*(pos[None] - hazards[:, :2]).T)
    assume(np.all(d >= hazards[:, 2] + margin))
    gamma = draw(st.sampled_from([1.0, 0.5, 0.2]))
    action = np.array([draw(unit), draw(unit)])
    return pos, hazards, margin, gamma, action


def _shield(margin, gamma):
    return CBFShield(margin=margin, gamma=gamma, step_size=0.05, arena_half_width=1.0)


@settings(max_examples=400, deadline=None)
@given(safe_state())
# On the hazard's edge, a tiny step inwards once passed a 1e-9 feasibility tolerance unchanged.
@example((np.array([0.0, 0.0]), np.array([[0.0, 0.125, 0.125]]), 0.0, 1.0, np.array([0.0, 5.96046448e-08])))
def test_shielded_step_never_enters_a_hazard(state):
    pos, hazards, margin, gamma, action = state
    u, _ = _shield(margin, gamma).filter(pos[None], hazards[None], action[None])
    assert np.all(np.abs(u) <= 1.0 + 1e-12), "projected action must respect the action bounds"
    nxt = pos + 0.05 * u[0]
    assert np.all(np.abs(nxt) <= 1.0 + 1e-12), "the shield keeps the agent inside the arena"
    d = np.hypot(*(nxt[None] - hazards[:, :2]).T)
    assert np.all(d >= hazards[:, 2]), "entered a hazard"
    assert np.all(d >= hazards[:, 2] + margin - 1e-9), "left the safe set (hazard grown by the margin)"


@settings(max_examples=300, deadline=None)
@given(safe_state())
def test_safe_action_passes_unchanged_and_projection_is_optimal(state):
    pos, hazards, margin, gamma, action = state
    G, b = cbf_constraints(pos[None], hazards[None], margin=margin, gamma=gamma, step_size=0.05,
                           arena_half_width=1.0)
    u, feasible = cbf_project(action[None], G, b)
    assert feasible[0]
    if np.all(G[0] @ action >= b[0]):
        assert np.array_equal(u[0], action), "an already-safe action must pass unchanged"
    # Exactness: no feasible point is closer than the QP answer (checked against SLSQP).
    cons = [{"type": "ineq", "fun": lambda x, g=g, c=c: g @ x - c} for g, c in zip(G[0], b[0])]
    ref = minimize(lambda x: np.sum((x - action) ** 2), np.zeros(2), jac=lambda x: 2 * (x - action),
                   constraints=cons, method="SLSQP", options={"ftol": 1e-12, "maxiter": 200})
    if ref.success and np.all(G[0] @ ref.x >= b[0] - 1e-9):
        assert np.sum((u[0] - action) ** 2) <= np.sum((ref.x - action) ** 2) + 1e-7


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 0.3]))
def test_shielded_episodes_never_touch_a_hazard(seed, gamma):
    """Forward invariance over whole episodes: random (often hazard-seeking) actions, batched."""
    cfg = NavConfig(clearance=0.02)
    shield = CBFShield(margin=0.02, gamma=gamma)
    env = BatchNavEnv(cfg, [seed, seed + 1, seed + 2, seed + 3])
    env.reset()
    rng = np.random.default_rng(seed)
    for _ in range(120):
        towards = env.hazards[:, 0, :2] - env.pos  # aim at the first hazard, plus noise
        a = np.clip(towards / np.linalg.norm(towards, axis=1, keepdims=True) + rng.normal(0, 0.5, (4, 2)), -1, 1)
        out = env.step(shield(env.pos, env.hazards, a))
        assert not out["in_hazard"].any()


def test_wrapper_projects_inside_step_and_reports_correction():
    env = ShieldWrapper(NavEnv(NavConfig(start_jitter=0.0)), CBFShield())
    env.reset(seed=0)
    corrections = []
    for _ in range(60):
        proposed = np.array([1.0, 1.0], dtype=np.float32)  # straight at the hazard on the diagonal
        _, _, term, trunc, info = env.step(proposed)
        assert not info["in_hazard"]
        corrections.append(info["shield_correction"])
        if term or trunc:
            break
    assert max(corrections) > 0.1, "the straight path is unsafe, so the shield must have intervened"
    assert min(corrections) == 0.0, "far from hazards the shield must not touch the action"


def test_signal_penalty_and_shield_probability():
    base = NavEnv(NavConfig(start_jitter=0.0))
    sig = ShieldWrapper(NavEnv(NavConfig(start_jitter=0.0)), CBFShield(), signal_coef=3.0)
    base.reset(seed=0), sig.reset(seed=0)
    shield = CBFShield()
    for _ in range(30):
        a = np.array([1.0, 1.0])
        u = shield(base.unwrapped.pos[None], base.unwrapped.hazards[None], a[None])[0]
        _, r0, *_ = base.step(u)
        _, r1, *_, info = sig.step(a)
        assert r1 == pytest.approx(r0 - 3.0 * info["shield_correction"])
    off = ShieldWrapper(NavEnv(), CBFShield(), shield_prob=lambda steps: 0.0)
    off.reset(seed=0)
    assert not off.active


def test_invalid_shield_parameters():
    with pytest.raises(ValueError, match="gamma"):
        CBFShield(gamma=0.0)
    with pytest.raises(ValueError, match="margin"):
        CBFShield(margin=-0.1)
