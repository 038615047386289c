"""The run machinery, proven on a real study (shield) at a tiny budget:
determinism, local pool vs Ray, kill -9 and resume, re-rendering, threat coverage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safetylab.runs import run_study

# Four units of a few seconds each: enough to kill a run part-way through.
TINY = {
    "seeds": 4,
    "seeds_per_unit": 1,
    "arms": ["shield"],
    "total_steps": 512,
    "rollout_steps": 128,
    "envs_per_seed": 2,
    "minibatch_size": 64,
    "n_epochs": 2,
    "eval_episodes": 2,
    "n_trajectories": 1,
}


def set_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def strip_timing(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("timing")
        lines.append(rec)
    return lines


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    return run_study("shield", overrides=TINY, out=out, cache_dir=out / "cache")


def test_same_config_and_seed_give_identical_results(reference_run, tmp_path):
    again = run_study("shield", overrides=TINY, out=tmp_path, cache_dir=tmp_path / "cache")
    a, b = (reference_run / "results.jsonl").read_bytes(), (again / "results.jsonl").read_bytes()
    assert strip_timing(reference_run / "results.jsonl") == strip_timing(again / "results.jsonl")
    # Byte-identical apart from the timing field: same lines, same order.
    assert [ln.split(b',"timing"')[0] for ln in a.splitlines()] == [ln.split(b',"timing"')[0] for ln in b.splitlines()]
    assert (reference_run / "summary.json").read_text() == (again / "summary.json").read_text()


def test_local_pool_and_ray_give_identical_results(tmp_path):
    pytest.importorskip("ray")
    local = run_study("shield", overrides=TINY, out=tmp_path / "local", workers=2, executor="local",
                      cache_dir=tmp_path / "cache")
    ray_run = run_study("shield", overrides=TINY, out=tmp_path / "ray", workers=2, executor="ray",
                        cache_dir=tmp_path / "cache")
    assert strip_timing(local / "results.jsonl") == strip_timing(ray_run / "results.jsonl")
    assert (local / "summary.json").read_text() == (ray_run / "summary.json").read_text()


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "safetylab", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_resume_gives_the_same_summary(reference_run, tmp_path):
    proc = _cli("run", "shield", *set_args(TINY), "--out", str(tmp_path), "--quiet", cwd=tmp_path)
    deadline = time.time() + 240
    results = None
    while time.time() < deadline:
        found = list(tmp_path.glob("shield/*/results.jsonl"))
        if found and found[0].read_bytes().count(b"\n") >= 1:
            results = found[0]
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    assert results is not None, "no unit finished within the time limit"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = results.parent
    n_done = results.read_bytes().count(b"\n")
    assert 1 <= n_done < TINY["seeds"], "the kill must land mid-way"
    assert not (run_dir / "summary.json").exists()

    resumed = _cli("run", "--resume", str(run_dir), "--quiet", cwd=tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert (run_dir / "summary.json").read_text() == (reference_run / "summary.json").read_text()
    assert strip_timing(run_dir / "results.jsonl") == strip_timing(reference_run / "results.jsonl")
    env = json.loads((run_dir / "env.json").read_text())
    assert len(env["resumed"]) == 1


def test_resume_repairs_a_torn_last_line(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    results = run_dir / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # crash mid-write of unit 3
    (run_dir / "summary.json").unlink()
    run_study("shield", resume=run_dir, cache_dir=tmp_path / "cache")
    assert (run_dir / "summary.json").read_text() == (reference_run / "summary.json").read_text()
    assert strip_timing(results) == strip_timing(reference_run / "results.jsonl")


def _only_unit_0_written(reference_run: Path, tmp_path: Path) -> tuple[Path, Path, list[str], list[dict]]:
    """A copy of the reference run as a crash after its first unit left it: results.jsonl holds unit 0 only."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    results = run_dir / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0])
    (run_dir / "summary.json").unlink()
    return run_dir, results, lines, [json.loads(x) for x in lines]


def test_a_unit_that_finished_ahead_of_its_turn_survives_a_crash(reference_run, tmp_path, monkeypatch):
    """results.jsonl is written in unit order, so a unit that finishes before those ahead of it waits; a crash
    while it waits must not lose it. Unit 3 finishes first, then the run dies; the resume runs units 1 and 2
    only and writes the same results as an uninterrupted run."""
    import safetylab.executors as executors
    import safetylab.runs as runs
    from safetylab.study import PARTIAL_DIR, scratch_dir

    run_dir, results, lines, records = _only_unit_0_written(reference_run, tmp_path)

    class FinishesUnit3ThenDies:
        def map_units(self, study, config, todo, ctx):
            assert [i for i, _ in todo] == [1, 2, 3]
            yield 3, records[3]
            raise RuntimeError("the machine went down")

        def close(self):
            pass

    monkeypatch.setattr(runs, "make_executor", lambda *a, **k: FinishesUnit3ThenDies())
    with pytest.raises(RuntimeError, match="went down"):
        run_study("shield", resume=run_dir, cache_dir=tmp_path / "cache")
    assert results.read_text() == lines[0]  # unit 3 waits for 1 and 2 ...
    kept = scratch_dir(run_dir, records[3]["key"]) / "record.json"
    assert json.loads(kept.read_text()) == records[3]  # ... on disk, not in memory
    monkeypatch.undo()

    ran = []
    real = executors.execute_unit
    monkeypatch.setattr(executors, "execute_unit", lambda study, config, unit, ctx, index:
                        ran.append(unit.key) or real(study, config, unit, ctx, index))
    run_study("shield", resume=run_dir, cache_dir=tmp_path / "cache")
    assert ran == [records[1]["key"], records[2]["key"]]
    assert strip_timing(results) == strip_timing(reference_run / "results.jsonl")
    assert (run_dir / "summary.json").read_text() == (reference_run / "summary.json").read_text()
    assert not (run_dir / PARTIAL_DIR).exists()


def test_a_failed_unit_keeps_its_scratch_state_for_the_resume(reference_run, tmp_path, monkeypatch):
    """A unit that raised keeps what it saved (e.g. a GCG checkpoint) so its rerun goes on from there; the
    finished units' scratch folders go."""
    import safetylab.runs as runs
    from safetylab.runs import UnitsFailed
    from safetylab.study import scratch_dir

    run_dir, results, lines, records = _only_unit_0_written(reference_run, tmp_path)
    for r in records[1:]:
        scratch_dir(run_dir, r["key"]).mkdir(parents=True)
        (scratch_dir(run_dir, r["key"]) / "gcg.json").write_text("{}")

    class Unit1Fails:
        def map_units(self, study, config, todo, ctx):
            yield 1, {**records[1], "status": "failed", "result": None, "error": "RuntimeError: out of memory"}
            yield 2, records[2]
            yield 3, records[3]

        def close(self):
            pass

    monkeypatch.setattr(runs, "make_executor", lambda *a, **k: Unit1Fails())
    with pytest.raises(UnitsFailed):
        run_study("shield", resume=run_dir, cache_dir=tmp_path / "cache")
    assert (scratch_dir(run_dir, records[1]["key"]) / "gcg.json").exists()
    assert not scratch_dir(run_dir, records[2]["key"]).exists() and not scratch_dir(run_dir, records[3]["key"]).exists()


def test_report_rerenders_from_raw_results_alone(reference_run, tmp_path):
    from safetylab.cli import main

    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    for name in ("summary.json", "report.md", "report.html"):
        (run_dir / name).unlink()
    for png in run_dir.glob("*.png"):
        png.unlink()
    sys_argv = sys.argv
    sys.argv = ["safetylab", "report", str(run_dir)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = sys_argv
    assert exc.value.code == 0
    assert (run_dir / "summary.json").read_text() == (reference_run / "summary.json").read_text()
    html = (run_dir / "report.html").read_text()
    # Opens offline: plots embedded, nothing fetched.
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    # The verdict comes first, then controls, the primary contrast, the threat model, the results.
    heads = [html.index(f"id='shield-{k}'") for k in ("controls", "contrast", "threat", "results")]
    assert html.index("class='verdict'") < heads[0] and heads == sorted(heads)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["verdict"]["verdict"] in {"holds", "does not hold", "inconclusive"}
    assert summary["units"] == {"total": 4, "finished": 4, "failed": [], "missing": []}


def test_threats_grid_covers_finished_runs(reference_run):
    from safetylab.threats import coverage

    cov = coverage(reference_run.parent.parent)
    cells = {(c["user"], c["tier"], c["asset"]): c for c in cov["cells"]}
    ev = cells[("enterprise", "none", "users")]["evidence"]  # shield's declared cell
    assert ev and ev[0]["verdict"] == json.loads((reference_run / "summary.json").read_text())["verdict"]["verdict"]
    assert cells[("enterprise", "sophisticated", "users")]["silent"]  # no run speaks to a resourced attacker
    assert ["enterprise", "sophisticated", "users"] in cov["silent_cells"] and not cov["flagged"]


def test_pool_worker_caps_blas_threads_as_well_as_torch(tmp_path, monkeypatch):
    """A unit pinned to one thread must get one BLAS/OpenMP thread in a pool worker too:
    scikit-learn probes on default BLAS pools oversubscribed the cores other workers use."""
    from safetylab.executors import _run_in_worker
    from safetylab.study import Context, Unit

    (tmp_path / "blasprobe_study.py").write_text(
        "import dataclasses\n"
        "from threadpoolctl import threadpool_info\n"
        "from safetylab.studies.shield import STUDY as _S\n"
        "def run_unit(config, unit, ctx):\n"
        "    import torch\n"
        "    return {'torch': torch.get_num_threads(),\n"
        "            'pools': {p['internal_api']: p['num_threads'] for p in threadpool_info()}}\n"
        "STUDY = dataclasses.replace(_S, name='blasprobe', run_unit=run_unit, unit_threads=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SAFETYLAB_STUDIES", "blasprobe=blasprobe_study")
    from safetylab.studies import get_study

    study = get_study("blasprobe")
    config = study.resolve_config("quick", TINY)
    ctx = Context(run_dir=tmp_path, seed=0, cache_dir=tmp_path / "cache")
    rec = _run_in_worker("blasprobe", config.model_dump_json(), Unit("u"), ctx, 0, threads=2)
    assert rec["status"] == "ok", rec["error"]
    assert rec["result"]["torch"] == 1
    assert rec["result"]["pools"] and set(rec["result"]["pools"].values()) == {1}, rec["result"]
