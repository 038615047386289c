"""Prompt sets for real models: JSONL, CSV, plain-text files, or a Hugging Face dataset.

Organisms bring their own evaluation requests (``World.eval_requests``); this module is
for models whose prompts come from the user (``--prompts``, ``--prompt-column``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def _missing_column(source: str, column: str, columns: list[str]) -> ValueError:
    return ValueError(
        f"prompt file {source} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
        f"pass --prompt-column with one of them"
    )


def _from_records(source: str, records: list[Any], column: str) -> list[str]:
    out: list[str] = []
    columns: list[str] = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i + 1} is a {type(rec).__name__}, expected an object or a string")
        if column not in rec:
            columns = list(rec)
            raise _missing_column(source, column, columns)
        value = rec[column]
        if not isinstance(value, str):
            raise ValueError(f"{source}: record {i + 1} has {column}={value!r}, expected text")
        out.append(value)
    return out


def _read_jsonl(path: Path, column: str) -> list[str]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    return _from_records(str(path), records, column)


def _read_json(path: Path, column: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}); use a list of objects or JSONL") from None
    if isinstance(data, dict) and column in data and isinstance(data[column], list):
        return [str(x) for x in data[column]]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or JSONL), got a {type(data).__name__}")
    return _from_records(str(path), data, column)


def _read_csv(path: Path, column: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        if column not in columns:
            raise _missing_column(str(path), column, columns)
        return [row[column] for row in reader]


def _read_dataset(source: str, column: str, split: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets ships with the lm extra
        raise ValueError(
            "loading a Hugging Face dataset requires the 'datasets' package. Install with: pip install datasets"
        ) from None
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))  # a save_to_disk folder (Arrow)
    else:
        # A folder of data files, or a hub dataset id.
        ds = datasets.load_dataset(str(path) if path.is_dir() else source)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        chosen = split or ("test" if "test" in ds else "train" if "train" in ds else names[0] if len(names) == 1 else None)
        if chosen is None or chosen not in ds:
            raise ValueError(f"dataset {source} has splits {names}; pick one with a split name (got {split!r})")
        ds = ds[chosen]
    if column not in ds.column_names:
        raise _missing_column(source, column, list(ds.column_names))
    return [str(x) for x in ds[column]]


def load_prompts(
    source: str | Path,
    prompt_column: str = "prompt",
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompts from a file or dataset, in file order, stripped, empty ones dropped.

    Args:
        source: ``.jsonl`` (one object per line, or one JSON string per line), ``.json``
            (a list of objects), ``.csv`` (with a header), ``.txt`` (one prompt per line),
            a Hugging Face dataset folder (``save_to_disk`` or a folder of data files), or a
            hub dataset id.
        prompt_column: field/column holding the prompt text (ignored for ``.txt``).
        split: dataset split when the dataset has several.
        limit: keep at most this many prompts (the first ones).

    Returns:
        Non-empty prompt strings.

    Raises:
        ValueError: missing file, unknown format, missing column, or no prompts.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                prompts = _read_jsonl(path, prompt_column)
            elif suffix == ".json":
                prompts = _read_json(path, prompt_column)
            elif suffix == ".csv":
                prompts = _read_csv(path, prompt_column)
            elif suffix == ".txt":
                prompts = path.read_text(encoding="utf-8").splitlines()
            else:
                raise ValueError(f"prompt file {text} has suffix {suffix!r}; use one of {', '.join(FILE_SUFFIXES)} "
                                 f"or a Hugging Face dataset folder")
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompt file {text} is not UTF-8 text (undecodable byte at offset {exc.start}); "
                             "save it as UTF-8") from None
    elif path.is_dir():
        prompts = _read_dataset(text, prompt_column, split)
    elif path.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")):
        raise ValueError(f"prompt file {text} does not exist; check the --prompts path")
    else:
        prompts = _read_dataset(text, prompt_column, split)
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts in {text} (column {prompt_column!r}); the prompt set must not be empty")
    return prompts
