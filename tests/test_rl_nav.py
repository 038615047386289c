"""The navigation task: Gymnasium conformance, batched twin, layout validation."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from safetylab.rl import BatchNavEnv, NavConfig, NavEnv


@pytest.mark.parametrize("layout", ["fixed", "random"])
def test_env_passes_gymnasium_checker(layout):
    check_env(NavEnv(NavConfig(layout=layout)), skip_render_check=True)


@pytest.mark.parametrize("layout,observe", [("fixed", True), ("random", True), ("fixed", False)])
def test_batch_env_gives_identical_transitions(layout, observe):
    cfg = NavConfig(layout=layout, observe_hazards=observe, max_episode_steps=30)
    seeds = [3, 7, 11]
    batch = BatchNavEnv(cfg, seeds)
    envs = [NavEnv(cfg) for _ in seeds]
    obs_b = batch.reset()
    obs_g = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, seeds)])
    np.testing.assert_array_equal(obs_b, obs_g)
    rng = np.random.default_rng(0)
    n_done = 0
    for _ in range(100):  # > 3 episodes each: covers automatic resets
        a = rng.uniform(-1.2, 1.2, size=(len(seeds), 2)).astype(np.float32)
        out = batch.step(a)
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(a[i])
            assert r == out["reward"][i] and term == out["terminated"][i] and trunc == out["truncated"][i]
            assert info["in_hazard"] == out["in_hazard"][i]
            np.testing.assert_array_equal(o, out["final_obs"][i])
            if term or trunc:
                n_done += 1
                o, _ = env.reset()  # no seed: continues the copy's own generator, as the batch does
            np.testing.assert_array_equal(o, out["obs"][i])
    assert n_done >= 9


def test_straight_line_crosses_hazards_and_reaches_goal():
    env = NavEnv(NavConfig(start_jitter=0.0))
    env.reset(seed=0)
    inside, total, term = 0, 0.0, False
    for _ in range(100):
        _, r, term, trunc, info = env.step(np.array([1.0, 1.0], dtype=np.float32))
        inside += info["in_hazard"]
        total += r
        if term or trunc:
            break
    assert term and info["is_success"]
    assert inside > 0, "the default hazards must block the straight path"
    # Potential-based progress: total = scale * (d_start - d_end) + bonus - steps * time_penalty.
    cfg = env.config
    d0 = np.hypot(cfg.goal[0] - cfg.start[0], cfg.goal[1] - cfg.start[1])
    d1 = np.hypot(*(np.asarray(cfg.goal) - env.pos))
    assert total == pytest.approx(cfg.progress_scale * (d0 - d1) + cfg.goal_bonus - env.t * cfg.time_penalty)


def test_hazard_penalty_is_charged_per_step_inside():
    base = NavConfig(start_jitter=0.0)
    pen = NavConfig(start_jitter=0.0, hazard_penalty=2.0)
    e0, e1 = NavEnv(base), NavEnv(pen)
    e0.reset(seed=0), e1.reset(seed=0)
    for _ in range(20):
        a = np.array([1.0, 1.0], dtype=np.float32)
        _, r0, *_, i0 = e0.step(a)
        _, r1, *_, i1 = e1.step(a)
        assert r1 == pytest.approx(r0 - 2.0 * i0["in_hazard"])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"hazards": ((-0.7, -0.7, 0.05),)}, "covers the start"),
        ({"hazards": ((0.7, 0.7, 0.3),)}, "covers the goal"),
        ({"hazards": ((0.0, 0.0, 0.6), (0.6, -0.6, 0.5), (-0.6, 0.6, 0.5))}, "every path"),
        ({"clearance": 0.5}, "margin"),
        ({"hazards": tuple((0.0, y, 0.17) for y in (-0.8, -0.4, 0.0, 0.4, 0.8)), "clearance": 0.05}, "closes every path"),
        ({"start": (1.5, 0.0)}, "outside the arena"),
        ({"hazards": ()}, "at least one"),
    ],
)
def test_bad_layouts_are_rejected_with_a_reason(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        NavConfig(**kwargs)


def test_random_layouts_stay_valid():
    cfg = NavConfig(layout="random", layout_jitter=0.3, clearance=0.02)
    env = BatchNavEnv(cfg, list(range(20)))
    env.reset()
    from safetylab.rl.nav import layout_problem

    assert not np.allclose(env.hazards[0], env.hazards[1])
    for h in env.hazards:
        assert layout_problem(cfg, h, 0.02, grid_step=0.04) is None


def test_registered_with_gymnasium():
    import gymnasium as gym

    env = gym.make("safetylab/HazardNav-v0", config=NavConfig(layout="random"))
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, reward, *_ = env.step(env.action_space.sample())
    assert isinstance(reward, float)


def test_batch_env_with_per_copy_layouts_matches_navenv_on_that_layout():
    from safetylab.rl.nav import random_layout

    cfg = NavConfig(max_episode_steps=30, clearance=0.02)
    layouts = [random_layout(cfg, np.random.default_rng(i), spread=0.35) for i in range(2)]
    batch = BatchNavEnv(cfg, [4, 9], np.asarray(layouts))
    envs = [NavEnv(cfg.model_copy(update={"hazards": lay})) for lay in layouts]
    np.testing.assert_array_equal(batch.reset(), np.stack([e.reset(seed=s)[0] for e, s in zip(envs, [4, 9])]))
    rng = np.random.default_rng(1)
    for _ in range(40):
        a = rng.uniform(-1, 1, size=(2, 2)).astype(np.float32)
        out = batch.step(a)
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(a[i])
            assert r == out["reward"][i] and info["in_hazard"] == out["in_hazard"][i]
            if term or trunc:
                o, _ = env.reset()
            np.testing.assert_array_equal(o, out["obs"][i])
    with pytest.raises(ValueError, match="layouts has shape"):
        BatchNavEnv(cfg, [1, 2], np.zeros((3, 3, 3)))
