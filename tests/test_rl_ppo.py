"""Batched PPO: GAE against SB3's buffer, per-seed independence, learning, SB3 path."""

import numpy as np
import pytest
import torch
from gymnasium import spaces

from safetylab.rl import CBFShield, NavConfig, PPOConfig, compute_gae, evaluate_policies, train_ppo
from safetylab.rl.ppo import SeedBatchedActorCritic, _clip_grad_norm_per_seed
from safetylab.study import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: one thread avoids oversubscription on a shared 2-core machine.
    with torch_threads(1):
        yield


def test_compute_gae_by_hand():
    # One env, 3 steps, episode ends after step 1 (index 1).
    r = np.array([[1.0], [2.0], [3.0]])
    v = np.array([[0.5], [1.0], [1.5]])
    d = np.array([[0.0], [1.0], [0.0]])
    adv, ret = compute_gae(r, v, d, np.array([2.0]), gamma=0.9, gae_lambda=0.8)
    a2 = 3.0 + 0.9 * 2.0 - 1.5
    a1 = 2.0 - 1.0  # terminal: no bootstrap, no carry-over
    a0 = (1.0 + 0.9 * 1.0 - 0.5) + 0.9 * 0.8 * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2])
    np.testing.assert_allclose(ret, adv + v)


def test_compute_gae_matches_stable_baselines3():
    from stable_baselines3.common.buffers import RolloutBuffer

    rng = np.random.default_rng(0)
    T, n = 16, 3
    r, v = rng.normal(size=(T, n)), rng.normal(size=(T, n))
    dones = (rng.random((T, n)) < 0.2).astype(float)
    last_v = rng.normal(size=n)
    buf = RolloutBuffer(T, spaces.Box(-1, 1, (1,)), spaces.Box(-1, 1, (1,)), device="cpu",
                        gae_lambda=0.95, gamma=0.99, n_envs=n)
    for t in range(T):
        start = np.zeros(n) if t == 0 else dones[t - 1]  # SB3 marks the *next* obs as an episode start
        buf.add(np.zeros((n, 1)), np.zeros((n, 1)), r[t], start, torch.as_tensor(v[t]), torch.zeros(n))
    buf.compute_returns_and_advantage(torch.as_tensor(last_v), dones[-1])
    adv, ret = compute_gae(r, v, dones, last_v, 0.99, 0.95)
    np.testing.assert_allclose(adv, buf.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, buf.returns, rtol=1e-5, atol=1e-5)


def test_compute_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="last_values"):
        compute_gae(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(3), 0.99, 0.95)


def test_seed_batched_networks_are_independent_copies():
    net = SeedBatchedActorCritic([5, 6, 7], obs_dim=4, act_dim=2)
    alone = SeedBatchedActorCritic([6], obs_dim=4, act_dim=2)
    obs = torch.randn(3, 10, 4)
    mean, value = net(obs)
    mean1, value1 = alone(obs[1:2])
    torch.testing.assert_close(mean[1:2], mean1)
    torch.testing.assert_close(value[1:2], value1)
    # Log-density equals torch's Normal; gradients of seed 0's loss touch only seed 0.
    a = torch.randn(3, 10, 2)
    ref = torch.distributions.Normal(mean, net.log_std.exp()[:, None, :]).log_prob(a).sum(-1)
    torch.testing.assert_close(net.log_prob(a, mean), ref)
    net(obs)[1][0].sum().backward()
    assert net.vf_w[0].grad[1:].abs().sum() == 0 and net.vf_w[0].grad[0].abs().sum() > 0


def test_per_seed_gradient_clipping_matches_torch():
    params = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 2))]
    grads = [torch.randn(3, 4, 5) * torch.tensor([0.01, 1.0, 10.0])[:, None, None], torch.randn(3, 2)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    _clip_grad_norm_per_seed(params, 0.5)
    for s in range(3):
        ref = [torch.nn.Parameter(torch.zeros_like(g[s])) for g in grads]
        for p, g in zip(ref, grads):
            p.grad = g[s].clone()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.grad[s], r.grad)


def test_batched_ppo_learns_and_shield_hides_the_hazard():
    """A few thousand steps: shielded training never touches a hazard, learns to reach the goal,
    and the policy goes through hazards once the shield is gone."""
    nav = NavConfig(clearance=0.02)
    shield = CBFShield(margin=0.02)
    res = train_ppo(nav, [0, 1], 16384, PPOConfig(), shield=shield)
    assert res.hazard_steps == [0, 0]
    assert all(i > 0 for i in res.interventions)
    first = np.mean([c[0]["success_rate"] or 0.0 for c in res.curves])
    last = np.mean([c[-1]["success_rate"] for c in res.curves])
    assert last > first + 0.3, (first, last)
    ev_on = evaluate_policies(nav, res.model.act_deterministic, 2, list(range(8)), shield=shield)
    ev_off = evaluate_policies(nav, res.model.act_deterministic, 2, list(range(8)))
    assert np.sum(ev_on["hazard_steps"]) == 0
    assert np.mean(np.asarray(ev_off["hazard_steps"]) > 0) > 0.5


def test_sb3_trains_through_the_wrapper_and_stores_its_own_proposal(tmp_path, monkeypatch):
    import tempfile

    from safetylab.rl.sb3 import sb3_act_fn, train_sb3

    nav = NavConfig(clearance=0.02)
    shield = CBFShield(margin=0.02)
    ppo = PPOConfig(rollout_steps=1024, n_epochs=2)
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, stats = train_sb3(nav, 0, 2048, ppo, shield=shield)
    assert not list(tmp_path.glob("SB3-*"))  # SB3's default logger leaves an SB3-<time> folder
    assert stats["hazard_steps"] == 0 and stats["interventions"] > 0
    assert len(stats["curves"]) == 2 and stats["episodes"] > 0
    ev = evaluate_policies(nav, sb3_act_fn([model]), 1, list(range(4)), shield=shield)
    assert np.sum(ev["hazard_steps"]) == 0

    # The learner stores what it proposed: record what SB3 sends into the shielded env and
    # compare with its rollout buffer; where the shield corrected, the buffer must hold the
    # proposal (which differs from what the environment executed).
    import gymnasium as gym
    from stable_baselines3 import PPO

    from safetylab.rl.sb3 import make_env

    class Recorder(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.sent, self.corr = [], []

        def step(self, action):
            out = self.env.step(action)
            self.sent.append(np.array(action, dtype=np.float64))
            self.corr.append(out[4]["shield_correction"])
            return out

    rec = Recorder(make_env(nav, shield=shield))
    learner = PPO("MlpPolicy", rec, n_steps=512, batch_size=64, n_epochs=1, seed=0, device="cpu")
    learner.learn(512)
    stored = np.clip(learner.rollout_buffer.actions.reshape(-1, 2), -1, 1)
    np.testing.assert_allclose(stored, np.asarray(rec.sent[-512:]), atol=1e-6)
    assert max(rec.corr[-512:]) > 0, "the shield must have corrected some proposals"
