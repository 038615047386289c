"""The ``safetylab`` command line.

Bad input ends as one line on stderr naming the problem and the fix, exit code 2,
and nothing written; see :class:`safetylab.errors.UserError`.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from safetylab.errors import UserError

# safetylab draws its own rich progress bars; transformers' per-file tqdm bars (loading
# and writing shards) would interleave with them. Set before anything imports
# huggingface_hub, which reads it once; export it as 0 to get them back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="safetylab",
    help="Rerun empirical AI-safety claims as studies with controls, seeds and intervals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


class ScaleOpt(str, Enum):
    quick = "quick"
    paper = "paper"


class ExecutorOpt(str, Enum):
    local = "local"
    ray = "ray"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- list / describe


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """The studies, each with its claim in one line."""
    from safetylab.registry import available, get_study

    rows = []
    for name in available():
        study = get_study(name)
        rows.append({"study": name, "claim": study.summary or study.claim.statement,
                     "metric": study.claim.metric, "access": study.threat_model.access})
    if as_json:
        _print_json(rows)
        return
    table = Table(title="safetylab studies")
    for col in ("study", "claim", "adversary access"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["study"], r["claim"], r["access"])
    console.print(table)


def _config_fields(study: Any, scale: str) -> list[dict[str, Any]]:
    defaults = json.loads(study.resolve_config(scale).model_dump_json())
    rows = []
    for name, field in study.config_cls.model_fields.items():
        ann = field.annotation
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append({"key": name, "type": type_name, "default": defaults.get(name), "doc": field.description or ""})
    return rows


@app.command("describe")
def describe_cmd(
    study: str = typer.Argument(..., help="Study name (see 'safetylab list')."),
    scale: ScaleOpt = typer.Option(ScaleOpt.quick, help="Show the defaults at this scale."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """A study's claim, threat model and every config key with its default and meaning."""
    from safetylab.registry import get_study

    s = get_study(study)
    fields = _config_fields(s, scale.value)
    if as_json:
        _print_json({"study": s.name, "claim": s.claim.model_dump(), "threat_model": s.threat_model.model_dump(),
                     "scale": scale.value, "config": fields})
        return
    console.print(f"[bold]{s.name}[/bold]: {s.claim.statement}")
    console.print(f"decisive metric: {s.claim.metric} ({s.claim.direction} than {s.claim.threshold:g})")
    c = s.claim.contrast
    if c is not None:
        arms = ", ".join(c.treatment) + (f" vs {', '.join(c.control)}" if c.control else "")
        console.print(f"primary contrast: {arms}; {c.measure}; unit of replication: {c.unit}"
                      + ("; Holm-corrected over the treatments" if c.multiplicity == "holm" else ""))
        console.print(f"threshold: {s.claim.threshold:g} ({c.threshold_reason})")
    for ctl in s.claim.controls:
        must = "must show" if ctl.kind == "positive" else "must not show"
        console.print(f"{ctl.kind} control '{ctl.name}' ({', '.join(ctl.arms)}): {must} {ctl.measure} above "
                      f"{ctl.threshold:g} -- {ctl.reason}")
    if s.calibration is not None:
        console.print(f"calibrated with 'safetylab calibrate {s.name}': null {s.calibration.null_effect:g}, "
                      f"declared power {s.calibration.power:.0%} at {s.calibration.alternative_effect:g}")
    table = Table(title=f"config keys ({scale.value} scale) — set with --set key=value or --config FILE.yaml")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for f in fields:
        table.add_row(f["key"], f["type"], json.dumps(f["default"]), f["doc"])
    console.print(table)


# --------------------------------------------------------------------------- run


def _verdict_text(run_dir: Path) -> str:
    from safetylab.report import describe_verdict

    summary = json.loads((run_dir / "summary.json").read_text())
    return f"{summary['study']}: {describe_verdict(summary)}"


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    study: Optional[str] = typer.Argument(None, help="Study name (see 'safetylab list'); omit with --resume."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of config keys."),
    set_: list[str] = typer.Option([], "--set", help="Override one config key: --set key=value (repeatable)."),
    scale: ScaleOpt = typer.Option(ScaleOpt.quick, help="quick: minutes on 2 CPU cores; paper: the essay's sizes."),
    seed: Optional[int] = typer.Option(None, help="Master seed (default: the config's seed)."),
    executor: ExecutorOpt = typer.Option(ExecutorOpt.local, help="local process pool, or ray."),
    workers: int = typer.Option(1, min=1, help="Parallel units (processes or Ray CPUs)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; without it a local Ray is started."),
    out: Path = typer.Option(Path("runs"), help="Root folder for run folders."),
    resume: Optional[Path] = typer.Option(None, help="Resume this run folder: finished units are skipped."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache for trained organisms (default ~/.cache/safetylab)."),
    device: str = typer.Option("cpu", help="torch device for studies that use one (cpu, cuda)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON at the end."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the config and list the organisms this run needs: cached, resumable or to "
                                 "train, with the training time each would take on one CPU core. Trains and writes "
                                 "nothing."),
) -> None:
    """Run one study (or resume one) and write its report.

    Any config key also works as an option: --prompt-column text, --exit-mode confidence,
    --model PATH (one entry of a 'models' list); see 'safetylab describe STUDY'.
    """
    from safetylab.progress import log_to_stdout
    from safetylab.runs import UnitsFailed, parse_extra_options, parse_set_options, run_study

    log_to_stdout(not as_json)  # `safetylab run X > run.log` still says what it is doing
    if resume is None and study is None:
        raise UserError("name a study to run (see 'safetylab list'), or pass --resume RUN_DIR")
    if resume is not None:
        if config is not None or set_ or seed is not None or ctx.args:
            raise UserError("--resume reuses the run's own config; drop --config/--set/--seed or start a new run")
        from safetylab.results import load_run

        existing, _, _ = load_run(resume)
        if study is not None and study != existing.name:
            raise UserError(f"{resume} is a run of '{existing.name}', not '{study}'; drop the study name or pick its run")
    if dry_run:
        from safetylab.registry import get_study
        from safetylab.runs import resolve_config
        from safetylab.study import default_cache_dir

        if resume is not None:
            raise UserError("--dry-run plans a new run; drop --resume (a resumed run's organisms are already built)")
        chosen = get_study(study or "")
        planned = resolve_config(chosen, scale=scale.value, config_file=config, seed=seed,
                                 overrides={**parse_extra_options(ctx.args), **parse_set_options(set_)})
        # The measured study time is that of the default quick config; a changed one is not estimated.
        default = config is None and not set_ and not ctx.args
        _print_plan([(chosen, planned)], (cache_dir or default_cache_dir()) / "organisms", scale.value, as_json,
                    study_time=default)
        return
    try:
        run_dir = run_study(
            study or "",
            scale=scale.value,
            overrides={**parse_extra_options(ctx.args), **parse_set_options(set_)},
            config_file=config,
            seed=seed,
            out=out,
            resume=resume,
            executor=executor.value,
            workers=workers,
            address=address,
            quiet=quiet,
            cache_dir=cache_dir,
            device=device,
            argv=["safetylab", *sys.argv[1:]],
        )
    except UnitsFailed as exc:
        print(f"safetylab: {exc}", file=sys.stderr)
        raise typer.Exit(1)
    if as_json:
        _print_json(json.loads((run_dir / "summary.json").read_text()))
    else:
        console.print(_verdict_text(run_dir))
        console.print(f"report: {run_dir / 'report.html'}")


# --------------------------------------------------------------------------- reproduce


@app.command("reproduce")
def reproduce_cmd(
    scale: ScaleOpt = typer.Option(ScaleOpt.quick, help="quick: minutes on 2 CPU cores; paper: the essay's sizes."),
    only: Optional[str] = typer.Option(None, help="Comma-separated studies to run (default: all)."),
    seed: Optional[int] = typer.Option(None, help="Master seed for every study."),
    executor: ExecutorOpt = typer.Option(ExecutorOpt.local, help="local process pool, or ray."),
    workers: Optional[int] = typer.Option(
        None, min=1, help="Parallel units per study. Default: one study per core, each with its units in "
                          "series on one thread; with --workers N the studies run one after another, N units "
                          "at a time."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address."),
    out: Path = typer.Option(Path("runs"), help="Root folder for run folders."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache for trained organisms."),
    device: str = typer.Option("cpu", help="torch device for studies that use one."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the combined summary as JSON."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check every study's config and list the organisms they need: cached, resumable "
                                 "or to train, with the training time each would take on one CPU core. Trains "
                                 "and writes nothing."),
) -> None:
    """Every study at one scale, then one combined HTML report."""
    from safetylab.progress import log_to_stdout
    from safetylab.report import render_combined
    from safetylab.runs import UnitsFailed, new_run_dir, run_study
    from safetylab.registry import available

    log_to_stdout(not as_json)  # `make demo > demo.log` says what it is doing while organisms train
    names = available()
    if only:
        chosen = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise UserError(f"--only: unknown study {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [n for n in names if n in chosen]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory (it is created if missing)")
    from safetylab.runs import build_organisms, resolve_config
    from safetylab.registry import get_study
    from safetylab.study import default_cache_dir

    # Studies share organisms through the cache; small organisms train faster side by side (one thread each)
    # than one after another.
    planned = [(get_study(n), resolve_config(get_study(n), scale=scale.value, seed=seed)) for n in names]
    if dry_run:
        _print_plan(planned, (cache_dir or default_cache_dir()) / "organisms", scale.value, as_json)
        return
    argv = ["safetylab", *sys.argv[1:]]
    human = not quiet and not as_json  # --json keeps stdout for the summary alone
    cores = os.cpu_count() or 1
    run_dirs, failed = [], []
    lanes = workers is None and executor == ExecutorOpt.local and device == "cpu" and cores > 1 and len(names) > 1
    if lanes:
        # One study per core, each with its units in series: a study's preparation, analysis and report then
        # overlap another's units instead of idling a core. The organisms train in the same pool, first, and each
        # study starts once its own are cached. Bars would garble from several processes on one screen, so a
        # terminal gets the training's bar and one line per finished study (a log still gets every stage).
        from safetylab.progress import bar
        from safetylab.runs import run_studies

        def finished(name: str, rd: Path, err: str | None) -> None:
            if err is not None:
                print(f"safetylab: {name}: {err}", file=sys.stderr)
            if human:
                console.rule(f"[bold]{name}")
                console.print(_verdict_text(rd))
            advance()

        with bar(f"{len(names)} studies, {cores} at a time", len(names), transient=False,
                 quiet=quiet) as advance:
            requests = {st.name: st.organisms(cfg) for st, cfg in planned if st.organisms is not None}
            results = run_studies(names, lanes=cores, on_done=finished, organisms=requests, training_progress=not quiet,
                                  scale=scale.value, seed=seed, out=out, quiet=quiet or console.is_terminal,
                                  cache_dir=cache_dir, device=device, argv=argv)
        run_dirs = [rd for _, rd, _ in results]
        failed = [name for name, _, err in results if err is not None]
    else:
        # Every study's organisms first, in one pool: studies share them through the cache.
        build_organisms(planned, cache_dir or default_cache_dir(), quiet=quiet, device=device)
        if workers is None:
            workers = cores if executor == ExecutorOpt.local else 1
        for name in names:
            if human:
                console.rule(f"[bold]{name}")
            try:
                rd = run_study(name, scale=scale.value, seed=seed, out=out, executor=executor.value, workers=workers,
                               address=address, quiet=quiet, cache_dir=cache_dir, device=device, argv=argv)
            except UnitsFailed as exc:
                print(f"safetylab: {name}: {exc}", file=sys.stderr)
                rd = exc.run_dir
                failed.append(name)
            run_dirs.append(rd)
            if human:
                console.print(_verdict_text(rd))
    combined_dir = new_run_dir(out, "reproduce")
    report = render_combined(run_dirs, combined_dir, scale.value)
    if as_json:
        _print_json(json.loads((combined_dir / "summary.json").read_text()))
    else:
        console.print(f"combined report: {report}")
    if failed:
        raise typer.Exit(1)


def _print_plan(planned: list[tuple[Any, Any]], organism_dir: Path, scale: str, as_json: bool,
                study_time: bool = True) -> None:
    """``reproduce --dry-run`` and ``run --dry-run``: the organisms the studies need, which are cached, and the rest's
    training time; the studies' own time where it was measured (their default quick configs)."""
    from safetylab.organisms.cache import CPU_FLOPS_PER_S, organism_plan, with_bases
    from safetylab.progress import format_duration as duration

    requests = {st.name: (st.organisms(cfg) if st.organisms is not None else []) for st, cfg in planned}
    rows = organism_plan([r for rs in requests.values() for r in rs], organism_dir)
    users: dict[str, set[str]] = {}  # organism hash -> the studies that need it (a variant's base included)
    for name, rs in requests.items():
        for h in with_bases([r.config() for r in rs]):
            users.setdefault(h, set()).add(name)
    todo = [r for r in rows if r["status"] != "cached"]
    left = sum(r["seconds_left"] for r in todo)
    cores = os.cpu_count() or 1
    studies = [{"study": st.name, "organisms": sum(st.name in ns for ns in users.values()),
                "to_train": sum(st.name in users[r["hash"]] for r in todo),
                "quick_seconds": st.quick_seconds if scale == "quick" and study_time else None} for st, _ in planned]
    # Quick studies' own time is measured (Study.quick_seconds, the reference machine); paper's is not.
    study_seconds = sum(st.quick_seconds for st, _ in planned) if scale == "quick" and study_time else None
    if as_json:
        _print_json({"scale": scale, "organism_dir": str(organism_dir), "organisms": rows, "studies": studies,
                     "to_train": len(todo), "one_core_seconds": left, "cpu_flops_per_s": CPU_FLOPS_PER_S,
                     "study_one_core_seconds": study_seconds})
        return
    table = Table(title=f"Organisms for {len(planned)} stud{'y' if len(planned) == 1 else 'ies'} at {scale} scale "
                           f"({organism_dir})")
    for col in ("organism", "from", "params", "steps", "status", "one core", "studies"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("organism", "from", "status") else "right")
    named = {r["hash"]: f"{r['variant']}@{r['seed']}" for r in rows}
    for r in rows:
        status = {"cached": "cached", "missing": "to train"}.get(r["status"], f"at {r['steps_done']}")
        table.add_row(named[r["hash"]], named.get(r["base"], ""), f"{r['n_params'] / 1e6:.2f}M", str(r["steps"]),
                      status, "" if r["status"] == "cached" else duration(r["seconds_left"]),
                      str(len(users[r["hash"]])))
    console.print(table)
    for s in studies:
        console.print(f"  {s['study']}: {s['organisms']} organisms, {s['to_train']} to train")
    unmeasured = "at this scale" if scale != "quick" else "for a changed config"
    studies_line = (f"Study time is not estimated {unmeasured}." if study_seconds is None else
                    f"The studies take about {duration(study_seconds)} of one core on the reference machine (their "
                    f"measured quick runs), about {duration(study_seconds / cores)} on {cores} cores; reproduce starts "
                    f"each once its own organisms are cached.")
    console.print(
        f"To train: {len(todo)} of {len(rows)} organisms, {duration(left)} of one CPU core like the reference "
        f"machine's ({CPU_FLOPS_PER_S / 1e9:.0f} GFLOP/s), about {duration(left / cores)} on this machine's "
        f"{cores} cores, one organism per core. {studies_line} --dry-run: nothing was trained or written.")


# --------------------------------------------------------------------------- report / threats


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder made by 'safetylab run'."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Re-render summary.json, report.md and report.html from the raw results alone."""
    from safetylab.report import render_run
    from safetylab.results import load_run

    load_run(run_dir)  # validates the folder before anything is rewritten
    summary = render_run(run_dir)
    if as_json:
        _print_json(summary)
    else:
        console.print(_verdict_text(run_dir))
        console.print(f"report: {run_dir / 'report.html'}")


@app.command("threats")
def threats_cmd(
    runs_opt: Optional[Path] = typer.Option(None, "--runs", help="Root folder of run folders (or one study's "
                                            "folder, or one run); default ./runs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """The essay's grid (user population x adversary tier x protected asset): which cells the
    finished runs speak to, with verdicts and intervals, where the evidence is silent, and
    which reports state a verdict beyond the cells their config measured."""
    from safetylab.threats import cell_lines, coverage

    runs_dir = runs_opt if runs_opt is not None else Path("runs")
    if runs_opt is not None and not runs_dir.exists():
        raise UserError(f"--runs {runs_dir} does not exist; pass the folder that holds run folders (default ./runs)")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"--runs {runs_dir} is a file; pass the folder that holds run folders")
    cov = coverage(runs_dir)
    if as_json:
        _print_json(cov)
        return
    axes = cov["axes"]
    by = {(c["user"], c["tier"], c["asset"]): c for c in cov["cells"]}
    n_cells = len(cov["cells"])
    console.print(f"threat-model coverage: {n_cells - len(cov['silent_cells'])} of {n_cells} cells have evidence "
                  f"({cov['n_runs']} finished runs in {runs_dir})")
    for asset in axes["assets"]:
        table = Table(title=f"protecting {axes['asset_labels'][asset]}")
        table.add_column("users")
        for t in axes["tiers"]:
            table.add_column(f"adversary: {t}", overflow="fold")
        for user in axes["users"]:
            row = []
            for tier in axes["tiers"]:
                lines = cell_lines(by[(user, tier, asset)])
                row.append("\n".join(
                    f"{ln['study']}: {ln['verdict']} {ln['interval']}" + (f" ({ln['n_runs']} runs)" if ln["n_runs"] > 1 else "")
                    + (f"\n  {ln['measure']}" if ln["measure"] else "") for ln in lines) or "[dim]silent[/dim]")
            table.add_row(user, *row)
        console.print(table)
    for f in cov["flagged"]:
        console.print(f"[bold red]flagged[/bold red] {f['study']} {f['run_dir']}: {f['why']}: "
                      + ", ".join("/".join(c) for c in f["cells"]))
    for u in cov["unplaced"]:
        console.print(f"note: {u['study']} {u['run_dir']}: {u['note']}")
    for n in cov["notes"]:
        console.print(f"note: {n['study']} {n['run_dir']}: {n['note']}")
    if cov["studies_without_runs"]:
        console.print(f"Studies with no finished run: {', '.join(cov['studies_without_runs'])}.")


@app.command("runs")
def runs_cmd(
    runs_dir: Path = typer.Argument(Path("runs"), help="Folder of run folders (default ./runs), a study's folder or one run."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every run under DIR, newest first: study, when, scale, seed, verdict with its interval,
    complete or partial, and the config keys that differ from the scale's defaults."""
    from safetylab.catalog import changes_text, list_runs, verdict_text, when_text

    rows = list_runs(runs_dir)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        print(f"no runs under {runs_dir}; start one with 'safetylab run STUDY'")  # one line, never wrapped
        return
    table = Table(title=f"{sum(r['kind'] == 'run' for r in rows)} run(s) in {runs_dir}, newest first")
    for col in ("study", "started", "scale", "seed", "verdict [95% CI]", "status", "config changed", "folder"):
        # Names, times and intervals are read whole; notes, configs and paths wrap.
        table.add_column(col, overflow="fold", no_wrap=col not in ("status", "config changed", "folder"))
    colour = {"holds": "green", "does not hold": "red", "inconclusive": "yellow"}
    for r in rows:
        verdict = verdict_text(r, metric=False)
        if r["verdict"] in colour:
            verdict = f"[{colour[r['verdict']]}]{verdict}[/]"
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        table.add_row(r["study"], when_text(r["started"]), str(r["scale"] or "–"),
                      "–" if r["seed"] is None else str(r["seed"]), verdict,
                      status if r["status"] == "complete" else f"[yellow]{status}[/]",
                      changes_text(r["changed"]), r["run_dir"])
    # Piped or logged, a table squeezed to 80 columns is unreadable: give it room instead.
    out = console if console.is_terminal else Console(width=max(console.width, 160))
    out.print(table)


@app.command("index")
def index_cmd(
    runs_dir: Path = typer.Argument(Path("runs"), help="Folder of run folders (default ./runs)."),
) -> None:
    """Write DIR/index.html: the 'safetylab runs' table as a page linking each report (opens offline)."""
    from safetylab.catalog import list_runs, write_index

    rows = list_runs(runs_dir)
    path = write_index(runs_dir, rows)
    if not rows:
        print(f"no runs under {runs_dir} yet; wrote an empty index")
    print(f"index: {path}")


@app.command("calibrate")
def calibrate_cmd(
    study: str = typer.Argument(..., help="Study name (see 'safetylab list')."),
    n: int = typer.Option(400, "--n", help="Simulated runs at the null and at the alternative (>= 400 for a 5% rate)."),
    seed: int = typer.Option(0, help="Seed of the simulator."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    against: Optional[Path] = typer.Option(None, "--against", help="A run folder of this study: compare the "
                                           "simulator's between-unit spread with the run's (instead of calibrating)."),
    effects: Optional[str] = typer.Option(None, "--effects", help="Comma-separated true effects to add rows for "
                                          "(the power curve, e.g. 0.15,0.2,0.3)."),
) -> None:
    """How often a study's own analysis says "holds" on simulated data: at the null
    (true effect on the threshold; the estimate must be <= 5% over >= 400 runs) and at its
    declared alternative (power), and with --effects at every effect listed (the power curve:
    the effect this design detects). Exit code 1 when the rule is not calibrated (or, with
    --against, when the simulator's spread is more than 2x off the run's)."""
    from safetylab.calibrate import calibrate, check_calibratable, compare_spread
    from safetylab.progress import bar
    from safetylab.registry import get_study

    st = get_study(study)
    check_calibratable(st)  # before the progress bar, so bad input stays one line
    try:
        curve = [float(e) for e in effects.split(",")] if effects else []
    except ValueError:
        raise UserError(f"--effects {effects!r}: give numbers separated by commas, e.g. --effects 0.15,0.2,0.3") \
            from None
    if against is not None:
        if curve:
            raise UserError("--effects draws a power curve and --against compares one run's spread; run them apart")
        cmp = compare_spread(st, against, min(n, 200), seed=seed)
        if as_json:
            _print_json(cmp)
        else:
            def g(x: Any) -> str:
                return "none" if x is None else f"{x:.3g}"

            rng_ = cmp["sim_se_range"]
            console.print(f"{study} against {against}: real standard error {g(cmp['real_se'])}, simulated "
                          f"{g(cmp['sim_se'])} (10-90%: {g(rng_[0]) if rng_ else 'none'}-"
                          f"{g(rng_[1]) if rng_ else 'none'}); {cmp['note']}", highlight=False)
        if cmp["agrees"] is False:
            raise typer.Exit(1)
        return
    with bar(f"calibrating {study}", (2 + len(curve)) * n, quiet=quiet or as_json) as advance:
        res = calibrate(st, n, seed=seed, progress=advance, effects=curve)
    if as_json:
        _print_json(res)
    else:
        from safetylab.metrics.stats import format_interval

        table = Table(title=f"calibration of '{study}' ({n} simulated runs per row; effect = {res['effect']})")
        for col in ("true effect", "holds", "does not hold", "inconclusive", "P(holds) [95% CI]", "requirement", "ok"):
            table.add_column(col)
        rows = [(res["null"], "null", f"estimate <= {res['null']['max_false_holds']:.0%}",
                 "yes" if res["null"]["ok"] else "[bold red]NO[/bold red]"),
                (res["alternative"], "alternative", f">= {res['alternative']['declared_power']:.0%} (declared power)",
                 "yes" if res["alternative"]["ok"] else "[bold red]NO[/bold red]")]
        rows += [(r, "curve", "", "") for r in res["curve"]]
        for r, which, req, ok in sorted(rows, key=lambda row: row[0]["effect"]):
            table.add_row(f"{r['effect']:g} ({which})", *(str(r["verdicts"][v]) for v in
                                                          ("holds", "does not hold", "inconclusive")),
                          format_interval(r["holds_rate"], *r["holds_ci"], digits=3), req, ok)
        console.print(table)
        null = res["null"]
        flag = "" if null["does_not_hold_ok"] else " [bold red]above 5%: 'does not hold' is over-called[/bold red]"
        console.print(f"false 'does not hold' at the null: "
                      f"{format_interval(null['does_not_hold_rate'], *null['does_not_hold_ci'], digits=3)} "
                      f"(a two-sided 95% rule: about 2.5%; reported, not part of the verdict){flag}", highlight=False)
        if not res["enough_draws"]:
            console.print(f"[bold red]too few draws[/bold red]: a calibration verdict needs --n {res['min_draws']} or more")
        console.print("calibrated" if res["calibrated"] else "[bold red]not calibrated[/bold red]")
    if not res["calibrated"]:
        raise typer.Exit(1)


@app.command("audit")
def audit_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run folder made by 'safetylab run'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> None:
    """Could this verdict have come out the other way? Re-run the study's own analysis on its
    records with the claimed effect removed (null: must not say "holds") and with the largest
    effect the design allows (extreme: must be able to say "holds"). Works on copies; writes
    nothing. Exit code 1 when the design is stuck on one side (not when the run's own records fail
    a premise of the claim, which the verdict already reports and the audit names)."""
    from safetylab.audit import audit_lines, audit_run

    res = audit_run(run_dir)
    if as_json:
        _print_json(res)
    else:
        console.print(f"{res['study']} {run_dir}: verdict {res['verdict']}")
        for which, line in audit_lines(res):
            console.print(f"  {which}: {line}", highlight=False)
    if not res["ok"]:
        raise typer.Exit(1)


def _mount_organism_cli() -> None:
    import importlib.util

    if importlib.util.find_spec("safetylab.organisms.cli") is None:
        return
    from safetylab.organisms.cli import app as organism_app

    app.add_typer(organism_app, name="organism", help="Train, list, grade and chat with model organisms.")


_mount_organism_cli()


def main() -> None:
    """Entry point: UserError → one line on stderr, exit 2."""
    try:  # typer >= 0.20 vendors click as typer._click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exc

    argv = sys.argv[1:]
    try:
        rc = app(args=argv or ["--help"], standalone_mode=False)
    except click_exc.UsageError as exc:
        # click's own usage errors (unknown option, bad choice) as one line, like ours.
        cmd = exc.ctx.command_path if exc.ctx else "safetylab"
        print(f"safetylab: error: {exc.format_message()}; see '{cmd} --help'", file=sys.stderr)
        sys.exit(2)
    except click_exc.ClickException as exc:
        print(f"safetylab: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except UserError as exc:
        print(f"safetylab: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("safetylab: interrupted; resume with 'safetylab run --resume RUN_DIR'", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
