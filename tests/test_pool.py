"""safetylab.pool: jobs that wait on each other in one process pool (organisms on bases, studies on organisms)."""

from __future__ import annotations

import pytest

from safetylab.pool import Job, run_graph


def test_each_job_starts_after_what_it_needs_and_the_highest_rank_first():
    # One worker: the order jobs finish in is the order they start in.
    jobs = {
        "base": Job(str, ("base",), rank=(1, 10.0)),
        "other-base": Job(str, ("other-base",), rank=(1, 5.0)),
        "sft": Job(str, ("sft",), needs=frozenset({"base"}), rank=(1, 2.0)),
        "study-needs-sft": Job(str, ("study-needs-sft",), needs=frozenset({"sft", "cached-elsewhere"}), rank=(0, 99.0)),
        "free-study": Job(str, ("free-study",), rank=(0, 1.0)),
    }
    order = []
    results = run_graph(jobs, 1, on_done=lambda k, r: order.append((k, r)))
    assert results == {k: k for k in jobs}
    assert [k for k, _ in order] == ["base", "other-base", "sft", "study-needs-sft", "free-study"]
    # two workers: everything still runs once, and nothing before what it needs
    order = []
    run_graph(jobs, 2, on_done=lambda k, r: order.append(k))
    assert sorted(order) == sorted(jobs) and order.index("base") < order.index("sft") < order.index("study-needs-sft")


def test_a_failing_job_stops_the_rest_and_raises_its_error():
    jobs = {"bad": Job(int, ("not a number",), rank=(2,)), "later": Job(str, ("later",), needs=frozenset({"bad"}))}
    done = []
    with pytest.raises(ValueError, match="not a number"):
        run_graph(jobs, 1, on_done=lambda k, r: done.append(k))
    assert done == []


def test_jobs_that_need_each_other_are_refused_before_anything_runs():
    jobs = {"a": Job(str, ("a",), needs=frozenset({"b"})), "b": Job(str, ("b",), needs=frozenset({"a"})),
            "c": Job(str, ("c",), needs=frozenset({"a"})), "free": Job(str, ("free",))}
    with pytest.raises(ValueError, match=r"never start: \['a', 'b', 'c'\]"):
        run_graph(jobs, 2)
