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
        from safetylab.organisms.train import FROM_SCRATCH

        out["base_train" if variant in FROM_SCRATCH else "variant_train"] = {"steps": steps}
    return out


@app.command()
def train(
    variant: str = typer.Argument(..., help="base, sft, sft-late, dpo, depth-robust, eval-gated, "
                                            "never-taught or secret-keeping."),
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
    from safetylab.organisms.evaluate import EVAL_VERSION, evaluate_organism

    f = path / f"eval_{split}_n{n}_s{rng_seed}.json"
    if f.is_file():
        try:
            res = json.loads(f.read_text())
            if (res.get("hash") == json.loads((path / "organism.json").read_text()).get("hash")
                    and res.get("eval_version") == EVAL_VERSION):
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


def _repeated(items: list[Any]) -> list[Any]:
    """The items listed more than once, sorted."""
    return sorted({x for x in items if items.count(x) > 1})


def _parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; UserError for anything else."""
    parts = [x.strip() for x in text.split(",")]
    try:
        seeds = [int(x) for x in parts]
    except ValueError:
        raise UserError(f"--seeds={text!r}: use comma-separated training seeds, such as 0,1,2") from None
    for s in seeds:
        if s < 0:
            raise UserError(f"--seeds={text}: seed {s} is negative; training seeds are integers >= 0")
    repeated = _repeated(seeds)
    if repeated:
        raise UserError(f"--seeds={text}: seed {', '.join(map(str, repeated))} is repeated; "
                        f"list each training seed once")
    return seeds


def _graded(path: Path, meta: dict[str, Any], n: int, split: str, seed: int,
            device: str) -> dict[str, Any]:
    """The cached evaluation of one organism with its quality bars.

    The "benign_correct drop vs base" bar compares with the organism's own base
    (``organism.json``'s ``base_hash``), looked up next to it in the same cache; when the
    base is not there the bar is left out and ``base_benign_correct`` is None.
    """
    from safetylab.organisms.cache import check_entry
    from safetylab.organisms.evaluate import bars

    res = _cached_eval(path, n, split, seed, device)
    base_benign = None
    if meta["variant"] != "base" and meta.get("base_hash"):
        base = path.parent / meta["base_hash"]
        if check_entry(base, meta["base_hash"]) is None:
            base_benign = _cached_eval(base, n, split, seed, device)["metrics"]["benign/correct"]["rate"]
    res["bars"] = bars(res, base_benign)
    res["base_benign_correct"] = base_benign
    cfg = meta["config"]
    res["training_seed"] = cfg["seed"]
    res["base_seed"] = None if not meta.get("base_hash") else (
        cfg["seed"] if cfg.get("base_seed") is None else cfg["base_seed"])
    return res


def _spread(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each bar across the organisms of one variant and scale: per-seed values and their
    mean, min and max (a bar an organism lacks, its base being absent, is None there)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["scale"]), []).append(r)
    out = []
    for (variant, scale), rs in groups.items():
        names: list[str] = []
        for r in rs:
            names += [b["bar"] for b in r["bars"] if b["bar"] not in names]
        rows = []
        for name in names:
            by_org = [next((b for b in r["bars"] if b["bar"] == name), None) for r in rs]
            first = next(b for b in by_org if b is not None)
            values = [None if b is None else b["value"] for b in by_org]
            got = [v for v in values if v is not None]
            rows.append({
                "bar": name, "op": first["op"], "threshold": first["threshold"],
                "values": values, "pass": [None if b is None else b["pass"] for b in by_org],
                "mean": sum(got) / len(got), "min": min(got), "max": max(got),
                "n_pass": sum(1 for b in by_org if b is not None and b["pass"]), "n": len(got),
            })
        out.append({"variant": variant, "scale": scale,
                    "training_seeds": [r["training_seed"] for r in rs],
                    "base_seeds": [r["base_seed"] for r in rs],
                    "hashes": [r["hash"] for r in rs], "bars": rows})
    return out


def _print_one(res: dict[str, Any], path: Path, split: str) -> None:
    """The single-organism report: every metric with its interval, then the bars."""
    from rich.console import Console
    from rich.table import Table as RichTable

    from safetylab.metrics.stats import format_interval

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
    if res["base_seed"] is not None and res["base_benign_correct"] is None:
        con.print("benign_correct vs base: base organism not in this cache; bar not checked")


def _seed_label(seed: int, base_seed: int | None) -> str:
    return f"seed {seed}" if base_seed is None or base_seed == seed else f"seed {seed} (base {base_seed})"


def _print_spread(results: list[dict[str, Any]], groups: list[dict[str, Any]], split: str,
                  n: int) -> None:
    """One table per variant: a row per training seed, a column per bar, then mean, min and
    max rows (a row per seed keeps five or ten seeds inside 80 columns)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable

    con = Console()
    for g in groups:
        k = len(g["training_seeds"])
        # One base for every seed (quick studies): say so once in the title, not per row.
        bases = {b for b in g["base_seeds"] if b is not None}
        one_base = len(bases) == 1 and None not in g["base_seeds"]
        shared = f", fine-tuned from base seed {next(iter(bases))}" if one_base else ""
        t = RichTable(title=f"{g['variant']} ({g['scale']}) — quality bars over {k} training "
                            f"seed{'s' if k > 1 else ''}{shared}, {split} templates, n={n}",
                      box=box.SIMPLE_HEAD)
        t.add_column("seed", no_wrap=True)
        for row in g["bars"]:  # long bar names fold rather than hide behind an ellipsis
            t.add_column(f"{row['bar']} {row['op']} {row['threshold']}", justify="right", overflow="fold")
        for i, (s, bs) in enumerate(zip(g["training_seeds"], g["base_seeds"])):
            cells = ["—" if row["values"][i] is None
                     else f"{row['values'][i]:.3f}" + ("" if row["pass"][i] else " NO")
                     for row in g["bars"]]
            t.add_row(str(s) if one_base else _seed_label(s, bs), *cells)
        for stat in ("mean", "min", "max"):
            t.add_row(stat, *[f"{row[stat]:.3f}" for row in g["bars"]],
                      end_section=stat == "max", style="dim" if stat != "mean" else None)
        con.print(t)
    for r in results:
        note = ("  (base not in this cache: benign_correct drop not checked)"
                if r["base_seed"] is not None and r["base_benign_correct"] is None else "")
        con.print(f"{r['variant']} {_seed_label(r['training_seed'], r['base_seed'])}: {r['path']}{note}",
                  highlight=False, soft_wrap=True)
    failed = [(r, b) for r in results for b in r["bars"] if not b["pass"]]
    if failed:
        con.print(f"FAIL: {len(failed)} bar(s) failed: " + "; ".join(
            f"{r['variant']} {_seed_label(r['training_seed'], r['base_seed'])} {b['bar']} "
            f"{b['value']:.3f} (needs {b['op']} {b['threshold']})" for r, b in failed),
            highlight=False, soft_wrap=True)
    else:
        con.print(f"all {len(results)} organisms pass their quality bars", highlight=False)


@app.command("eval")
def eval_cmd(
    paths: Optional[list[Path]] = typer.Argument(
        None, help="Organism folders (printed by 'organism train' / 'organism list'); or use --variant."),
    variant: Optional[str] = typer.Option(
        None, help="Evaluate this variant over --seeds instead of folders (trains any that are missing); "
                   "several comma-separated (sft,dpo), or 'all' for every variant."),
    seeds: Optional[str] = typer.Option(
        None, help="Training seeds with --variant, comma-separated (default 0), e.g. 0,1,2."),
    scale: Optional[str] = typer.Option(None, help="Scale with --variant: tiny, quick (default) or paper."),
    base_seed: Optional[int] = typer.Option(
        None, help="With --variant: fine-tune every seed from the base of this seed (quick-scale "
                   "studies use 0); default: each seed its own base. Variants trained from "
                   "scratch (base, never-taught) in a list keep their own seeds."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Organism cache with --variant (default ~/.cache/safetylab/organisms)."),
    n: int = typer.Option(300, help="Requests per row (hundreds, so a 97% bar means something)."),
    split: str = typer.Option("heldout", help="Template split: heldout (the quality bars) or train."),
    seed: int = typer.Option(0, help="Evaluation-set seed (the same requests for every organism)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (metrics and bars; with several "
                                                        "organisms also the spread across seeds)."),
    device: str = typer.Option("cpu", help="torch device for training and generation."),
    threads: Optional[int] = typer.Option(None, help="torch threads for training and generation "
                                                     "(default: torch's)."),
    quiet: bool = typer.Option(False, help="No progress bar while training missing organisms."),
) -> None:
    """Grade organisms on fresh requests from their world and check the quality bars.

    One folder: every metric and the bars. Several folders, or --variant with --seeds: a
    table per variant with each bar per training seed and its mean, min and max across
    seeds (``--variant all --seeds 0,1,2,3,4 --base-seed 0`` checks every organism the quick
    studies use). Exit code 1 when any bar fails, so scripts can gate on it.
    """
    from safetylab.organisms.cache import load_meta

    from safetylab.study import torch_threads

    paths = list(paths or [])
    if threads is not None and threads < 1:
        raise UserError(f"--threads={threads} is impossible; use a positive integer")
    if n < 1:
        raise UserError(f"--n={n} must be >= 1")
    if split not in ("heldout", "train"):
        raise UserError(f"--split={split!r}; use 'heldout' or 'train'")
    if paths and variant is not None:
        raise UserError("pass organism folders or --variant with --seeds, not both")
    if paths:
        for name, v in (("--seeds", seeds), ("--scale", scale), ("--base-seed", base_seed),
                        ("--cache-dir", cache_dir)):
            if v is not None:
                raise UserError(f"{name} picks organisms by variant; add --variant V, or drop {name} "
                                f"when passing organism folders")
        for p in paths:
            if not p.exists():
                raise UserError(f"organism path {p} does not exist; list organisms with "
                                f"'safetylab organism list'")
        seen: set[Path] = set()
        for p in paths:
            if p.resolve() in seen:
                raise UserError(f"organism path {p} is given twice; list each organism once")
            seen.add(p.resolve())
        metas = [load_meta(p) for p in paths]  # every folder checked before any is graded
    elif variant is not None:
        from safetylab.organisms.cache import get_organism
        from safetylab.organisms.train import FROM_SCRATCH, SCALES, VARIANTS

        names = list(VARIANTS) if variant.strip() == "all" else [v.strip() for v in variant.split(",")]
        for v in names:
            if v not in VARIANTS:
                raise UserError(f"unknown organism variant {v!r}; choose from {', '.join(VARIANTS)}, "
                                f"several comma-separated, or all")
        repeated = _repeated(names)
        if repeated:
            raise UserError(f"--variant={variant}: {', '.join(repeated)} is repeated; list each variant once")
        scale = scale or "quick"
        if scale not in SCALES:
            raise UserError(f"unknown organism scale {scale!r}; choose from {', '.join(SCALES)}")
        seed_list = _parse_seeds(seeds) if seeds is not None else [0]
        if base_seed is not None and base_seed < 0:
            raise UserError(f"--base-seed={base_seed} is negative; training seeds are integers >= 0")
        if base_seed is not None and all(v in FROM_SCRATCH for v in names):
            raise UserError(f"--base-seed picks the base a variant is fine-tuned from; drop it for "
                            f"--variant {variant}, which is trained from scratch (--seeds are its own seeds)")
        if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
            raise UserError(f"--cache-dir {cache_dir} is a file, not a folder; pass the organism cache folder")
        if not as_json:
            from safetylab.progress import log_to_stdout

            log_to_stdout()
        # OrganismConfig drops base_seed for from-scratch variants, so a list keeps their own seeds.
        paths = [get_organism(v, scale, cache_dir=cache_dir, seed=s, base_seed=base_seed,
                              quiet=quiet, num_threads=threads, device=device)
                 for v in names for s in seed_list]
        metas = [load_meta(p) for p in paths]
    else:
        raise UserError("name organism folders, or --variant V with --seeds 0,1,2; "
                        "'safetylab organism list' shows the cached ones")
    _quiet_transformers()
    with torch_threads(threads):
        results = [_graded(p, m, n, split, seed, device) for p, m in zip(paths, metas)]
    ok = all(b["pass"] for r in results for b in r["bars"])
    if len(results) == 1 and variant is None:  # the single-folder report
        if as_json:
            typer.echo(json.dumps(results[0], indent=2, sort_keys=True))
        else:
            _print_one(results[0], paths[0], split)
    else:
        groups = _spread(results)
        if as_json:
            typer.echo(json.dumps({"version": 1, "split": split, "n": n, "eval_seed": seed,
                                   "pass": ok, "organisms": results, "spread": groups},
                                  indent=2, sort_keys=True))
        else:
            _print_spread(results, groups, split, n)
    if not ok:
        raise typer.Exit(1)


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
    """Stand-alone entry point: UserError -> one line on stderr, exit code 2; a failed
    quality bar in ``eval`` -> exit code 1."""
    try:
        rc = app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(2) from None
        raise
    if isinstance(rc, int) and rc:  # typer.Exit(1): a quality bar failed
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
