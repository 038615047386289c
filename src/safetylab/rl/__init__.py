"""Reinforcement learning pieces: a hazard-navigation task, a CBF safety shield,
batched PPO, and a Stable-Baselines3 path through the Gymnasium API."""

from safetylab.rl.nav import BatchNavEnv, NavConfig, NavEnv, evaluate_policies
from safetylab.rl.ppo import PPOConfig, PPOResult, compute_gae, train_ppo
from safetylab.rl.shield import CBFShield, ShieldWrapper, cbf_constraints, cbf_project

__all__ = [
    "BatchNavEnv",
    "CBFShield",
    "NavConfig",
    "NavEnv",
    "PPOConfig",
    "PPOResult",
    "ShieldWrapper",
    "cbf_constraints",
    "cbf_project",
    "compute_gae",
    "evaluate_policies",
    "train_ppo",
]
