"""Run folders, config resolution, the resumable results log, and the run loop.

A run folder ``runs/<study>/<YYYYmmdd-HHMMSS>-<shortid>/`` holds:

``config.yaml``    the fully resolved study config (feed it back with ``--config``);
``env.json``       study, scale, seed, command line, package versions, git commit, device;
``results.jsonl``  one line per finished unit, appended atomically (write, flush, fsync)
                   in unit order, so the same config and seed give the same bytes
                   (the ``timing`` field aside);
``summary.json``, ``report.md``, ``report.html`` and ``*.png`` — all re-derivable from
the three files above with ``safetylab report RUN_DIR``.

Validation happens before anything is written: a bad config, study name or output
path raises :class:`~safetylab.errors.UserError` and leaves the disk untouched.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from safetylab.errors import UserError, pydantic_one_line
from safetylab.study import Context, Study, StudyConfig, Unit, default_cache_dir

RESULTS_VERSION = 1
"""Schema version of a ``results.jsonl`` line; bumped when the schema changes."""

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"

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


# --------------------------------------------------------------------------- results log


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _json_safe(value.item())
    return value


def dumps_line(record: dict[str, Any]) -> str:
    return json.dumps(_json_safe(record), separators=(",", ":"), allow_nan=False) + "\n"


class ResultsLog:
    """Append-only ``results.jsonl``: each line written, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        line = dumps_line(record).encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """All records. A torn last line (no trailing newline: a crash mid-write) is
        cut off when ``repair`` is true and reported; a corrupt line anywhere else is
        an error, never silently dropped."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        torn = bool(data) and not data.endswith(b"\n")
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
        records = []
        for i, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise UserError(
                    f"{self.path} line {i} is corrupt (not JSON) and is not the last line; "
                    f"remove that line by hand to rerun its unit"
                ) from None
            if not isinstance(rec, dict) or "key" not in rec or "status" not in rec:
                raise UserError(f"{self.path} line {i} is not a safetylab result record; remove that line")
            if rec.get("version") != RESULTS_VERSION:
                raise UserError(
                    f"{self.path} line {i} has schema version {rec.get('version')}, this safetylab "
                    f"reads version {RESULTS_VERSION}; rerun the study with this version"
                )
            records.append(rec)
        if torn and repair:
            # Only after every complete line parsed: a file with a corrupt middle is left untouched.
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            print(
                f"note: {self.path} ended in a torn line (a crash mid-write); removed it, that unit will be rerun",
                file=sys.stderr,
            )
        return records


def finished_records(records: list[dict[str, Any]], units: list[Unit]) -> list[dict[str, Any]]:
    """Successful records of the given units, in unit order (last one wins per key)."""
    ok = {r["key"]: r for r in records if r["status"] == "ok"}
    return [
        {"key": u.key, "params": ok[u.key]["params"], "result": ok[u.key]["result"]}
        for u in units
        if u.key in ok
    ]


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run(run_dir: Path) -> tuple[Study, StudyConfig, dict[str, Any]]:
    """Study, config and env of an existing run folder, or a UserError saying what is wrong."""
    from safetylab.studies import get_study

    if not run_dir.exists():
        raise UserError(f"run folder {run_dir} does not exist; pass a folder made by 'safetylab run'")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a run folder made by 'safetylab run'")
    env_path, cfg_path = run_dir / ENV_FILE, run_dir / CONFIG_FILE
    for p in (env_path, cfg_path):
        if not p.is_file():
            raise UserError(f"{run_dir} is not a safetylab run folder (no {p.name}); pass a folder made by 'safetylab run'")
    try:
        env = json.loads(env_path.read_text())
        study_name = env["study"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{env_path} is corrupt; the run cannot be identified — start a new run") from None
    study = get_study(study_name)
    try:
        raw = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{cfg_path} is corrupt (not YAML); restore it or start a new run") from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path} is corrupt (not a mapping); restore it or start a new run")
    try:
        config = study.config_cls.model_validate(raw)
    except ValidationError as exc:
        raise UserError(pydantic_one_line(exc, where=str(cfg_path))) from None
    return study, config, env


# --------------------------------------------------------------------------- the run loop


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
    from safetylab.executors import make_executor
    from safetylab.report import render_run
    from safetylab.studies import get_study

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
        ex = make_executor(executor, workers=workers, address=address)
        pending: dict[int, dict[str, Any]] = {}
        order = [i for i, _ in todo]
        next_pos = 0
        from safetylab.progress import bar

        try:
            with bar(f"{study.name}: units", len(todo), transient=False, quiet=quiet) as advance:
                for index, record in ex.map_units(study, config, todo, ctx):
                    pending[index] = record
                    if record["status"] != "ok":
                        failed += 1
                        print(f"unit {record['key']} failed: {record['error']}", file=sys.stderr)
                    # Write in unit order so results.jsonl is byte-reproducible under any pool.
                    while next_pos < len(order) and order[next_pos] in pending:
                        log.append(pending.pop(order[next_pos]))
                        next_pos += 1
                    advance(1)
        finally:
            ex.close()

    render_run(run_dir, study=study, config=config, env=env)
    if failed:
        raise UnitsFailed(run_dir, failed)
    return run_dir


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


def execute_unit(study: Study, config: StudyConfig, unit: Unit, ctx: Context, index: int) -> dict[str, Any]:
    """Run one unit and wrap it as a results.jsonl record; an exception becomes a
    failed record carrying its error (never swallowed: the run reports it)."""
    import traceback

    start = time.perf_counter()
    try:
        result = study.run_unit(config, unit, ctx)
        status, error = "ok", None
    except Exception as exc:  # noqa: BLE001 - recorded and surfaced, not ignored
        result, status = None, "failed"
        error = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=8)
        error = f"{error}\n{tb}"
    return {
        "version": RESULTS_VERSION,
        "index": index,
        "key": unit.key,
        "params": unit.params,
        "status": status,
        "result": result,
        "error": error,
        "timing": {
            "elapsed_s": round(time.perf_counter() - start, 3),
            "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        },
    }
