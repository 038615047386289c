"""Run folders, config resolution and the run loop.

A run folder ``runs/<study>/<YYYYmmdd-HHMMSS>-<shortid>/`` holds:

``config.yaml``    the fully resolved study config (feed it back with ``--config``);
``env.json``       study, scale, seed, command line, package versions, git commit, device;
``results.jsonl``  one line per finished unit, appended atomically (write, flush, fsync)
                   in unit order, so the same config and seed give the same bytes
                   (the ``timing`` field aside);
``summary.json``, ``report.md``, ``report.html`` and ``*.png`` — all re-derivable from
the three files above with ``safetylab report RUN_DIR``.
``.partial/``     while a run is under way: a unit's resumable state (a long search's
                   checkpoint) and a record that finished before the units ahead of it;
                   a resume picks both up, and each goes once its record is written.

Imports run one way: this module uses :mod:`safetylab.executors` (where units run),
:mod:`safetylab.report` (what is written at the end) and :mod:`safetylab.results` (the
results log and the record of one unit), and none of them imports this one.

Validation happens before anything is written: a bad config, study name or output
path raises :class:`~safetylab.errors.UserError` and leaves the disk untouched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from pydantic import ValidationError

from safetylab.errors import UserError, pydantic_one_line
from safetylab.executors import make_executor
from safetylab.progress import bar
from safetylab.report import render_run
from safetylab.results import (
    CONFIG_FILE, ENV_FILE, RESULTS_FILE, RESULTS_VERSION, ResultsLog, dumps_line, load_run, write_atomic,
)
from safetylab.study import (
    PARTIAL_DIR, Context, Study, StudyConfig, Unit, default_cache_dir, json_safe, scratch_dir, torch_threads,
)

_PACKAGES = (
    "safetylab", "torch", "transformers", "tokenizers", "numpy", "scipy", "scikit-learn",
    "matplotlib", "pydantic", "gymnasium", "stable-baselines3", "ray",
)


# --------------------------------------------------------------------------- config


def parse_set_options(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "arms=[none, shield]"]`` → ``{"lr": 0.1, "arms": ["none", "shield"]}``.

    Values are parsed as YAML scalars/flow collections, so types come out right.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'; e.g. --set seeds=8")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set expects key=value, got '{item}' with an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string; users mean a number
                value = float(value) if any(c.isdigit() for c in value) else value
            except ValueError:
                pass
        out[key] = value
    return out


def parse_extra_options(args: Iterable[str]) -> dict[str, Any]:
    """Config keys given as options: ``--prompt-column text``, ``--exit-mode=confidence``,
    ``--flag`` (true). Dashes become underscores; values parse as with ``--set``."""
    args = list(args)
    pairs: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument '{tok}'; config keys go as --key value or --set key=value")
        name = tok[2:]
        if "=" in name:
            key, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = name, args[i + 1]
            i += 2
        else:
            key, value = name, "true"
            i += 1
        pairs.append(f"{key.replace('-', '_')}={value}")
    return parse_set_options(pairs)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys (``yaml.safe_load``)."""
    if not path.exists():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
    if not path.is_file():
        raise UserError(f"config file {path} is not a file; pass a YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax or regenerate it") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of config keys, got a {type(data).__name__}")
    return data


def resolve_config(
    study: Study,
    *,
    scale: str = "quick",
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
) -> StudyConfig:
    """Defaults ← scale ← YAML file ← ``--set`` ← ``--seed``, validated once."""
    if scale not in ("quick", "paper"):
        raise UserError(f"unknown scale '{scale}'; use quick or paper")
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update(_listify(study, overrides or {}))
    if seed is not None:
        values["seed"] = seed
    try:
        return study.resolve_config(scale, values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UserError(pydantic_one_line(exc, where=f"{study.name} config")) from None


def _listify(study: Study, overrides: dict[str, Any]) -> dict[str, Any]:
    """``--set arms=shield`` or ``--set arms=none,shield`` for a list/tuple field means
    a list, as a user would expect; other values pass through to validation."""
    import typing

    fields = study.config_cls.model_fields
    out = dict(overrides)
    for key, value in overrides.items():
        # --model X for a study that takes a list of models: one entry, as a user means it.
        if key not in fields and f"{key}s" in fields and f"{key}s" not in overrides:
            out.pop(key)
            out[f"{key}s"] = value if isinstance(value, list) else [value]
            continue
        field = fields.get(key)
        if field is None or not isinstance(value, str):
            continue
        origin = typing.get_origin(field.annotation)
        if origin in (tuple, list) and not (origin is tuple and _is_fixed_tuple(field.annotation)):
            out[key] = [v.strip() for v in value.split(",") if v.strip()]
    return out


def _is_fixed_tuple(annotation: Any) -> bool:
    import typing

    args = typing.get_args(annotation)
    return bool(args) and args[-1] is not Ellipsis


def config_to_dict(config: StudyConfig) -> dict[str, Any]:
    return json.loads(config.model_dump_json())


# --------------------------------------------------------------------------- run folder


def _git_info() -> dict[str, Any]:
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "packages": _versions(),
        "git": _git_info(),
    }


def new_run_dir(out: Path, study: str) -> Path:
    """Make ``out/<study>/<timestamp>-<shortid>/``; ``out`` must not be a file."""
    run_dir = plan_run_dir(out, study)
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def plan_run_dir(out: Path, study: str) -> Path:
    """The path of a new run folder, checked but not yet created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory (it is created if missing)")
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file; pass a directory path")
            break
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return out / study / f"{stamp}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- the run loop


def build_organisms(
    studies: list[tuple[Study, StudyConfig]], cache_dir: Path, *, quiet: bool = True, device: str = "cpu"
) -> None:
    """Train the organisms these (study, config) pairs declare and the cache lacks, several at
    a time (``safetylab reproduce`` passes every study, so they share one pool and one cache)."""
    from safetylab.organisms.cache import build_many

    requests = [r for study, config in studies if study.organisms is not None
                for r in study.organisms(config)]
    if requests:
        build_many(requests, Path(cache_dir) / "organisms", quiet=quiet, device=device)



def run_study(
    name: str,
    *,
    scale: str = "quick",
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    seed: int | None = None,
    out: Path = Path("runs"),
    resume: Path | None = None,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    quiet: bool = True,
    cache_dir: Path | None = None,
    device: str = "cpu",
    argv: list[str] | None = None,
) -> Path:
    """Run (or resume) a study and render its report. Returns the run folder.

    Everything the user passed is validated before the first byte is written.
    """
    from safetylab.registry import get_study  # the registry imports every study: only when running one

    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")
    if executor not in ("local", "ray"):
        raise UserError(f"unknown executor '{executor}'; use local or ray")
    cache_dir = cache_dir or default_cache_dir()

    if resume is not None:
        study, config, env = load_run(resume)
        log = ResultsLog(resume / RESULTS_FILE)
        run_dir = resume
        records = log.read(repair=True)
        env.setdefault("resumed", []).append(
            {"at": _dt.datetime.now().isoformat(timespec="seconds"), "argv": argv or sys.argv}
        )
        write_atomic(run_dir / ENV_FILE, json.dumps(env, indent=2) + "\n")
    else:
        study = get_study(name)
        config = resolve_config(study, scale=scale, config_file=config_file, overrides=overrides, seed=seed)
        run_dir = plan_run_dir(out, study.name)
        log = ResultsLog(run_dir / RESULTS_FILE)
        records = []

    units = study.units(config)
    _check_units(study, units)
    done = {r["key"] for r in records if r["status"] == "ok"}
    todo = [(i, u) for i, u in enumerate(units) if u.key not in done]

    ctx = Context(
        run_dir=run_dir, seed=config.seed, cache_dir=cache_dir, device=device,
        quiet=quiet, in_process=(workers == 1 and executor == "local"),
    )
    if study.organisms is not None and todo:
        build_organisms([(study, config)], cache_dir, quiet=quiet, device=device)
    if study.prepare is not None and todo:
        # Before config.yaml/env.json exist: bad input found here (a model path, a data
        # file) leaves nothing behind, and a long preparation (training organisms into
        # the cache) interrupted here loses nothing either.
        study.prepare(config, ctx)

    if resume is None:
        run_dir.mkdir(parents=True, exist_ok=True)  # prepare() may have saved artifacts into it
        write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(config_to_dict(config), sort_keys=False))
        env = {
            "study": study.name,
            "scale": scale,
            "seed": config.seed,
            "unit_seeds": "sha256(f'{seed}:{unit_key}'), first 4 bytes little-endian, & 0x7fffffff",
            "argv": argv if argv is not None else sys.argv,
            "overrides": overrides or {},
            "config_file": str(config_file) if config_file else None,
            "executor": executor,
            "workers": workers,
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            **environment(device),
        }
        write_atomic(run_dir / ENV_FILE, json.dumps(env, indent=2) + "\n")
        log.path.touch()

    failed = 0
    if todo:
        # Records are written in unit order so results.jsonl is byte-reproducible under any pool; one that
        # finishes early waits in its unit's scratch folder, so a crash before its turn does not lose it.
        pending = _finished_early(run_dir, todo)
        order = [i for i, _ in todo]
        next_pos = 0

        def write_ready() -> None:
            nonlocal next_pos
            while next_pos < len(order) and order[next_pos] in pending:
                record = pending.pop(order[next_pos])
                log.append(record)
                if record["status"] == "ok":  # a failed unit keeps its state (a search's checkpoint) for the resume
                    shutil.rmtree(scratch_dir(run_dir, record["key"]), ignore_errors=True)
                next_pos += 1

        write_ready()
        written = set(order[:next_pos])
        rest = [(i, u) for i, u in todo if i not in pending and i not in written]
        ex = make_executor(executor, workers=workers, address=address) if rest else None
        try:
            with bar(f"{study.name}: units", len(todo), transient=False, quiet=quiet) as advance:
                advance(len(todo) - len(rest))
                for index, record in ex.map_units(study, config, rest, ctx) if ex else ():
                    pending[index] = record
                    if record["status"] != "ok":
                        failed += 1
                        print(f"{study.name} unit {record['key']} failed: {record['error']}", file=sys.stderr)
                    elif order[next_pos] != index:
                        folder = scratch_dir(run_dir, record["key"])
                        folder.mkdir(parents=True, exist_ok=True)
                        write_atomic(folder / EARLY_RECORD, dumps_line(record))
                    write_ready()
                    advance(1)
        finally:
            if ex is not None:
                ex.close()
        try:
            (run_dir / PARTIAL_DIR).rmdir()  # only when empty: a failed unit keeps its state for the next resume
        except OSError:
            pass

    render_run(run_dir, study=study, config=config, env=env)
    if failed:
        raise UnitsFailed(run_dir, failed)
    return run_dir


EARLY_RECORD = "record.json"
"""A finished unit's record, kept in its scratch folder until the units before it are written."""


def _finished_early(run_dir: Path, todo: list[tuple[int, Unit]]) -> dict[int, dict[str, Any]]:
    """Records of units that finished before a crash but were still waiting for their turn in results.jsonl."""
    found: dict[int, dict[str, Any]] = {}
    for index, unit in todo:
        path = scratch_dir(run_dir, unit.key) / EARLY_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # none, or torn by the crash: the unit runs again
        if isinstance(record, dict) and record.get("key") == unit.key and record.get("status") == "ok" \
                and record.get("version") == RESULTS_VERSION \
                and record.get("params") == json.loads(json.dumps(json_safe(unit.params))):
            found[index] = {**record, "index": index}
    return found


def _run_in_lane(name: str, kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """One study, its units in series in this process on one thread, as a unit gets in a pool worker (so the
    bits are the same): (run folder, None) or (run folder, why units failed)."""
    try:
        with torch_threads(1):
            return str(run_study(name, workers=1, **kwargs)), None
    except UnitsFailed as exc:  # its run folder is kept; the exception does not pickle (two arguments)
        return str(exc.run_dir), str(exc)


def run_studies(
    names: list[str], *, lanes: int, on_done: Callable[[str, Path, str | None], None] | None = None,
    organisms: dict[str, list[Any]] | None = None, training_progress: bool = False, **kwargs: Any,
) -> list[tuple[str, Path, str | None]]:
    """Run several studies ``lanes`` at a time, each in its own one-thread process with its units in series,
    the longest first (``Study.quick_seconds``). A study's serial parts (preparing, analysing, rendering the
    report) then overlap another study's units instead of leaving a core idle, as a per-study pool does.

    With ``organisms`` the organisms the studies need and the cache lacks are trained in the same pool
    (:func:`safetylab.pool.run_graph`): training comes first, a variant as soon as its base is cached, and a
    study starts as soon as its own organisms are, so a study that needs none, or whose organisms are done,
    takes a core that the last organisms to train would leave idle. With fewer organisms to train than lanes they
    train first instead (:func:`safetylab.organisms.cache.build_many`, each on its share of the cores).

    Args:
        names: studies, in the order the results are returned.
        lanes: processes at a time (the number of cores).
        on_done: called in this process as each study finishes, with (name, run folder, failure or None).
        organisms: each study's organism requests (``Study.organisms(config)``), to train first; None: the
            cache already holds them (or each study trains what it lacks in its own lane).
        training_progress: show the training's progress (a bar, or lines in a log).
        kwargs: passed to :func:`run_study` (scale, seed, out, quiet, cache_dir, device, argv).

    Returns:
        (name, run folder, failure message or None) per study, in ``names`` order. Bad input in any study
        (``UserError``) stops the rest and is raised here.
    """
    from contextlib import ExitStack

    from safetylab.organisms.cache import build_many, work_shares
    from safetylab.pool import run_graph

    organism_dir = Path(kwargs.get("cache_dir") or default_cache_dir()) / "organisms"
    needed = {n: (organisms or {}).get(n) or [] for n in names}
    device = kwargs.get("device", "cpu")
    jobs, missing = study_graph(names, needed, organism_dir, lanes=lanes, device=device, kwargs=kwargs)
    if missing and len(missing) < lanes:
        # Fewer organisms than cores: in the pool a lone base and its variants would train on one thread each
        # while the studies, waiting on them, leave the other cores idle; build_many gives each its share of
        # the cores instead.
        build_many([r for rs in needed.values() for r in rs], organism_dir, workers=lanes,
                   quiet=not training_progress, device=device)
        jobs, missing = study_graph(names, needed, organism_dir, lanes=lanes, device=device, kwargs=kwargs)
    if missing:
        organism_dir.mkdir(parents=True, exist_ok=True)
    share, left = work_shares(missing), set(missing)
    done: dict[str, tuple[Path, str | None]] = {}
    with ExitStack() as training:
        advance = training.enter_context(bar(
            f"training {len(missing)} organisms (a study starts once its own are cached)", 100.0,
            quiet=not (training_progress and missing), unit="percent of the estimated work"))

        def finished(key: Any, result: Any) -> None:
            if key in share:
                advance(share[key])
                left.discard(key)
                if not left:
                    training.close()  # the training bar ends with the last organism, not the last study
                return
            name, (rd, err) = key.removeprefix("study:"), result
            done[name] = (Path(rd), err)
            if on_done is not None:
                on_done(name, Path(rd), err)

        def failed(key: Any, exc: BaseException, still_running: int) -> None:
            what = key.removeprefix("study:") if key not in share else f"training organism {key}"
            print(f"safetylab: {what} failed ({type(exc).__name__}: {exc}); no further job starts"
                  + (f", {still_running} running finish first" if still_running else ""), file=sys.stderr)

        run_graph(jobs, lanes, on_done=finished, on_error=failed)
    return [(n, *done[n]) for n in names]


def study_graph(names: list[str], needed: dict[str, list[Any]], organism_dir: Path, *, lanes: int,
                device: str = "cpu", kwargs: dict[str, Any] | None = None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """The pool jobs of :func:`run_studies` and the organisms missing from ``organism_dir``: one job per missing
    organism (keyed by hash, ranked above every study; a variant needs its base when that is missing too), and
    one per study (``"study:<name>"``, ranked by ``quick_seconds``) needing its own missing organisms and their
    bases. ``needed``: each study's organism requests."""
    from safetylab.organisms.cache import missing_organisms, training_jobs, with_bases
    from safetylab.pool import Job
    from safetylab.registry import get_study

    missing = missing_organisms([r for rs in needed.values() for r in rs], organism_dir)
    threads = max(1, (os.cpu_count() or 1) // max(1, lanes))
    jobs: dict[Any, Job] = {h: replace(j, rank=(1, *j.rank))
                            for h, j in training_jobs(missing, organism_dir, threads=threads, device=device).items()}
    for n in names:
        needs = frozenset(with_bases([r.config() for r in needed.get(n, [])])) & missing.keys()
        jobs[f"study:{n}"] = Job(_run_in_lane, (n, kwargs or {}), needs=frozenset(needs),
                                 rank=(0, get_study(n).quick_seconds))
    return jobs, missing


class UnitsFailed(Exception):
    """Some units raised; their errors are in results.jsonl and the report says so."""

    def __init__(self, run_dir: Path, n_failed: int) -> None:
        super().__init__(f"{n_failed} unit(s) failed; see {run_dir / RESULTS_FILE}; rerun them with --resume {run_dir}")
        self.run_dir = run_dir
        self.n_failed = n_failed


def _check_units(study: Study, units: list[Unit]) -> None:
    keys = [u.key for u in units]
    assert len(keys) == len(set(keys)), f"study {study.name} produced duplicate unit keys"
    if not units:
        raise UserError(f"{study.name}: this config produces no units of work; check its counts (seeds, arms, models)")
