"""safetylab.pool: jobs that wait on each other in one process pool (organisms on bases, studies on organisms)."""

from __future__ import annotations

import time

import pytest

from safetylab.pool import Job, run_graph


def test_each_job_starts_after_what_it_needs_and_the_highest_rank_first():
    # One worker: the order jobs finish in is the order they start in. The ranks go against the needs (sft and
    # the study that needs it rank highest), so only the needs can put them last.
    jobs = {
        "base": Job(str, ("base",), rank=(1, 10.0)),
        "other-base": Job(str, ("other-base",), rank=(1, 5.0)),
        "sft": Job(str, ("sft",), needs=frozenset({"base"}), rank=(9,)),
        "study-needs-sft": Job(str, ("study-needs-sft",), needs=frozenset({"sft", "cached-elsewhere"}), rank=(99,)),
        "free-study": Job(str, ("free-study",), rank=(0, 1.0)),
    }
    order = []
    results = run_graph(jobs, 1, on_done=lambda k, r: order.append((k, r)))
    assert results == {k: k for k in jobs}
    assert [k for k, _ in order] == ["base", "sft", "study-needs-sft", "other-base", "free-study"]
    # two workers: everything still runs once, and nothing before what it needs
    order = []
    run_graph(jobs, 2, on_done=lambda k, r: order.append(k))
    assert sorted(order) == sorted(jobs) and order.index("base") < order.index("sft") < order.index("study-needs-sft")


def test_a_failing_job_stops_new_starts_lets_the_running_finish_and_raises_its_error():
    jobs = {"bad": Job(int, ("not a number",), rank=(3,)), "slow": Job(time.sleep, (1.0,), rank=(2,)),
            "never": Job(str, ("never",), rank=(1,))}
    done, errors = [], []
    with pytest.raises(ValueError, match="not a number"):
        run_graph(jobs, 2, on_done=lambda k, r: done.append(k),
                  on_error=lambda k, e, running: errors.append((k, type(e).__name__, running)))
    assert errors == [("bad", "ValueError", 1)]  # heard at once, while "slow" still ran
    assert done == ["slow"]  # the running job's result is not lost; "never" never started


def test_jobs_that_need_each_other_are_refused_before_anything_runs():
    jobs = {"a": Job(str, ("a",), needs=frozenset({"b"})), "b": Job(str, ("b",), needs=frozenset({"a"})),
            "c": Job(str, ("c",), needs=frozenset({"a"})), "free": Job(str, ("free",))}
    with pytest.raises(ValueError, match=r"never start: \['a', 'b', 'c'\]"):
        run_graph(jobs, 2)


def test_a_study_waits_for_its_own_organisms_and_their_bases_and_training_ranks_first(tmp_path):
    from safetylab.organisms.cache import OrganismRequest, config_hash
    from safetylab.runs import study_graph

    sft = OrganismRequest("sft", "tiny", seed=0)
    never = OrganismRequest("never-taught", "tiny", seed=0)
    needed = {"early-exit": [sft], "threat-model": [never], "shield": []}
    jobs, missing = study_graph(list(needed), needed, tmp_path, lanes=2)
    base, sft_h, never_h = (config_hash(c) for c in (sft.config().base_config(), sft.config(), never.config()))
    assert set(missing) == {base, sft_h, never_h}
    assert jobs["study:early-exit"].needs == {base, sft_h}  # the variant and the base it is tuned from
    assert jobs["study:threat-model"].needs == {never_h} and jobs["study:shield"].needs == frozenset()
    assert jobs[sft_h].needs == {base} and jobs[base].needs == frozenset()
    assert min(jobs[h].rank for h in missing) > max(jobs[f"study:{n}"].rank for n in needed)
