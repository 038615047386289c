"""The organism cache: one folder per organism, named by the hash of its config.

An entry ``<cache_dir>/<hash>/`` holds the Hugging Face model and tokenizer files,
``organism.json`` (variant, full config, world config, hash, base hash, training summary,
weights checksum) and ``train_log.jsonl``. Entries are written atomically: training
writes into a temporary sibling folder that is renamed into place only when complete,
under a per-entry file lock so that concurrent processes train an organism once.
While it trains, a checkpoint in ``<cache_dir>/.partial-<hash>/`` (replaced every few
minutes, removed once the entry is in place) lets a stopped build resume where it was, to
the same weights bit for bit.
An entry that is incomplete, unreadable, or whose recorded hash or weights checksum
does not match is treated as absent and rebuilt -- never loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from safetylab.errors import UserError
from safetylab.organisms.train import (
    FROM_SCRATCH,
    ORGANISM_VERSION,
    SCALES,
    VARIANTS,
    OrganismConfig,
    organism_config,
    remove_checkpoint,
    save_organism,
    train_organism,
)
from safetylab.pool import Job, run_graph

REQUIRED_FILES: tuple[str, ...] = (
    "organism.json", "config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "train_log.jsonl",
)


def default_organism_dir() -> Path:
    """``safetylab.study.default_cache_dir() / "organisms"``."""
    from safetylab.study import default_cache_dir

    return default_cache_dir() / "organisms"


def config_hash(config: OrganismConfig) -> str:
    """16 hex digits of sha256 over the canonical JSON of the stage's config."""
    payload = {"version": ORGANISM_VERSION, **config.stage_dict()}
    if config.variant not in FROM_SCRATCH:
        payload["base"] = config_hash(config.base_config())
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_entry(folder: Path, expected_hash: str | None = None) -> str | None:
    """Why ``folder`` is not a valid organism, or None if it is.

    Checks the required files, that ``organism.json`` parses and its config re-hashes to
    the recorded hash (and to ``expected_hash`` if given), and the weights checksum.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist or is not a folder"
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        return f"{folder} is not a complete organism: missing {', '.join(missing)}"
    try:
        meta = json.loads((folder / "organism.json").read_text())
        cfg = OrganismConfig.model_validate(meta["config"])
    except Exception as exc:  # noqa: BLE001 - any parse error means corrupt
        return f"{folder}/organism.json is unreadable ({type(exc).__name__}: {exc})"
    h = config_hash(cfg)
    if meta.get("hash") != h:
        return (f"{folder}: recorded hash {meta.get('hash')!r} does not match its config ({h}): "
                f"edited, or written by another safetylab version")
    if expected_hash is not None and h != expected_hash:
        return f"{folder}: hash {h} is not the expected {expected_hash}"
    if meta.get("weights_sha256") != file_sha256(folder / "model.safetensors"):
        return f"{folder}: model.safetensors does not match the recorded checksum"
    return None


def load_meta(folder: Path) -> dict[str, Any]:
    """``organism.json`` of a valid organism folder; UserError otherwise."""
    problem = check_entry(Path(folder))
    if problem:
        raise UserError(f"{problem}; pass a folder made by 'safetylab organism train'")
    return json.loads((Path(folder) / "organism.json").read_text())


@contextmanager
def _entry_lock(cache_dir: Path, h: str) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{h}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    config: OrganismConfig,
    cache_dir: Path,
    *,
    quiet: bool = True,
    num_threads: int | None = None,
    device: str = "cpu",
) -> Path:
    """The cache folder of ``config``, training it (and its base) if absent or corrupt."""
    h = config_hash(config)
    target = cache_dir / h
    if check_entry(target, h) is None:
        return target
    base_path = None
    if config.variant not in FROM_SCRATCH:
        base_path = build(config.base_config(), cache_dir, quiet=quiet, num_threads=num_threads,
                          device=device)
    with _entry_lock(cache_dir, h):
        if check_entry(target, h) is None:  # another process finished it meanwhile
            return target
        from safetylab.progress import bar
        from safetylab.study import torch_threads

        steps = (config.base_train if config.variant in FROM_SCRATCH else config.variant_train).steps
        partial = cache_dir / f".partial-{h}"  # resumed from if a crash stopped it
        with torch_threads(num_threads), bar(f"training {config.variant}", steps, quiet=quiet) as adv:
            result = train_organism(config, base_path=base_path, progress=adv, device=device,
                                    checkpoint=partial)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{h}-", dir=cache_dir))
        try:
            meta = {
                "version": ORGANISM_VERSION,
                "variant": config.variant,
                "scale": config.scale,
                "hash": h,
                "base_hash": (None if config.variant in FROM_SCRATCH
                              else config_hash(config.base_config())),
                "config": config.model_dump(mode="json"),
                "world": config.world.model_dump(mode="json"),
                "world_seed": config.world.seed,
                "training": {
                    "seconds": round(result.seconds, 2),
                    "tokens": result.tokens,
                    "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
                    "final_loss": result.log[-1]["loss"] if result.log else None,
                    "steps": steps,
                    "num_threads": num_threads,
                    "device": device,
                },
                "n_params": int(sum(p.numel() for p in result.model.parameters())),
            }
            save_organism(result, tmp, {**meta, "weights_sha256": None})
            meta["weights_sha256"] = file_sha256(tmp / "model.safetensors")
            (tmp / "organism.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if target.exists():  # corrupt or partial entry: replace, never load
                shutil.rmtree(target)
            os.replace(tmp, target)
            remove_checkpoint(partial)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def get_organism(
    variant: str,
    scale: str = "quick",
    *,
    cache_dir: Path | None = None,
    seed: int = 0,
    base_seed: int | None = None,
    quiet: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
    num_threads: int | None = None,
    device: str = "cpu",
) -> Path:
    """The folder of a trained organism, training it (and the base first) if needed.

    Args:
        variant: one of ``base``, ``sft``, ``sft-late``, ``dpo``, ``depth-robust``,
            ``eval-gated``, ``never-taught``, ``secret-keeping``.
        scale: ``tiny`` (seconds, for tests), ``quick`` (minutes on 2 CPU cores) or
            ``paper``.
        cache_dir: where organisms live; default ``$SAFETYLAB_CACHE/organisms`` or
            ``~/.cache/safetylab/organisms``.
        seed: training seed.
        base_seed: seed of the base a variant is fine-tuned from (None: ``seed``).
        quiet: no progress bar.
        overrides: per-section config overrides (``{"model": {"n_layers": 4}}``).
        num_threads: torch intra-op threads while training (None: leave as is).
        device: torch device to train on (``cuda`` for paper scale on a GPU); the
            cache key does not depend on it.

    Returns:
        A folder that loads with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``; ``World.from_organism`` regenerates its world.

    Raises:
        UserError: unknown variant or scale, or impossible sizes.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown organism variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if scale not in SCALES:
        raise UserError(f"unknown organism scale {scale!r}; choose from {', '.join(SCALES)}")
    try:
        config = organism_config(variant, scale, seed=seed, base_seed=base_seed, overrides=overrides)
    except ValueError as exc:
        from safetylab.errors import pydantic_one_line

        raise UserError(pydantic_one_line(exc, where="organism config")) from None
    cache_dir = Path(cache_dir) if cache_dir is not None else default_organism_dir()
    return build(config, cache_dir, quiet=quiet, num_threads=num_threads, device=device)


def list_organisms(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One record per entry in the cache: path, variant, scale, status, training summary."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_organism_dir()
    out: list[dict[str, Any]] = []
    if not cache_dir.is_dir():
        return out
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        problem = check_entry(folder, folder.name)
        rec: dict[str, Any] = {"path": str(folder), "hash": folder.name,
                               "status": "ok" if problem is None else "corrupt"}
        if problem is None:
            meta = json.loads((folder / "organism.json").read_text())
            rec.update(variant=meta["variant"], scale=meta["scale"], seed=meta["config"]["seed"],
                       world_seed=meta["world_seed"], n_params=meta.get("n_params"),
                       train_seconds=meta["training"]["seconds"])
        else:
            rec["problem"] = problem
        out.append(rec)
    return out


@dataclass(frozen=True)
class OrganismRequest:
    """An organism a study will need, declared before it runs (see :func:`build_many`)."""

    variant: str
    scale: str = "quick"
    seed: int = 0
    base_seed: int | None = None
    overrides: dict[str, dict[str, Any]] | None = None

    def config(self) -> OrganismConfig:
        try:
            return organism_config(self.variant, self.scale, seed=self.seed, base_seed=self.base_seed,
                                   overrides=self.overrides)
        except ValueError as exc:
            from safetylab.errors import pydantic_one_line

            raise UserError(pydantic_one_line(exc, where="organism config")) from None

    def path(self, cache_dir: Path | None = None, *, quiet: bool = True) -> Path:
        """Its cache folder, trained first (with its base) if the cache lacks it."""
        return get_organism(self.variant, self.scale, cache_dir=cache_dir, seed=self.seed,
                            base_seed=self.base_seed, quiet=quiet, overrides=self.overrides)


TOKENS_PER_SEQUENCE = 40.0
"""Mean tokens in one training sequence of the organisms' world (prompt, response and ``<eos>``): 39.9 in base
pretraining, 42 in sft's mix, 41 on each side of a dpo pair (quick organisms' training logs)."""

CPU_FLOPS_PER_S = 42e9
"""Training throughput of one core of the 2-core reference machine (AMD EPYC with AVX-512, one thread, another
organism training on the other core): the quick base's 6 x 1.44M parameters x 3.06M tokens took 625 s. Estimates
made with it: quick sft 79 s (measured 77), sft-late 297 s (304), dpo 105 s (120-131), eval-gated and
secret-keeping 119 s (118-129), the paper base 6.4 hours (3.1-3.3 s a step here: 5.2-5.5 hours). Organisms
of 0.2M parameters and less run about a third slower than estimated (the 4-layer base: 100 s, measured 133)."""


def _vocab_size(config: OrganismConfig) -> int:
    from safetylab.organisms.tokenizer import SPECIAL_TOKENS
    from safetylab.organisms.world import World

    return len(World(config.world).vocabulary()) + len(SPECIAL_TOKENS)


def n_params(config: OrganismConfig) -> int:
    """Parameters of the organism's ``LlamaForCausalLM``: untied input and output embeddings, four attention
    projections, the gated MLP's three and two norms per layer, and the final norm."""
    return _n_params(config, _vocab_size(config))


def _n_params(config: OrganismConfig, vocab: int) -> int:
    m = config.model
    d = m.d_model
    return 2 * vocab * d + m.n_layers * (4 * d * d + 3 * d * m.d_ff + 2 * d) + d


def training_flops(config: OrganismConfig) -> float:
    """Floating-point operations to train this stage, counted as parameters x tokens x passes: 6 for a forward
    and backward pass; dpo 2 x (6 + 2), both sides of a pair through the policy and the frozen reference;
    sft-late 3, a forward pass through every layer and a backward pass through a quarter of them; depth-robust
    6 plus, for each intermediate exit, the output head's 6 x vocabulary x width (forward and backward)."""
    from safetylab.organisms.train import exit_layers

    t = config.base_train if config.variant in FROM_SCRATCH else config.variant_train
    vocab = _vocab_size(config)
    p = _n_params(config, vocab)
    per_token = {"dpo": 16.0 * p, "sft-late": 3.0 * p}.get(config.variant, 6.0 * p)
    if config.variant == "depth-robust":
        n_exits = len(exit_layers(config.model.n_layers)) - 1  # the last exit is the model's own head
        per_token += 6.0 * vocab * config.model.d_model * n_exits
    return per_token * t.steps * t.batch_size * TOKENS_PER_SEQUENCE


def estimated_seconds(config: OrganismConfig, flops_per_s: float = CPU_FLOPS_PER_S) -> float:
    """Training time of this stage on one core like the reference machine's (:data:`CPU_FLOPS_PER_S`);
    within about 20% on quick and paper organisms there."""
    return training_flops(config) / flops_per_s


def with_bases(configs: list[OrganismConfig]) -> dict[str, OrganismConfig]:
    """Every organism these configs need, by hash: each one and the base a variant is fine-tuned from."""
    by_hash: dict[str, OrganismConfig] = {}
    for c in configs:
        if c.variant not in FROM_SCRATCH:
            by_hash.setdefault(config_hash(c.base_config()), c.base_config())
        by_hash.setdefault(config_hash(c), c)
    return by_hash


def organism_plan(requests: list[OrganismRequest], cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """What :func:`build_many` would do for ``requests``, without training or writing anything.

    Returns:
        One row per organism, bases included, in the order it would train them (from-scratch stages first,
        longest first; cached ones last): ``hash``, ``variant``, ``scale``, ``seed``, ``base`` (the base's
        hash or None), ``n_params``, ``steps``, ``status`` (``cached``, ``resumes`` from a checkpoint, or
        ``missing``), ``steps_done`` and ``seconds_left`` (one core like the reference machine's:
        :func:`estimated_seconds`, less the checkpoint's share; 0 when cached).
    """
    from safetylab.organisms.train import checkpoint_step

    cache_dir = Path(cache_dir) if cache_dir is not None else default_organism_dir()
    rows = []
    for h, c in with_bases([r.config() for r in requests]).items():
        steps = (c.base_train if c.variant in FROM_SCRATCH else c.variant_train).steps
        cached = check_entry(cache_dir / h, h) is None
        done = steps if cached else (checkpoint_step(cache_dir / f".partial-{h}", c) or 0)
        rows.append({
            "hash": h, "variant": c.variant, "scale": c.scale, "seed": c.seed,
            "base": None if c.variant in FROM_SCRATCH else config_hash(c.base_config()),
            "n_params": n_params(c), "steps": steps,
            "status": "cached" if cached else ("resumes" if done else "missing"),
            "steps_done": done, "seconds_left": estimated_seconds(c) * (1 - done / steps),
        })
    rows.sort(key=lambda r: (r["status"] == "cached", r["variant"] not in FROM_SCRATCH, -r["seconds_left"]))
    return rows


def _build_one(config: OrganismConfig, cache_dir: Path, num_threads: int, device: str) -> str:
    """Pool worker: one organism whose base (if any) is already cached."""
    return str(build(config, cache_dir, quiet=True, num_threads=num_threads, device=device))


def build_many(
    requests: list[OrganismRequest],
    cache_dir: Path | None = None,
    *,
    workers: int | None = None,
    quiet: bool = True,
    device: str = "cpu",
) -> list[Path]:
    """Train every requested organism that is not cached yet, several at a time.

    Organisms this small train faster as several one-thread processes than as one
    process with every core (their matrices are too small to spread over threads), so
    what is missing is trained over a pool of ``workers`` one-thread processes: the
    from-scratch organisms (bases, ``never-taught``) first, longest first, and each variant
    as soon as its own base is ready. With one worker, or one organism missing, it trains
    in this process on every core. The cache's per-entry lock keeps a concurrent study from
    training the same one twice.

    Args:
        requests: organisms as a study's ``organisms(config)`` declares them.
        cache_dir: organism cache (default :func:`default_organism_dir`).
        workers: processes at a time (default: the number of cores).
        quiet: no progress lines.
        device: torch device (a GPU trains one organism at a time, in this process).

    Returns:
        The cache folder of each request, in order.
    """
    from safetylab.progress import bar

    cache_dir = Path(cache_dir) if cache_dir is not None else default_organism_dir()
    configs = [r.config() for r in requests]
    missing = missing_organisms(requests, cache_dir)
    cores = os.cpu_count() or 1
    workers = cores if workers is None else max(1, workers)
    if device != "cpu":
        workers = 1
    n = min(workers, len(missing))
    if not missing:
        return [cache_dir / config_hash(c) for c in configs]
    cache_dir.mkdir(parents=True, exist_ok=True)
    share = work_shares(missing)
    label = f"training {len(missing)} organisms ({n} at a time)"
    with bar(label, 100.0, quiet=quiet, unit="percent of the estimated work") as advance:
        if n == 1:  # one process with every core; bases come first
            for h in sorted(missing, key=lambda h: training_rank(missing[h]), reverse=True):
                build(missing[h], cache_dir, quiet=quiet, num_threads=None if device != "cpu" else cores, device=device)
                advance(share[h])
            return [cache_dir / config_hash(c) for c in configs]
        # A variant starts as soon as its own base is trained, not when every base is.
        run_graph(training_jobs(missing, cache_dir, threads=max(1, cores // n), device=device), n,
                  on_done=lambda h, _: advance(share[h]))
    return [cache_dir / config_hash(c) for c in configs]


def missing_organisms(requests: list[OrganismRequest], cache_dir: Path) -> dict[str, OrganismConfig]:
    """What ``requests`` need (bases included) and ``cache_dir`` does not hold a valid entry of, by hash."""
    return {h: c for h, c in with_bases([r.config() for r in requests]).items()
            if check_entry(Path(cache_dir) / h, h) is not None}


def training_jobs(missing: dict[str, OrganismConfig], cache_dir: Path, *, threads: int, device: str = "cpu"
                  ) -> dict[str, Job]:
    """One pool job per missing organism (:func:`safetylab.pool.run_graph`), keyed by hash: a variant needs its
    base when the base is missing too; ranked by :func:`training_rank`."""
    def needs(c: OrganismConfig) -> frozenset[str]:
        return frozenset() if c.variant in FROM_SCRATCH else frozenset({config_hash(c.base_config())} & missing.keys())

    return {h: Job(_build_one, (c, Path(cache_dir), threads, device), needs=needs(c), rank=training_rank(c))
            for h, c in missing.items()}


def training_rank(config: OrganismConfig) -> tuple[bool, float]:
    """Which missing organism trains first (higher first): from-scratch stages, which unblock their variants,
    then the longest (:func:`training_flops`)."""
    return (config.variant in FROM_SCRATCH, training_flops(config))


def work_shares(missing: dict[str, OrganismConfig]) -> dict[str, float]:
    """Each organism's share of the estimated training work, in percent: a progress bar advanced by these
    keeps an honest estimate of the time left when a base takes eight variants' time."""
    work = {h: training_flops(c) for h, c in missing.items()}
    return {h: 100.0 * w / sum(work.values()) for h, w in work.items()}
