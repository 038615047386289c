"""PPO that trains many independent seeds at once: rollout → GAE → clipped update.

Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with
generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438). The
details and defaults follow Stable-Baselines3's ``PPO("MlpPolicy")`` (Raffin et al.
2021, JMLR 22:268) so that the two can be compared seed for seed: separate 64-64
tanh policy and value networks, orthogonal init (gains √2, 0.01, 1), a
state-independent log-std starting at 0, 2048 samples per update, minibatches of
64, 10 epochs, Adam (lr 3e-4, eps 1e-5), clip 0.2, advantage normalisation per
minibatch, value bootstrap on time-limit truncation, gradient-norm clip 0.5.
See also CleanRL's ``ppo_continuous_action.py`` (Huang et al. 2022) for the same
loop written out.

What is different is only the batching: every weight tensor has a leading seed
dimension, ``(n_seeds, fan_in, fan_out)``, and one ``bmm`` evaluates all seeds'
networks. Losses are summed over seeds; Adam is element-wise and the gradient norm
is clipped per seed, so seeds do not interact — training 40 seeds in one process is
40 independent PPO runs. The environments of all seeds (``envs_per_seed`` each)
step as one :class:`~safetylab.rl.nav.BatchNavEnv`, and the shield projects all
their actions in one vectorised QP.

The learner stores the action it *proposed* and its log-probability; the shield's
correction is applied to what the environment receives only (the essay's setup:
the agent is never told).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safetylab.rl.nav import BatchNavEnv, NavConfig
from safetylab.rl.shield import CBFShield


class PPOConfig(BaseModel):
    """PPO hyperparameters (defaults = Stable-Baselines3's PPO defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    rollout_steps: int = Field(2048, ge=1)
    """Samples per seed per update (SB3 n_steps × n_envs)."""
    envs_per_seed: int = Field(8, ge=1)
    """Environments per seed stepped in parallel; each runs rollout_steps / envs_per_seed steps."""
    minibatch_size: int = Field(64, ge=1)
    """Samples per gradient step."""
    n_epochs: int = Field(10, ge=1)
    """Passes over each rollout."""
    learning_rate: float = Field(3e-4, gt=0)
    """Adam step size (constant)."""
    gamma: float = Field(0.99, gt=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE λ."""
    clip_range: float = Field(0.2, gt=0)
    """PPO ratio clip ε."""
    ent_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    vf_coef: float = Field(0.5, ge=0)
    """Value-loss weight."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Per-seed gradient-norm clip."""
    hidden: int = Field(64, ge=1)
    """Width of both hidden layers of the policy and value networks."""

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if self.rollout_steps % self.envs_per_seed:
            raise ValueError(
                f"rollout_steps={self.rollout_steps} is not divisible by envs_per_seed={self.envs_per_seed}; "
                "choose envs_per_seed among its divisors"
            )
        if self.minibatch_size > self.rollout_steps:
            raise ValueError(
                f"minibatch_size={self.minibatch_size} exceeds rollout_steps={self.rollout_steps}; lower it"
            )
        return self


# ----------------------------------------------------------------------------- GAE


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_values: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets (Schulman et al. 2016, eq. 16).

    ``delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t)`` and
    ``A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}``; returns ``A + V``.
    Time-limit truncation is handled by the caller, which adds ``gamma V(s_final)``
    to the reward of the truncated step (as SB3 does) and marks it done.

    Args:
        rewards: (T, ...) rewards.
        values: (T, ...) value estimates of the observations the actions were taken in.
        dones: (T, ...) 1 where the episode ended with step t, else 0.
        last_values: (...) value of the observation after the last step.
        gamma: discount in (0, 1].
        gae_lambda: λ in [0, 1].

    Returns:
        ``(advantages, returns)``, both shaped like ``rewards``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    dones = np.asarray(dones, dtype=np.float64)
    if not (rewards.shape == values.shape == dones.shape):
        raise ValueError(f"rewards {rewards.shape}, values {values.shape} and dones {dones.shape} must match")
    if np.shape(last_values) != rewards.shape[1:]:
        raise ValueError(f"last_values has shape {np.shape(last_values)}; expected {rewards.shape[1:]}")
    adv = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1:])
    next_value = np.asarray(last_values, dtype=np.float64)
    for t in reversed(range(rewards.shape[0])):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        running = delta + gamma * gae_lambda * nonterminal * running
        adv[t] = running
        next_value = values[t]
    return adv, adv + values


# ----------------------------------------------------------------------------- networks


class SeedBatchedActorCritic(torch.nn.Module):
    """``n_seeds`` independent copies of SB3's default MlpPolicy, evaluated with bmm.

    Args:
        seeds: one integer per copy; copy ``i``'s initial weights depend on ``seeds[i]`` only.
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden width (two tanh layers for the policy, two for the value).
    """

    def __init__(self, seeds: list[int], obs_dim: int, act_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_seeds = len(seeds)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        sizes_pi = [(obs_dim, hidden, math.sqrt(2)), (hidden, hidden, math.sqrt(2)), (hidden, act_dim, 0.01)]
        sizes_vf = [(obs_dim, hidden, math.sqrt(2)), (hidden, hidden, math.sqrt(2)), (hidden, 1, 1.0)]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.pi_w = torch.nn.ParameterList([self._ortho(gens, i, o, g) for i, o, g in sizes_pi])
        self.pi_b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(self.n_seeds, 1, o)) for _, o, _ in sizes_pi])
        self.vf_w = torch.nn.ParameterList([self._ortho(gens, i, o, g) for i, o, g in sizes_vf])
        self.vf_b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(self.n_seeds, 1, o)) for _, o, _ in sizes_vf])
        self.log_std = torch.nn.Parameter(torch.zeros(self.n_seeds, act_dim))

    def _ortho(self, gens: list[torch.Generator], fan_in: int, fan_out: int, gain: float) -> torch.nn.Parameter:
        w = torch.empty(self.n_seeds, fan_in, fan_out)
        for s, g in enumerate(gens):
            block = torch.empty(fan_out, fan_in)
            torch.nn.init.orthogonal_(block, gain=gain, generator=g)
            w[s] = block.T
        return torch.nn.Parameter(w)

    @staticmethod
    def _mlp(x: torch.Tensor, ws: torch.nn.ParameterList, bs: torch.nn.ParameterList) -> torch.Tensor:
        for k, (w, b) in enumerate(zip(ws, bs)):
            x = torch.baddbmm(b, x, w)  # (S, B, fan_out)
            if k < len(ws) - 1:
                x = torch.tanh(x)
        return x

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (S, B, obs_dim) → action mean (S, B, act_dim) and value (S, B)."""
        return self._mlp(obs, self.pi_w, self.pi_b), self._mlp(obs, self.vf_w, self.vf_b)[..., 0]

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self._mlp(obs, self.vf_w, self.vf_b)[..., 0]

    def log_prob(self, actions: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Diagonal-Gaussian log-density summed over action dims: (S, B)."""
        log_std = self.log_std[:, None, :]
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Per-seed entropy of the Gaussian: (S,)."""
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)

    def act_deterministic(self, obs: np.ndarray) -> np.ndarray:
        """Mean actions for evaluation: obs (S, B, obs_dim) → (S, B, act_dim)."""
        with torch.no_grad():
            return self._mlp(torch.as_tensor(obs, dtype=torch.float32), self.pi_w, self.pi_b).numpy()

    def act_stochastic(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Actions sampled from each seed's Gaussian policy, as in training: (S, B, act_dim).

        The noise comes from ``rng`` (not torch's global generator), so an evaluation
        is reproducible and independent of what ran before it.
        """
        mean = self.act_deterministic(obs)
        with torch.no_grad():
            std = torch.exp(self.log_std).numpy()[:, None, :]  # (S, 1, act_dim)
        return mean + std * rng.standard_normal(mean.shape).astype(np.float32)


# ----------------------------------------------------------------------------- training


@dataclass
class PPOResult:
    """What training leaves behind, per seed.

    Attributes:
        model: the trained networks (leading dimension = seeds).
        curves: per seed, one dict per rollout: ``steps``, ``return_mean`` (None if
            no episode ended), ``success_rate``, ``hazard_steps``, ``episodes``,
            ``interventions`` (shield corrections > 1e-9).
        hazard_steps: per seed, steps that ended inside a hazard over all of training.
        hazard_episodes: per seed, training episodes with at least one such step.
        episodes: per seed, training episodes completed.
        interventions: per seed, steps where the shield changed the action.
    """

    model: SeedBatchedActorCritic
    curves: list[list[dict[str, Any]]] = field(default_factory=list)
    hazard_steps: list[int] = field(default_factory=list)
    hazard_episodes: list[int] = field(default_factory=list)
    episodes: list[int] = field(default_factory=list)
    interventions: list[int] = field(default_factory=list)


def env_seed(seed: int, env_index: int) -> int:
    """Seed of environment ``env_index`` of training seed ``seed`` (shared with the SB3 path)."""
    return int(np.random.SeedSequence([int(seed), int(env_index)]).generate_state(1)[0])


def train_ppo(
    nav: NavConfig,
    seeds: list[int],
    total_steps: int,
    ppo: PPOConfig | None = None,
    *,
    shield: CBFShield | None = None,
    signal_coef: float = 0.0,
    shield_prob: Callable[[float], float] | None = None,
    progress: Callable[[float], None] | None = None,
    layouts: np.ndarray | None = None,
) -> PPOResult:
    """Train one PPO agent per seed, all in one batch.

    Args:
        nav: the task (its ``hazard_penalty`` is the arm's penalty).
        seeds: one integer per independent run.
        total_steps: environment steps per seed (rounded up to whole rollouts).
        ppo: hyperparameters.
        shield: if given, actions are projected before the environment sees them.
        signal_coef: reward subtracted per unit of shield correction.
        shield_prob: probability that an episode is shielded, as a function of the
            fraction of training done (annealing); ``None`` = always shielded.
        progress: called with the number of updates done after each update.
        layouts: optional (n_seeds, n_hazards, 3) hazard layout of each seed (all its
            environments share it); ``None`` = ``nav.hazards`` for every seed.

    Returns:
        A :class:`PPOResult`.
    """
    ppo = ppo if ppo is not None else PPOConfig()
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; must be >= 1")
    S, E = len(seeds), ppo.envs_per_seed
    T = ppo.rollout_steps // E
    n_updates = math.ceil(total_steps / ppo.rollout_steps)
    obs_dim, act_dim = nav.obs_dim, 2

    # One generator per seed-chunk for action noise, shield coins and minibatch order.
    chunk_seq = np.random.SeedSequence([int(s) for s in seeds])
    torch_gen = torch.Generator().manual_seed(int(chunk_seq.generate_state(1)[0]))
    coin = np.random.default_rng(chunk_seq.spawn(1)[0])

    model = SeedBatchedActorCritic(seeds, obs_dim, act_dim, ppo.hidden)
    # Adam is element-wise, so one optimiser over the seed-stacked tensors is S independent ones.
    opt = torch.optim.Adam(model.parameters(), lr=ppo.learning_rate, eps=1e-5, fused=True)
    copy_layouts = None if layouts is None else np.repeat(np.asarray(layouts, np.float64), E, axis=0)
    env = BatchNavEnv(nav, [env_seed(s, e) for s in seeds for e in range(E)], copy_layouts)  # copy = s * E + e
    obs = env.reset()
    shielded = np.ones(S * E, dtype=bool) if shield is not None else np.zeros(S * E, dtype=bool)
    if shield is not None and shield_prob is not None:
        shielded = coin.random(S * E) < shield_prob(0.0)

    ep_return = np.zeros(S * E)
    totals = {k: np.zeros(S, dtype=np.int64) for k in ("hazard_steps", "hazard_episodes", "episodes", "interventions")}
    ep_hazard = np.zeros(S * E, dtype=bool)
    curves: list[list[dict[str, Any]]] = [[] for _ in range(S)]

    buf_obs = torch.zeros(T, S, E, obs_dim)
    buf_act = torch.zeros(T, S, E, act_dim)
    buf_logp = torch.zeros(T, S, E)
    buf_val = np.zeros((T, S, E))
    buf_rew = np.zeros((T, S, E))
    buf_done = np.zeros((T, S, E))
    seed_idx = torch.arange(S)[:, None]

    for update in range(n_updates):
        roll = {k: np.zeros(S) for k in ("return_sum", "episodes", "success", "hazard_steps", "interventions")}
        # ---- 1. rollout: all seeds × envs step together
        for t in range(T):
            obs_t = torch.as_tensor(obs).view(S, E, obs_dim)
            with torch.no_grad():
                mean, value = model(obs_t)
                noise = torch.randn(mean.shape, generator=torch_gen)
                action = mean + torch.exp(model.log_std)[:, None, :] * noise  # (S, E, A), what the learner proposed
                logp = model.log_prob(action, mean)
            proposed = np.clip(action.numpy().reshape(S * E, act_dim).astype(np.float64), -1.0, 1.0)
            applied, correction = proposed, np.zeros(S * E)
            if shielded.any():
                idx = np.flatnonzero(shielded)
                u, corr = shield.filter(env.pos[idx], env.hazards[idx], proposed[idx])
                applied = proposed.copy()
                applied[idx], correction[idx] = u, corr
            out = env.step(applied)
            reward = out["reward"] - signal_coef * correction
            seen_reward = reward
            done = out["terminated"] | out["truncated"]
            if out["truncated"].any():
                # Time-limit bootstrap (SB3 on_policy_algorithm.collect_rollouts): r += gamma V(s_final).
                tr = out["truncated"]
                with torch.no_grad():
                    v_final = model.value(torch.as_tensor(out["final_obs"]).view(S, E, obs_dim)).numpy().reshape(-1)
                reward = reward + ppo.gamma * v_final * tr
            buf_obs[t], buf_act[t], buf_logp[t] = obs_t, action, logp
            buf_val[t], buf_rew[t], buf_done[t] = value.numpy(), reward.reshape(S, E), done.reshape(S, E)

            # Bookkeeping (per seed): what the environment did, not what the learner saw.
            ep_return += seen_reward
            ep_hazard |= out["in_hazard"]
            per_seed = lambda x: np.asarray(x, dtype=np.float64).reshape(S, E).sum(1)  # noqa: E731
            roll["hazard_steps"] += per_seed(out["in_hazard"])
            roll["interventions"] += per_seed(correction > 1e-9)
            if done.any():
                roll["episodes"] += per_seed(done)
                roll["success"] += per_seed(out["terminated"])
                roll["return_sum"] += per_seed(np.where(done, ep_return, 0.0))
                totals["hazard_episodes"] += per_seed(done & ep_hazard).astype(np.int64)
                ep_return[done], ep_hazard[done] = 0.0, False
                if shield is not None and shield_prob is not None:
                    p = shield_prob((update * ppo.rollout_steps + (t + 1) * E) / (n_updates * ppo.rollout_steps))
                    shielded[done] = coin.random(int(done.sum())) < p
            obs = out["obs"]

        # ---- 2. GAE over the rollout (numpy, (T, S, E))
        with torch.no_grad():
            last_v = model.value(torch.as_tensor(obs).view(S, E, obs_dim)).numpy()
        adv, ret = compute_gae(buf_rew, buf_val, buf_done, last_v, ppo.gamma, ppo.gae_lambda)

        # ---- 3. clipped-surrogate update, minibatches drawn per seed
        N = T * E
        # One (S, N, obs + act + 3) table so that a minibatch is a single gather.
        table = torch.cat([
            buf_obs.permute(1, 0, 2, 3).reshape(S, N, obs_dim),
            buf_act.permute(1, 0, 2, 3).reshape(S, N, act_dim),
            buf_logp.permute(1, 0, 2).reshape(S, N, 1),
            torch.as_tensor(adv, dtype=torch.float32).permute(1, 0, 2).reshape(S, N, 1),
            torch.as_tensor(ret, dtype=torch.float32).permute(1, 0, 2).reshape(S, N, 1),
        ], dim=2)
        a0, a1 = obs_dim, obs_dim + act_dim
        for _ in range(ppo.n_epochs):
            perm = torch.rand(S, N, generator=torch_gen).argsort(dim=1)
            for start in range(0, N, ppo.minibatch_size):
                batch = table[seed_idx, perm[:, start : start + ppo.minibatch_size]]  # (S, mb, cols)
                b_obs, b_act = batch[..., :a0], batch[..., a0:a1]
                b_logp, b_adv, b_ret = batch[..., a1], batch[..., a1 + 1], batch[..., a1 + 2]
                if b_adv.shape[1] > 1:  # SB3 normalises advantages per minibatch
                    b_adv = (b_adv - b_adv.mean(1, keepdim=True)) / (b_adv.std(1, keepdim=True) + 1e-8)
                mean, value = model(b_obs)
                ratio = torch.exp(model.log_prob(b_act, mean) - b_logp)
                surr = torch.minimum(ratio * b_adv, ratio.clamp(1 - ppo.clip_range, 1 + ppo.clip_range) * b_adv)
                policy_loss = -surr.mean(1)  # (S,)
                value_loss = ((b_ret - value) ** 2).mean(1)
                loss = (policy_loss + ppo.vf_coef * value_loss - ppo.ent_coef * model.entropy()).sum()
                opt.zero_grad(set_to_none=False)
                loss.backward()
                _clip_grad_norm_per_seed(list(model.parameters()), ppo.max_grad_norm)
                opt.step()

        # ---- 4. per-seed learning curve point
        steps_done = (update + 1) * ppo.rollout_steps
        for s in range(S):
            n_ep = int(roll["episodes"][s])
            curves[s].append({
                "steps": steps_done,
                "return_mean": round(roll["return_sum"][s] / n_ep, 4) if n_ep else None,
                "success_rate": round(roll["success"][s] / n_ep, 4) if n_ep else None,
                "episodes": n_ep,
                "hazard_steps": int(roll["hazard_steps"][s]),
                "interventions": int(roll["interventions"][s]),
            })
        totals["hazard_steps"] += roll["hazard_steps"].astype(np.int64)
        totals["interventions"] += roll["interventions"].astype(np.int64)
        totals["episodes"] += roll["episodes"].astype(np.int64)
        if progress is not None:
            progress(1)

    return PPOResult(
        model=model,
        curves=curves,
        hazard_steps=totals["hazard_steps"].tolist(),
        hazard_episodes=totals["hazard_episodes"].tolist(),
        episodes=totals["episodes"].tolist(),
        interventions=totals["interventions"].tolist(),
    )


def _clip_grad_norm_per_seed(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale each seed's gradient so that its global L2 norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` applied to every seed separately)."""
    grads = [p.grad for p in params if p.grad is not None]
    n_seeds = grads[0].shape[0]
    sq = sum(g.reshape(n_seeds, -1).pow(2).sum(1) for g in grads)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (S,)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
