"""Training through Stable-Baselines3 PPO, the field's reference implementation.

The same task and shield as :mod:`safetylab.rl.ppo`, but through the Gymnasium API:
``NavEnv`` → :class:`~safetylab.rl.shield.ShieldWrapper` (projects inside ``step``,
so SB3's rollout buffer keeps the action the policy proposed and its log-probability)
→ :class:`TrainingStats` (records what happened per episode). One seed at a time,
as SB3 runs; this is the baseline the batched trainer is checked and timed against.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from safetylab.rl.nav import NavConfig, NavEnv
from safetylab.rl.ppo import PPOConfig
from safetylab.rl.shield import CBFShield, ShieldWrapper


class TrainingStats(gym.Wrapper):
    """Counts steps and records every finished episode as
    ``(end_step, return, success, hazard_steps, interventions)``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.total_steps = 0
        self.episodes: list[tuple[int, float, bool, int, int]] = []
        self._ret, self._haz, self._int = 0.0, 0, 0

    def reset(self, **kwargs: Any):
        self._ret, self._haz, self._int = 0.0, 0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.total_steps += 1
        self._ret += float(reward)
        self._haz += int(info.get("in_hazard", False))
        self._int += int(info.get("shield_correction", 0.0) > 1e-9)
        if term or trunc:
            self.episodes.append((self.total_steps, self._ret, bool(term), self._haz, self._int))
        return obs, reward, term, trunc, info


def make_env(
    nav: NavConfig,
    *,
    shield: CBFShield | None = None,
    signal_coef: float = 0.0,
    shield_prob: Callable[[int], float] | None = None,
    seed: int = 0,
) -> TrainingStats:
    """The Gymnasium env an SB3 learner sees: task, optional shield, statistics."""
    env: gym.Env = NavEnv(nav)
    if shield is not None:
        env = ShieldWrapper(env, shield, signal_coef=signal_coef, shield_prob=shield_prob, seed=seed)
    return TrainingStats(env)


def train_sb3(
    nav: NavConfig,
    seed: int,
    total_steps: int,
    ppo: PPOConfig | None = None,
    *,
    shield: CBFShield | None = None,
    signal_coef: float = 0.0,
    shield_prob: Callable[[float], float] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train one seed with ``stable_baselines3.PPO("MlpPolicy")``.

    Hyperparameters come from ``ppo`` (its defaults are SB3's); SB3 uses one
    environment, so ``ppo.envs_per_seed`` is ignored and ``n_steps = rollout_steps``.

    Args:
        nav: the task.
        seed: SB3's seed (network init, action noise, environment).
        total_steps: environment steps.
        ppo: hyperparameters.
        shield: if given, wraps the env in a :class:`ShieldWrapper`.
        signal_coef: reward subtracted per unit of shield correction.
        shield_prob: probability that an episode is shielded, as a function of the
            fraction of training done; ``None`` = always.

    Returns:
        ``(model, stats)``: the SB3 model and a dict like one seed of
        :class:`~safetylab.rl.ppo.PPOResult` (``curves``, ``hazard_steps``,
        ``hazard_episodes``, ``episodes``, ``interventions``).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import Logger

    ppo = ppo if ppo is not None else PPOConfig()
    prob = None if shield_prob is None else (lambda steps: shield_prob(steps / total_steps))
    env = make_env(nav, shield=shield, signal_coef=signal_coef, shield_prob=prob, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=ppo.rollout_steps,
        batch_size=ppo.minibatch_size,
        n_epochs=ppo.n_epochs,
        learning_rate=ppo.learning_rate,
        gamma=ppo.gamma,
        gae_lambda=ppo.gae_lambda,
        clip_range=ppo.clip_range,
        ent_coef=ppo.ent_coef,
        vf_coef=ppo.vf_coef,
        max_grad_norm=ppo.max_grad_norm,
        policy_kwargs={"net_arch": {"pi": [ppo.hidden] * 2, "vf": [ppo.hidden] * 2}},
        seed=int(seed),
        device="cpu",
        verbose=0,
    )
    # SB3's default logger makes an empty tempdir/SB3-<time> folder on every learn(), even at
    # verbose=0: one per seed and arm, left behind by every run. A logger with no outputs writes nothing.
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.learn(total_timesteps=total_steps)
    return model, episode_stats(env, ppo.rollout_steps, total_steps)


def episode_stats(env: TrainingStats, rollout_steps: int, total_steps: int) -> dict[str, Any]:
    """Bin the recorded episodes into rollouts, in the format of the batched trainer."""
    n_rollouts = math.ceil(total_steps / rollout_steps)
    curves = []
    eps = env.episodes
    for k in range(n_rollouts):
        lo, hi = k * rollout_steps, (k + 1) * rollout_steps
        inside = [e for e in eps if lo < e[0] <= hi]
        n = len(inside)
        curves.append({
            "steps": hi,
            "return_mean": round(float(np.mean([e[1] for e in inside])), 4) if n else None,
            "success_rate": round(float(np.mean([e[2] for e in inside])), 4) if n else None,
            "episodes": n,
            "hazard_steps": int(sum(e[3] for e in inside)),
            "interventions": int(sum(e[4] for e in inside)),
        })
    # Steps of an unfinished last episode are not in ``episodes``; count them from the wrappers.
    return {
        "curves": curves,
        "hazard_steps": int(sum(c["hazard_steps"] for c in curves)) + env._haz,
        "hazard_episodes": int(sum(e[3] > 0 for e in eps)),
        "episodes": len(eps),
        "interventions": int(sum(c["interventions"] for c in curves)) + env._int,
    }


def sb3_act_fn(models: list[Any], rng: np.random.Generator | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Batched policy over several SB3 models: obs (S, B, d) → (S, B, 2).

    With ``rng`` = None the mean action (SB3's ``deterministic=True``); with a generator,
    a sample from each model's Gaussian with noise from ``rng`` (not torch's global state).
    """
    import torch

    def act(obs: np.ndarray) -> np.ndarray:
        if rng is None:
            return np.stack([m.predict(o, deterministic=True)[0] for m, o in zip(models, obs)])
        out = []
        for m, o in zip(models, obs):
            with torch.no_grad():
                dist = m.policy.get_distribution(torch.as_tensor(o, dtype=torch.float32)).distribution
                mean, std = dist.mean.numpy(), dist.stddev.numpy()
            out.append(mean + std * rng.standard_normal(mean.shape))
        return np.stack(out)

    return act
