"""A run folder's raw record: its file names, the append-only results log, one unit run
into a record, and reading a folder back.

The run loop (:mod:`safetylab.runs`), the executors (:mod:`safetylab.executors`) and the
reports (:mod:`safetylab.report`) all build on this module and it on none of them, so the
run loop reads top-down: resolve a config, prepare, hand units to an executor, which
turns each into a record here, append the records here, render the report.

A ``results.jsonl`` line (schema :data:`RESULTS_VERSION`)::

    {"version": 1, "index": 3, "key": "shield-s3", "params": {...}, "status": "ok" | "failed",
     "result": {...} | null, "error": null | "ValueError: ...\n<traceback>",
     "timing": {"elapsed_s": 12.3, "finished_at": "2025-01-01T12:00:00"}}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from safetylab.errors import UserError, pydantic_one_line
from safetylab.study import Context, Study, StudyConfig, Unit, json_safe

RESULTS_VERSION = 1
"""Schema version of a ``results.jsonl`` line; bumped when the schema changes."""

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------- the results log


def dumps_line(record: dict[str, Any]) -> str:
    return json.dumps(json_safe(record), separators=(",", ":"), allow_nan=False) + "\n"


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

# --------------------------------------------------------------------------- one unit


def execute_unit(study: Study, config: StudyConfig, unit: Unit, ctx: Context, index: int) -> dict[str, Any]:
    """Run one unit and wrap it as a results.jsonl record; an exception becomes a
    failed record carrying its error (never swallowed: the run reports it)."""

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

# --------------------------------------------------------------------------- reading a run folder back


def load_run(run_dir: Path) -> tuple[Study, StudyConfig, dict[str, Any]]:
    """Study, config and env of an existing run folder, or a UserError saying what is wrong."""
    from safetylab.registry import get_study

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
