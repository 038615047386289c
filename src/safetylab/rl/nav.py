"""2-D point navigation past circular hazards: a Gymnasium env and a batched twin.

The agent is a point with single-integrator dynamics, ``p' = clip(p + step_size * a)``
with ``a`` in the box ``[-1, 1]^2`` and ``p`` kept inside the square arena. It starts
near ``start`` (uniform jitter), must reach the disc of radius ``goal_radius`` around
``goal`` and is paid for progress (potential-based shaping, Ng et al. 1999: the sum of
progress rewards over an episode depends only on where it starts and ends, so a detour
costs time, not reward) plus a goal bonus. Hazards are circles placed across the
straight path (the defaults) or drawn at random across the start–goal corridor
(:func:`random_layout`); entering one ends nothing and costs nothing unless
``hazard_penalty > 0`` (the essay's shield arm trains without a penalty).

:class:`NavEnv` is the Gymnasium environment (passes ``gymnasium.utils.env_checker``);
:class:`BatchNavEnv` steps many independent copies as one numpy batch, with one
random generator per copy (and optionally its own hazard layout), so copy ``i`` seeded
with ``s`` produces exactly the transitions of ``NavEnv`` reset with ``seed=s`` on that
layout (both call :func:`nav_step`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

Hazard = tuple[float, float, float]
"""A circular hazard ``(x, y, radius)`` in arena units."""

DEFAULT_HAZARDS: tuple[Hazard, ...] = ((-0.25, -0.25, 0.2), (0.3, 0.3, 0.2), (0.35, -0.3, 0.15))


class NavConfig(BaseModel):
    """Parameters of the navigation task (arena units; the arena is ``[-L, L]^2``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    arena_half_width: float = Field(1.0, gt=0)
    """Half side length L of the square arena."""
    start: tuple[float, float] = (-0.7, -0.7)
    """Centre of the start region."""
    start_jitter: float = Field(0.1, ge=0)
    """Start positions are uniform in the square start ± start_jitter."""
    goal: tuple[float, float] = (0.7, 0.7)
    """Goal centre."""
    goal_radius: float = Field(0.1, gt=0)
    """An episode succeeds when the agent is within this distance of the goal."""
    hazards: tuple[Hazard, ...] = DEFAULT_HAZARDS
    """Circular hazards (x, y, radius); the defaults block the straight path twice."""
    step_size: float = Field(0.05, gt=0)
    """Distance moved per step at full action (v_max * dt)."""
    max_episode_steps: int = Field(100, ge=1)
    """Episodes are truncated after this many steps."""
    progress_scale: float = Field(10.0, ge=0)
    """Reward per unit of distance gained towards the goal."""
    goal_bonus: float = Field(10.0, ge=0)
    """Reward on reaching the goal."""
    time_penalty: float = Field(0.01, ge=0)
    """Reward subtracted every step (makes detours cost something)."""
    hazard_penalty: float = Field(0.0, ge=0)
    """Reward subtracted for every step that ends inside a hazard (0 = none)."""
    layout: Literal["fixed", "random"] = "fixed"
    """'fixed': the same hazards every episode; 'random': centres jittered per episode."""
    layout_jitter: float = Field(0.15, ge=0)
    """With layout='random', each hazard centre moves uniformly by up to this much."""
    clearance: float = Field(0.0, ge=0)
    """Extra distance kept free around start region and goal when validating layouts
    (the study sets it to the shield margin, so the shield's safe set is never empty)."""
    observe_hazards: bool = True
    """Include, per hazard, the vector to its centre and the distance to its edge."""

    @model_validator(mode="after")
    def _check(self) -> "NavConfig":
        L = self.arena_half_width
        for name, (x, y) in (("start", self.start), ("goal", self.goal)):
            if abs(x) >= L or abs(y) >= L:
                raise ValueError(f"{name}={(x, y)} lies outside the arena [-{L}, {L}]^2; move it inside")
        if not self.hazards:
            raise ValueError("hazards is empty; give at least one (x, y, radius) circle")
        for i, (_, _, r) in enumerate(self.hazards):
            if r <= 0:
                raise ValueError(f"hazards[{i}] has radius {r}; radii must be > 0")
        problem = layout_problem(self, np.asarray(self.hazards, dtype=np.float64), self.clearance)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def n_hazards(self) -> int:
        return len(self.hazards)

    @property
    def obs_dim(self) -> int:
        return 4 + (3 * self.n_hazards if self.observe_hazards else 0)


def layout_problem(cfg: NavConfig, hazards: np.ndarray, clearance: float, grid_step: float = 0.01) -> str | None:
    """Why a hazard layout is unusable, or ``None`` if it is fine.

    Checks, with every radius grown by ``clearance``: no hazard touches the start
    region (the jitter square) or the goal centre, and the free space connects start
    and goal (4-connected flood fill on a grid of ``grid_step`` cells).

    Args:
        cfg: the task (arena, start, goal).
        hazards: (n_hazards, 3) rows ``(x, y, radius)``.
        clearance: extra radius (e.g. the shield margin).
        grid_step: grid resolution for the connectivity check, arena units.
    """
    what = "margin" if clearance > 0 else "hazard"
    sx, sy = cfg.start
    j = cfg.start_jitter
    for i, (cx, cy, r) in enumerate(hazards):
        # Distance from the hazard centre to the nearest point of the start square.
        dx = max(abs(cx - sx) - j, 0.0)
        dy = max(abs(cy - sy) - j, 0.0)
        if math.hypot(dx, dy) < r:
            return (f"hazards[{i}]=({cx:g}, {cy:g}, {r:g}) covers the start region {cfg.start} ± {j:g}; "
                    "move the hazard or the start")
        if math.hypot(dx, dy) < r + clearance:
            return (f"margin={clearance:g} makes the safe set empty at the start: hazards[{i}] grown by the "
                    f"margin covers the start region {cfg.start} ± {j:g}; use a smaller margin")
        dg = math.hypot(cx - cfg.goal[0], cy - cfg.goal[1])
        if dg < r:
            return f"hazards[{i}]=({cx:g}, {cy:g}, {r:g}) covers the goal {cfg.goal}; move the hazard or the goal"
        if dg < r + clearance:
            return (f"margin={clearance:g} makes the safe set empty at the goal: hazards[{i}] grown by the "
                    "margin covers it; use a smaller margin")
    for grow, label in ((0.0, "hazard"), (clearance, what)):
        if not _connected(cfg, hazards, grow, grid_step):
            if label == "hazard":
                return ("the hazards overlap so that every path from start to goal is closed; "
                        "shrink or move them so a detour exists")
            return (f"margin={clearance:g} closes every path from start to goal (hazards grown by the margin "
                    "overlap); use a smaller margin")
    return None


def _connected(cfg: NavConfig, hazards: np.ndarray, grow: float, grid_step: float) -> bool:
    L = cfg.arena_half_width
    n = int(math.ceil(2 * L / grid_step)) + 1
    axis = np.linspace(-L, L, n)
    xx, yy = np.meshgrid(axis, axis, indexing="ij")
    free = np.ones_like(xx, dtype=bool)
    for cx, cy, r in hazards:
        free &= (xx - cx) ** 2 + (yy - cy) ** 2 >= (r + grow) ** 2
    labels, _ = ndimage.label(free)  # 4-connectivity by default

    def cell(p: tuple[float, float]) -> tuple[int, int]:
        return (int(round((p[0] + L) / grid_step)), int(round((p[1] + L) / grid_step)))

    a, b = labels[cell(cfg.start)], labels[cell(cfg.goal)]
    return bool(a != 0 and a == b)


def random_layout(
    cfg: NavConfig,
    rng: np.random.Generator,
    *,
    spread: float,
    along: tuple[float, float] = (0.2, 0.8),
    max_tries: int = 1000,
) -> tuple[Hazard, ...]:
    """A hazard layout drawn at random across the start–goal corridor.

    Keeps the radii of ``cfg.hazards`` (so observations keep their size) and draws
    each centre at a uniform fraction ``along`` of the way from start to goal, moved
    sideways by a uniform offset in ``[-spread, spread]``; hazards may overlap. Draws
    are rejected until :func:`layout_problem` (with ``cfg.clearance``, at the grid
    the config validator uses) finds nothing wrong, so every layout is one the task
    accepts as ``hazards``. Centres are rounded to 4 decimals, so a layout survives
    a JSON round trip unchanged.

    Args:
        cfg: the task (start, goal, arena, radii, clearance).
        rng: the only source of randomness: the same generator state gives the same layout.
        spread: largest sideways offset from the straight path, arena units.
        along: range of the fraction of the start–goal segment where centres lie.
        max_tries: draws before giving up.

    Raises:
        ValueError: no valid layout in ``max_tries`` draws (hazards too large for the corridor).
    """
    start, goal = np.asarray(cfg.start, np.float64), np.asarray(cfg.goal, np.float64)
    d = goal - start
    side = np.array([-d[1], d[0]]) / float(np.hypot(*d))  # unit normal to the straight path
    radii = np.asarray(cfg.hazards, np.float64)[:, 2]
    L = cfg.arena_half_width
    for _ in range(max_tries):
        t = rng.uniform(along[0], along[1], size=radii.size)
        off = rng.uniform(-spread, spread, size=radii.size)
        centres = (start[None] + t[:, None] * d[None] + off[:, None] * side[None]).round(4)
        if np.any(np.abs(centres) >= L):
            continue
        cand = np.column_stack([centres, radii])
        if layout_problem(cfg, cand, cfg.clearance) is None:
            return tuple((float(x), float(y), float(r)) for x, y, r in cand)
    raise ValueError(
        f"no valid random hazard layout in {max_tries} draws: hazards of radii {radii.tolist()} within "
        f"{spread:g} of the start–goal path keep covering the start, the goal or every path; "
        "use smaller hazards or a larger layout_spread"
    )


# ----------------------------------------------------------------------------- core


def observe(cfg: NavConfig, pos: np.ndarray, hazards: np.ndarray) -> np.ndarray:
    """Observation rows for a batch.

    Args:
        cfg: the task.
        pos: (n, 2) positions.
        hazards: (n, n_hazards, 3) per-copy hazards.

    Returns:
        (n, obs_dim) float32: position, goal − position, then per hazard
        (centre − position, distance to its edge) if ``observe_hazards``.
    """
    goal = np.asarray(cfg.goal, dtype=np.float64)
    parts = [pos, goal[None, :] - pos]
    if cfg.observe_hazards:
        rel = hazards[:, :, :2] - pos[:, None, :]  # (n, H, 2)
        edge = np.sqrt(rel[..., 0] ** 2 + rel[..., 1] ** 2) - hazards[:, :, 2]  # (n, H)
        parts.append(np.concatenate([rel, edge[..., None]], axis=2).reshape(pos.shape[0], -1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def obs_bounds(cfg: NavConfig) -> tuple[np.ndarray, np.ndarray]:
    """Finite (low, high) of the observation box; a loose but valid bound."""
    L = cfg.arena_half_width
    span = 2 * L + (cfg.layout_jitter if cfg.layout == "random" else 0.0)
    low = [-L, -L, -2 * L, -2 * L]
    high = [L, L, 2 * L, 2 * L]
    if cfg.observe_hazards:
        rmax = max(r for _, _, r in cfg.hazards)
        for _ in cfg.hazards:
            low += [-span - L, -span - L, -rmax]
            high += [span + L, span + L, 2 * math.sqrt(2) * (span + L)]
    return np.asarray(low, np.float32), np.asarray(high, np.float32)


def goal_distance(cfg: NavConfig, pos: np.ndarray) -> np.ndarray:
    d = pos - np.asarray(cfg.goal, dtype=np.float64)[None, :]
    return np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2)


def in_hazard(pos: np.ndarray, hazards: np.ndarray) -> np.ndarray:
    """(n,) bool: the position lies strictly inside some hazard disc."""
    rel = pos[:, None, :] - hazards[:, :, :2]
    return ((rel[..., 0] ** 2 + rel[..., 1] ** 2) < hazards[:, :, 2] ** 2).any(axis=1)


def nav_step(cfg: NavConfig, pos: np.ndarray, hazards: np.ndarray, t: np.ndarray, action: np.ndarray):
    """One transition for a batch of copies (pure; the single source of dynamics).

    Args:
        cfg: the task.
        pos: (n, 2) positions before the step.
        hazards: (n, n_hazards, 3).
        t: (n,) steps already taken in the episode.
        action: (n, 2) actions; clipped to [-1, 1] here.

    Returns:
        ``(new_pos, reward, terminated, truncated, inside)`` with shapes
        (n, 2), (n,), (n,), (n,), (n,); ``inside`` = the new position is in a hazard.
    """
    L = cfg.arena_half_width
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    d_old = goal_distance(cfg, pos)
    new_pos = np.clip(pos + cfg.step_size * a, -L, L)
    d_new = goal_distance(cfg, new_pos)
    reached = d_new <= cfg.goal_radius
    inside = in_hazard(new_pos, hazards)
    reward = cfg.progress_scale * (d_old - d_new) - cfg.time_penalty
    reward = reward + cfg.goal_bonus * reached - cfg.hazard_penalty * inside
    truncated = (t + 1 >= cfg.max_episode_steps) & ~reached
    return new_pos, reward, reached, truncated, inside


def sample_reset(
    cfg: NavConfig, rng: np.random.Generator, base: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Start position (2,) and hazards (n_hazards, 3) for a new episode.

    The order of draws is part of the contract between :class:`NavEnv` and
    :class:`BatchNavEnv`: layout first (only when random), then the start jitter.

    Args:
        cfg: the task.
        rng: the copy's generator.
        base: (n_hazards, 3) layout of this copy; ``None`` = ``cfg.hazards``.
    """
    base = np.asarray(cfg.hazards if base is None else base, dtype=np.float64)
    hazards = base
    if cfg.layout == "random":
        for _ in range(100):
            cand = base.copy()
            cand[:, :2] += rng.uniform(-cfg.layout_jitter, cfg.layout_jitter, size=(len(base), 2))
            # Coarse grid: this runs every reset; the fixed layout was checked finely.
            if layout_problem(cfg, cand, cfg.clearance, grid_step=0.04) is None:
                hazards = cand
                break
    start = np.asarray(cfg.start, dtype=np.float64) + rng.uniform(-cfg.start_jitter, cfg.start_jitter, size=2)
    return start, hazards


# ----------------------------------------------------------------------------- gymnasium


class NavEnv(gym.Env):
    """Gymnasium environment for the hazard navigation task.

    ``info`` carries ``in_hazard`` (this step ended inside a hazard), ``is_success``
    and ``hazard_steps`` (steps inside hazards so far this episode).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: NavConfig | None = None) -> None:
        self.config = config if config is not None else NavConfig()
        low, high = obs_bounds(self.config)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.pos = np.zeros(2)
        self.hazards = np.asarray(self.config.hazards, dtype=np.float64)
        self.t = 0
        self.hazard_steps = 0

    def _obs(self) -> np.ndarray:
        obs = observe(self.config, self.pos[None], self.hazards[None])[0]
        low, high = self.observation_space.low, self.observation_space.high
        return np.clip(obs, low, high)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.pos, self.hazards = sample_reset(self.config, self.np_random)
        self.t = 0
        self.hazard_steps = 0
        return self._obs(), {}

    def step(self, action):
        new_pos, reward, term, trunc, inside = nav_step(
            self.config, self.pos[None], self.hazards[None], np.array([self.t]), np.asarray(action)[None]
        )
        self.pos = new_pos[0]
        self.t += 1
        self.hazard_steps += int(inside[0])
        info = {"in_hazard": bool(inside[0]), "is_success": bool(term[0]), "hazard_steps": self.hazard_steps}
        return self._obs(), float(reward[0]), bool(term[0]), bool(trunc[0]), info


# ----------------------------------------------------------------------------- batched twin


class BatchNavEnv:
    """``n`` independent copies of :class:`NavEnv` stepped as one numpy batch.

    Copies reset automatically when their episode ends; :meth:`step` returns the
    final observation of ended episodes separately (for value bootstrapping on
    truncation), then the first observation of the next episode in ``obs``.

    Args:
        config: the task.
        seeds: one integer per copy; copy ``i`` draws exactly what
            ``NavEnv().reset(seed=seeds[i])`` and its later resets draw.
        layouts: optional (n, n_hazards, 3) hazard layout of each copy (e.g. one
            drawn per training seed by :func:`random_layout`); copy ``i`` then behaves
            as ``NavEnv`` with ``hazards=layouts[i]``. ``None`` = ``config.hazards``.
    """

    def __init__(
        self, config: NavConfig, seeds: list[int] | np.ndarray, layouts: np.ndarray | None = None
    ) -> None:
        self.config = config
        self.n = len(seeds)
        if self.n == 0:
            raise ValueError("seeds is empty; BatchNavEnv needs at least one copy")
        self.rngs = [seeding.np_random(int(s))[0] for s in seeds]
        self.pos = np.zeros((self.n, 2))
        shape = (self.n, config.n_hazards, 3)
        if layouts is None:
            self.layouts = np.broadcast_to(np.asarray(config.hazards, np.float64)[None], shape).copy()
        else:
            self.layouts = np.asarray(layouts, dtype=np.float64)
            if self.layouts.shape != shape:
                raise ValueError(f"layouts has shape {self.layouts.shape}; expected {shape} "
                                 "(one layout per copy, as many hazards as config.hazards)")
        self.hazards = self.layouts.copy()
        self.t = np.zeros(self.n, dtype=np.int64)
        self.hazard_steps = np.zeros(self.n, dtype=np.int64)
        low, high = obs_bounds(config)
        self._low, self._high = low, high

    def _obs(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.clip(observe(self.config, self.pos[idx], self.hazards[idx]), self._low, self._high)

    def _reset_copies(self, idx: np.ndarray) -> None:
        for i in idx:
            self.pos[i], self.hazards[i] = sample_reset(self.config, self.rngs[i], self.layouts[i])
        self.t[idx] = 0
        self.hazard_steps[idx] = 0

    def reset(self) -> np.ndarray:
        """Reset every copy. Returns (n, obs_dim) float32."""
        self._reset_copies(np.arange(self.n))
        return self._obs()

    def step(self, action: np.ndarray) -> dict[str, np.ndarray]:
        """Step all copies with ``action`` (n, 2).

        Returns a dict with ``obs`` (n, obs_dim; next episode's first obs where one
        ended), ``reward``, ``terminated``, ``truncated``, ``in_hazard`` (n,),
        ``final_obs`` (n, obs_dim; the last obs of the ended episode, else equal to
        ``obs``), ``episode_hazard_steps`` (n; hazard steps of the episode that this
        step belongs to) and ``episode_length`` (n).
        """
        new_pos, reward, term, trunc, inside = nav_step(self.config, self.pos, self.hazards, self.t, action)
        self.pos = new_pos
        self.t += 1
        self.hazard_steps += inside
        out = {
            "reward": reward,
            "terminated": term,
            "truncated": trunc,
            "in_hazard": inside,
            "episode_hazard_steps": self.hazard_steps.copy(),
            "episode_length": self.t.copy(),
        }
        final_obs = self._obs()
        done = np.flatnonzero(term | trunc)
        if done.size:
            self._reset_copies(done)
            obs = final_obs.copy()
            obs[done] = self._obs(done)
        else:
            obs = final_obs
        out["obs"] = obs
        out["final_obs"] = final_obs
        return out


gym.register(id="safetylab/HazardNav-v0", entry_point="safetylab.rl.nav:NavEnv")

# ----------------------------------------------------------------------------- evaluation

ActFn = Callable[[np.ndarray], np.ndarray]
"""Maps observations (n_policies, n_episodes, obs_dim) to actions (n_policies, n_episodes, 2)."""
ShieldFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""Maps (positions (n, 2), hazards (n, H, 3), actions (n, 2)) to safe actions (n, 2)."""


def evaluate_policies(
    cfg: NavConfig,
    act: ActFn,
    n_policies: int,
    episode_seeds: list[int],
    *,
    shield: ShieldFn | None = None,
    n_trajectories: int = 0,
    layouts: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run every policy for one episode per seed in ``episode_seeds``, all in one batch.

    The same episode seeds are used for every policy, so policies (and arms) are
    compared on identical start positions and layouts.

    Args:
        cfg: the task.
        act: batched policy (see :data:`ActFn`): its mean action, or a sample from it.
        n_policies: leading dimension the policy expects.
        episode_seeds: seed of each evaluation episode.
        shield: if given, actions pass through it before the environment.
        n_trajectories: keep positions of the first this-many episodes per policy.
        layouts: optional (n_policies, n_hazards, 3) layout of each policy (the one it
            trained on); ``None`` = ``cfg.hazards`` for all.

    Returns:
        Per policy lists (length ``n_policies``) of per-episode lists:
        ``success`` (bool), ``hazard_steps`` (int), ``length`` (int), and
        ``trajectories`` (per policy, up to ``n_trajectories`` lists of [x, y]) and
        ``trajectory_hazards`` (the hazards of those episodes, lists of (x, y, r)).
    """
    n_ep = len(episode_seeds)
    seeds = np.tile(np.asarray(episode_seeds), n_policies)
    if layouts is not None:
        layouts = np.repeat(np.asarray(layouts, dtype=np.float64), n_ep, axis=0)  # copy index = p * n_ep + e
    env = BatchNavEnv(cfg, seeds, layouts)
    obs = env.reset()
    alive = np.ones(env.n, dtype=bool)
    success = np.zeros(env.n, dtype=bool)
    hazard_steps = np.zeros(env.n, dtype=np.int64)
    length = np.zeros(env.n, dtype=np.int64)
    keep = np.zeros(env.n, dtype=bool)
    keep.reshape(n_policies, n_ep)[:, :n_trajectories] = True
    paths: dict[int, list[list[float]]] = {int(i): [env.pos[i].round(4).tolist()] for i in np.flatnonzero(keep)}
    path_hazards = {i: env.hazards[i].round(4).tolist() for i in paths}
    for _ in range(cfg.max_episode_steps):
        a = act(obs.reshape(n_policies, n_ep, -1)).reshape(env.n, 2)
        a = np.clip(a, -1.0, 1.0)
        if shield is not None:
            a = shield(env.pos, env.hazards, a)
        pos_before = env.pos.copy()
        out = env.step(a)
        for i in paths:
            if alive[i]:
                # After an auto-reset env.pos is the next start, so recompute the end point.
                paths[i].append(_end_position(cfg, pos_before[i], a[i]).round(4).tolist())
        ended = alive & (out["terminated"] | out["truncated"])
        success |= ended & out["terminated"]
        hazard_steps = np.where(alive, out["episode_hazard_steps"], hazard_steps)
        length = np.where(alive, out["episode_length"], length)
        alive &= ~ended
        obs = out["obs"]
        if not alive.any():
            break
    shape = (n_policies, n_ep)
    return {
        "success": success.reshape(shape).tolist(),
        "hazard_steps": hazard_steps.reshape(shape).tolist(),
        "length": length.reshape(shape).tolist(),
        "trajectories": [[paths[p * n_ep + e] for e in range(min(n_trajectories, n_ep))] for p in range(n_policies)],
        "trajectory_hazards": [[path_hazards[p * n_ep + e] for e in range(min(n_trajectories, n_ep))]
                               for p in range(n_policies)],
    }


def _end_position(cfg: NavConfig, pos: np.ndarray, action: np.ndarray) -> np.ndarray:
    L = cfg.arena_half_width
    return np.clip(pos + cfg.step_size * np.clip(action, -1.0, 1.0), -L, L)
