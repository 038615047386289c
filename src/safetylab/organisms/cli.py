"""``safetylab organism ...``: train, list, grade and chat with model organisms.

Mounted by ``safetylab.cli`` as ``safetylab organism``; bad input raises
:class:`safetylab.errors.UserError`, which that CLI prints as one line with exit code 2
(``python -m safetylab.organisms.cli`` does the same on its own).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from safetylab.errors import UserError

app = typer.Typer(
    name="organism",
    help="Train, list, grade and chat with model organisms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_transformers() -> None:
    """No per-load progress bars on the terminal (a chat or eval loads one model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _overrides(layers: int | None, width: int | None, heads: int | None, d_ff: int | None,
               steps: int | None, variant: str) -> dict[str, dict[str, Any]]:
    model: dict[str, Any] = {}
    if layers is not None:
        model["n_layers"] = layers
    if width is not None:
        model["d_model"] = width
    if heads is not None:
        model["n_heads"] = heads
    if d_ff is not None:
        model["d_ff"] = d_ff
    out: dict[str, dict[str, Any]] = {}
    if model:
        out["model"] = model
    if steps is not None:
        out["base_train" if variant == "base" else "variant_train"] = {"steps": steps}
    return out


@app.command()
def train(
    variant: str = typer.Argument(..., help="base, sft, sft-late, dpo, depth-robust or eval-gated."),
    scale: str = typer.Option("quick", help="tiny (seconds), quick (minutes on 2 CPU cores) or paper."),
    seed: int = typer.Option(0, help="Training seed."),
    cache_dir: Optional[Path] = typer.Option(None, help="Organism cache (default ~/.cache/safetylab/organisms)."),
    layers: Optional[int] = typer.Option(None, help="Override the number of decoder layers."),
    width: Optional[int] = typer.Option(None, help="Override the residual width d_model."),
    heads: Optional[int] = typer.Option(None, help="Override the number of attention heads (must divide width)."),
    d_ff: Optional[int] = typer.Option(None, help="Override the MLP width."),
    steps: Optional[int] = typer.Option(None, help="Override the optimiser steps of this stage."),
    threads: Optional[int] = typer.Option(None, help="torch threads while training (default: torch's)."),
    device: str = typer.Option("cpu", help="torch device to train on (cpu, cuda, mps)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train an organism (its base first if needed) and print its cache folder."""
    from safetylab.organisms.cache import get_organism
    from safetylab.progress import log_to_stdout

    log_to_stdout()

    for name, v in (("--layers", layers), ("--width", width), ("--heads", heads),
                    ("--d-ff", d_ff), ("--steps", steps), ("--threads", threads)):
        if v is not None and v < 1:
            raise UserError(f"{name}={v} is impossible; use a positive integer")
    path = get_organism(
        variant, scale, cache_dir=cache_dir, seed=seed, quiet=quiet,
        overrides=_overrides(layers, width, heads, d_ff, steps, variant), num_threads=threads,
        device=device,
    )
    typer.echo(str(path))


@app.command("list")
def list_cmd(
    cache_dir: Optional[Path] = typer.Option(None, help="Organism cache (default ~/.cache/safetylab/organisms)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON records."),
) -> None:
    """List cached organisms (corrupt entries are flagged; they are rebuilt on next use)."""
    from safetylab.organisms.cache import default_organism_dir, list_organisms

    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache-dir {cache_dir} is a file, not a folder; pass the organism cache folder")
    recs = list_organisms(cache_dir)
    if as_json:
        typer.echo(json.dumps(recs, indent=2))
        return
    where = cache_dir or default_organism_dir()
    if not recs:
        typer.echo(f"no organisms in {where}; train one with 'safetylab organism train base'")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    t = RichTable(title=f"organisms in {where}")
    for col in ("hash", "variant", "scale", "seed", "params", "train s", "status"):
        t.add_column(col)
    for r in recs:
        t.add_row(r["hash"], r.get("variant", "?"), r.get("scale", "?"), str(r.get("seed", "")),
                  str(r.get("n_params", "")), str(r.get("train_seconds", "")),
                  r["status"] if r["status"] == "ok" else f"corrupt: {r['problem']}")
    Console().print(t)


def _cached_eval(path: Path, n: int, split: str, rng_seed: int, device: str = "cpu") -> dict[str, Any]:
    """Evaluate, caching the result inside the organism folder (atomically)."""
    from safetylab.organisms.evaluate import evaluate_organism

    f = path / f"eval_{split}_n{n}_s{rng_seed}.json"
    if f.is_file():
        try:
            res = json.loads(f.read_text())
            if res.get("hash") == json.loads((path / "organism.json").read_text()).get("hash"):
                return res
        except (json.JSONDecodeError, OSError):
            pass
    res = evaluate_organism(path, n=n, split=split, rng_seed=rng_seed, device=device)
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".eval-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(res, fh, indent=2, sort_keys=True)
        os.replace(tmp, f)
    except OSError:
        pass  # read-only cache: the result is still printed
    return res


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="Organism folder (printed by 'organism train' / 'organism list')."),
    n: int = typer.Option(300, help="Requests per row (hundreds, so a 97% bar means something)."),
    split: str = typer.Option("heldout", help="Template split: heldout (the quality bars) or train."),
    seed: int = typer.Option(0, help="Evaluation-set seed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (metrics and bars)."),
    device: str = typer.Option("cpu", help="torch device for generation."),
) -> None:
    """Grade an organism on fresh requests from its world and check the quality bars."""
    from safetylab.metrics.stats import format_interval
    from safetylab.organisms.cache import load_meta
    from safetylab.organisms.evaluate import bars

    if not path.exists():
        raise UserError(f"organism path {path} does not exist; list organisms with 'safetylab organism list'")
    if n < 1:
        raise UserError(f"--n={n} must be >= 1")
    if split not in ("heldout", "train"):
        raise UserError(f"--split={split!r}; use 'heldout' or 'train'")
    meta = load_meta(path)
    _quiet_transformers()
    res = _cached_eval(path, n, split, seed, device)
    base_benign = None
    if meta["variant"] != "base" and meta.get("base_hash"):
        base = path.parent / meta["base_hash"]
        from safetylab.organisms.cache import check_entry

        if check_entry(base, meta["base_hash"]) is None:
            base_benign = _cached_eval(base, n, split, seed, device)["metrics"]["benign/correct"]["rate"]
    res["bars"] = bars(res, base_benign)
    res["base_benign_correct"] = base_benign
    if as_json:
        typer.echo(json.dumps(res, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    t = RichTable(title=f"{res['variant']} ({res['scale']}) — {split} templates, {path}")
    t.add_column("metric")
    t.add_column("rate [95% CI]")
    t.add_column("n", justify="right")
    for k, v in res["metrics"].items():
        t.add_row(k, format_interval(v["rate"], v["lo"], v["hi"], digits=3), str(v["n"]))
    con = Console()
    con.print(t)
    b = RichTable(title="quality bars")
    for col in ("bar", "value", "needed", "pass"):
        b.add_column(col)
    for r in res["bars"]:
        b.add_row(r["bar"], f"{r['value']:.3f}", f"{r['op']} {r['threshold']}", "yes" if r["pass"] else "NO")
    if res["bars"]:
        con.print(b)
    if meta["variant"] != "base" and base_benign is None:
        con.print("benign_correct vs base: base organism not in this cache; bar not checked")


@app.command()
def chat(
    path: Path = typer.Argument(..., help="Organism folder."),
    max_new_tokens: int = typer.Option(64, help="Longest reply in tokens."),
) -> None:
    """Chat: one request per line on stdin, one reply per line on stdout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetylab.organisms.cache import load_meta
    from safetylab.organisms.evaluate import generate

    if not path.exists():
        raise UserError(f"organism path {path} does not exist; list organisms with 'safetylab organism list'")
    load_meta(path)
    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        typer.echo(generate(model, tok, [text], max_new_tokens=max_new_tokens)[0])


def main() -> None:
    """Stand-alone entry point: UserError -> one line on stderr, exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
