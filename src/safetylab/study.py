"""What a study is, as the runner sees it.

A study module (``safetylab/studies/<name>.py``) reads top to bottom: ``Config``,
``CLAIM``, ``THREAT_MODEL``, helpers, then the four functions the runner calls,
and ends with ``STUDY = Study(...)``:

``organisms(config) -> list[OrganismRequest]``
    Optional. The model organisms the study will load. The runner trains the missing
    ones before ``prepare`` -- several at a time, and for ``safetylab reproduce`` those of
    every study at once -- so that studies share organisms through the cache.
``prepare(config, ctx)``
    Optional. Runs once in the main process before any unit: builds shared,
    cached inputs (e.g. trains organisms) so that parallel units never race on them.
``units(config) -> list[Unit]``
    The independent pieces of work (seed × arm, model × depth, ...). Keys are
    unique and stable: resume skips keys already in ``results.jsonl``.
``run_unit(config, unit, ctx) -> dict``
    Does one unit and returns JSON-only data (the raw trace, not just a score).
    Must be deterministic given ``(config, unit.key)``: seed from ``ctx.seed_for(unit)``.
    Runs in a worker process (local pool or Ray) when ``--workers > 1``.
``analyze(config, records) -> Analysis``
    Pure: from the raw records (``[{"key", "params", "result"}]`` in unit order) to
    the verdict, tables and findings. ``safetylab report RUN_DIR`` calls only this
    and ``plots``, so every number in a report is recomputable from raw results.
``plots(config, records, analysis, out_dir) -> list[Figure]``
    Optional. Writes PNGs into ``out_dir`` and returns their captions.
``null(config, records) -> records`` and ``extreme(config, records) -> records``
    Protocol v2's counterfactual audit on a run's own records (``safetylab audit``). ``null``
    removes the claimed effect on the same units (e.g. the treatment's outcomes replaced by the
    control's, paired by seed and request); ``extreme`` gives the largest effect the design
    allows (e.g. every attacked request fails). ``analyze`` on the first must not say "holds",
    on the second it must be able to. Pure: they get a deep copy and return records.
``simulate(config, effect, rng) -> records``
    Raw records as ``run_unit`` would return them (same keys, same shapes), drawn from a
    model of the study's data in which the primary contrast's true effect is ``effect``
    and every control behaves as designed. Pure given ``rng``. ``safetylab calibrate``
    feeds them to ``analyze`` to measure how often the study says "holds" at the null
    (``calibration.null_effect``, the claim's threshold) and at its alternative.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safetylab.claims import Claim, ControlResult, ThreatModel, VerdictRecord

Scale = Literal["quick", "paper"]


def json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); tuples become lists; numpy scalars
    and :class:`~safetylab.metrics.stats.Interval` become plain JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):  # Interval
        return json_safe(value.to_dict())
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return json_safe(value.item())
    return value


class StudyConfig(BaseModel):
    """Base of every study's ``Config``: frozen, no unknown keys, field docs as help."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    seed: int = Field(0, ge=0)
    """Master seed; every unit derives its own seed from it and the unit key."""


class OrganismStudyConfig(StudyConfig):
    """Base of every ``Config`` that loads model organisms: one name per shared field.

    ``organism_scale``, ``organism_seeds`` (training seeds per variant), ``base_seed`` (the first
    seed; with ``shared_base`` every fine-tuned seed starts from this base) and :meth:`request`,
    the one way from a config to the organism it loads. The names studies used before
    (``organism_seed``, ``source_seeds``, ``seeds`` for organism seeds) still work for one
    release, with a one-line deprecation note.
    """

    organism_scale: Literal["tiny", "quick", "paper"] = "paper"
    """Size of the organisms (tiny: tests; quick: minutes on CPU; paper: the study's full size)."""
    organism_seeds: int = Field(5, ge=1)
    """Training seeds per organism variant (the unit of replication of claims about training)."""
    base_seed: int = Field(0, ge=0)
    """First training seed; seeds are base_seed, base_seed + 1, ... With ``shared_base`` every
    fine-tuned seed starts from the base of this seed."""
    shared_base: bool = False
    """Fine-tune every seed of a variant from one base (seed base_seed) instead of each seed's own
    base (cheaper; the base's own error is then shared by every seed)."""

    DEPRECATED_NAMES: ClassVar[dict[str, str]] = {"organism_seed": "base_seed"}
    """Old config key -> new one; a study adds its own (e.g. ``source_seeds``)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for old, new in cls.DEPRECATED_NAMES.items():
            if old in values:
                if new in values:
                    raise ValueError(f"'{old}' is the old name of '{new}'; give only '{new}'")
                print(f"note: config key '{old}' is deprecated, use '{new}' (it still works in this release)",
                      file=sys.stderr)
                values[new] = values.pop(old)
        return values

    def organism_seed_list(self) -> list[int]:
        """The training seeds of every fine-tuned variant."""
        return list(range(self.base_seed, self.base_seed + self.organism_seeds))

    def request(self, variant: str, seed: int | None = None, **kwargs: Any) -> Any:
        """The organism ``variant`` at training ``seed`` (``None``: ``base_seed``), from the shared base
        when ``shared_base`` is on; ``kwargs`` go to :class:`~safetylab.organisms.cache.OrganismRequest`
        (e.g. ``overrides``). Organisms trained from scratch (``base``, ``never-taught``) ignore the
        shared base, as ``organism_config`` does."""
        from safetylab.organisms.cache import OrganismRequest

        kwargs.setdefault("base_seed", self.base_seed if self.shared_base else None)
        return OrganismRequest(variant, kwargs.pop("scale", self.organism_scale),
                               seed=int(self.base_seed if seed is None else seed), **kwargs)


@dataclass(frozen=True)
class Unit:
    """One independent piece of work. ``params`` must be JSON-serialisable."""

    key: str
    params: dict[str, Any] = field(default_factory=dict)


PARTIAL_DIR = ".partial"
"""A run folder's subfolder for units' resumable state and records that finished out of order."""


def scratch_dir(run_dir: Path, key: str) -> Path:
    """``RUN_DIR/.partial/<key>``, the key made safe for a file name (a model id's ``/`` and the like) and kept
    unique by a short digest."""
    safe = "".join(c if c.isalnum() or c in "@=._-" else "_" for c in key)[:80]
    return run_dir / PARTIAL_DIR / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Context:
    """What a unit may know about where it runs. Picklable: it crosses processes."""

    run_dir: Path
    seed: int
    cache_dir: Path
    device: str = "cpu"
    quiet: bool = True
    in_process: bool = True
    """False inside a pool/Ray worker, where progress bars are not shown."""

    def seed_for(self, unit: Unit | str) -> int:
        """A 31-bit seed from the master seed and the unit key (stable across runs)."""
        key = unit.key if isinstance(unit, Unit) else unit
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def scratch(self, unit: Unit | str) -> Path:
        """The unit's own folder for state it may resume from after a crash (e.g. a long search's checkpoint),
        under ``RUN_DIR/.partial/``; the run loop deletes it once the unit's record is in ``results.jsonl``."""
        key = unit.key if isinstance(unit, Unit) else unit
        return scratch_dir(self.run_dir, key)

    def progress(self, description: str, total: int | None) -> ContextManager[Callable[..., None]]:
        """A rich progress bar inside a unit; silent when quiet or in a worker.

        Usage::

            with ctx.progress("training", total=n_updates) as advance:
                for _ in range(n_updates):
                    ...
                    advance(1)
        """
        from safetylab.progress import bar

        return bar(description, total, quiet=self.quiet or not self.in_process)


class Table(BaseModel):
    """A table for the report; cells are JSON scalars (strings already formatted
    where the study wants a particular rendering, e.g. '0.82 [0.71, 0.90]')."""

    model_config = ConfigDict(extra="forbid")

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    kind: Literal["table", "matrix"] = "table"
    """``matrix``: the first column labels the rows, the other columns label the matrix's columns,
    and every other cell is a number (or a numeric string, or ``None``/"–" where missing), as in a
    similarity or a source → target transfer matrix. report.html draws it as an annotated heatmap;
    report.md and summary.json keep the numbers. Square tables labelled the same way on both
    axes are drawn so without it (:func:`safetylab.heatmap.matrix_of`)."""


class Figure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    """File name of the PNG inside the run folder."""
    caption: str


class Analysis(BaseModel):
    """Everything ``summary.json`` and the report say, computed from raw records."""

    model_config = ConfigDict(extra="forbid")

    verdict: VerdictRecord
    headline: str
    """One sentence that states the result with its interval."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Namespaced scalars and small structures (``refusal/harmful_rate``...)."""
    tables: list[Table] = Field(default_factory=list)
    controls: list[ControlResult] = Field(default_factory=list)
    """How each of the claim's controls came out (validity checks, never the verdict)."""
    contrast: str = ""
    """The primary contrast in one or two sentences with its numbers (arms, measure, unit)."""
    findings: list[str] = Field(default_factory=list)
    """Further observations, each backed by a number in ``metrics`` or a table."""
    setup_notes: list[str] = Field(default_factory=list)
    """Where the study chose a default the essay does not state, and what it chose."""


@dataclass(frozen=True)
class Calibration:
    """How ``safetylab calibrate`` exercises a study's decision rule on simulated records."""

    null_effect: float
    """True effect at the null: the claim's threshold (a rule that says "holds" here more than
    5% of the time is miscalibrated)."""
    alternative_effect: float
    """True effect at the declared alternative."""
    power: float
    """Declared probability of "holds" at the alternative, at ``scale``'s sizes."""
    effect: str
    """What ``effect`` is, in the claim's units (for the printout)."""
    scale: Scale = "quick"
    """The config the simulator's records are shaped by (seeds, prompts, arms)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides for calibration (e.g. fewer prompts, to keep it fast)."""


@dataclass(frozen=True)
class Study:
    """The runner's view of a study module."""

    name: str
    config_cls: type[StudyConfig]
    claim: Claim
    threat_model: ThreatModel
    units: Callable[[Any], list[Unit]]
    run_unit: Callable[[Any, Unit, Context], dict[str, Any]]
    analyze: Callable[[Any, list[dict[str, Any]]], Analysis]
    plots: Callable[[Any, list[dict[str, Any]], Analysis, Path], list[Figure]] | None = None
    prepare: Callable[[Any, Context], None] | None = None
    organisms: Callable[[Any], list[Any]] | None = None
    """The organisms (:class:`safetylab.organisms.cache.OrganismRequest`) a config loads."""
    simulate: Callable[[Any, float, Any], list[dict[str, Any]]] | None = None
    """Records under a chosen true effect, for ``safetylab calibrate`` (see the module docstring)."""
    calibration: Calibration | None = None
    """The null, the alternative and the declared power of the simulator's calibration."""
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config overrides per scale. ``paper`` is usually ``{}``: defaults are the essay's."""
    summary: str = ""
    """One line for ``safetylab list``; defaults to the claim statement."""
    unit_threads: int | None = None
    """torch threads for every unit, whatever the executor. Small models run fastest
    (and give the same bits under every executor) on one thread; ``None`` = the
    runner's choice (all cores in process, cores/workers in a pool)."""
    quick_seconds: float = 60.0
    """Core seconds of a quick run on the reference machine (2 cores), units and report together: a
    scheduling hint, so that ``safetylab reproduce`` starts the longest studies first. Nothing else reads it."""
    null: Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    """The run's records with the claimed effect removed on the same units (see the module docstring)."""
    extreme: Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    """The run's records with the largest effect the design allows."""
    evidence: Callable[[Any], ThreatModel] | None = None
    """The part of ``threat_model`` a config actually measures, e.g. an attack-free config
    covers adversary tier ``none`` only (``ThreatModel.narrow``); ``None``: see
    :meth:`covered_threat_model`."""

    def covered_threat_model(self, config: StudyConfig) -> ThreatModel:
        """The cells a run of ``config`` has evidence for: the declared threat model,
        narrowed by the config's own ``users`` / ``tiers`` / ``assets`` fields where it has
        them (a study that runs a chosen subset of the taxonomy), then by ``evidence``.
        Never more than declared; the report flags a verdict stated beyond it."""
        tm = self.threat_model
        tm = tm.narrow(**{k: getattr(config, k) for k in ("users", "tiers", "assets") if hasattr(config, k)})
        if self.evidence is not None:
            narrowed = self.evidence(config)
            assert set(narrowed.cells()) <= set(self.threat_model.cells()), \
                f"{self.name}: evidence() covers cells its THREAT_MODEL does not declare"
            tm = tm.narrow(users=narrowed.users, tiers=narrowed.tiers, assets=narrowed.assets)
        return tm

    def resolve_config(
        self,
        scale: Scale = "quick",
        overrides: dict[str, Any] | None = None,
    ) -> StudyConfig:
        """Config defaults ← scale overrides ← user overrides, validated once. A user's deprecated key
        is renamed before the scale's preset is merged, so ``--set seeds=4`` overrides a preset's
        ``organism_seeds`` instead of clashing with it."""
        values: dict[str, Any] = dict(self.scales.get(scale, {}))
        user = dict(overrides or {})
        for old, new in getattr(self.config_cls, "DEPRECATED_NAMES", {}).items():
            if old in user and new not in user:
                print(f"note: config key '{old}' is deprecated, use '{new}' (it still works in this release)",
                      file=sys.stderr)
                user[new] = user.pop(old)
        values.update(user)
        return self.config_cls.model_validate(values)


def default_cache_dir() -> Path:
    """``$SAFETYLAB_CACHE`` or ``~/.cache/safetylab``."""
    env = os.environ.get("SAFETYLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "safetylab"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads and the BLAS/OpenMP pools numpy and
    scikit-learn use (workers use 1 to avoid oversubscription)."""
    if n is None:
        with nullcontext():
            yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)
