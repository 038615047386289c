import math

import numpy as np
import pytest
from scipy import stats

from safetylab.metrics.stats import (
    bootstrap_interval,
    clopper_pearson_interval,
    format_interval,
    mean_t_interval,
    paired_difference_interval,
    wilson_interval,
)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (17, 40), (199, 200)])
def test_binomial_intervals_match_scipy(k, n):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_binomial_bad_counts_name_the_problem():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_t_interval_matches_scipy():
    x = np.array([0.2, 0.4, 0.35, 0.8, 0.5])
    m, lo, hi = mean_t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(ref)
    assert m == pytest.approx(x.mean())


def test_bootstrap_is_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=200)
    a = bootstrap_interval(x)
    b = bootstrap_interval(x)
    assert a == b  # a re-rendered report gives the same interval
    est, lo, hi = a
    assert lo < 3.0 < hi and lo < est < hi
    d, dlo, dhi = paired_difference_interval(x + 1.0, x)
    assert d == pytest.approx(1.0) and dlo == pytest.approx(1.0) and dhi == pytest.approx(1.0)


def test_format_interval():
    assert format_interval(0.8234, 0.71, 0.9) == "0.82 [0.71, 0.90]"
    assert format_interval(None, math.nan, 1.0) == "– [–, 1.00]"
    assert format_interval(-1e-17, -0.159, 0.159, 3) == "0.000 [-0.159, 0.159]"  # no '-0.000'
    assert format_interval(-0.0004, -0.0004, 0.0) == "0.00 [0.00, 0.00]"


# --------------------------------------------------------------------------- the verdict protocol's intervals
from safetylab.metrics.stats import (  # noqa: E402
    clustered_mean_interval,
    holm_adjust,
    rate_se_floor,
    t_interval,
    t_pvalue_greater,
)


def test_zero_spread_is_not_a_zero_width_interval():
    m, lo, hi = mean_t_interval([1.0, 1.0, 1.0])
    assert m == 1.0 and math.isnan(lo) and math.isnan(hi)
    floor = rate_se_floor([200, 200, 200], [200, 200, 200])
    assert floor > 0
    m, lo, hi = mean_t_interval([1.0, 1.0, 1.0], se_floor=floor, bounds=(0, 1))
    assert lo < 1.0 and hi == 1.0  # clipped to the range, and not zero-width


def test_bounded_quantities_stay_in_range():
    m, lo, hi = mean_t_interval([0.0, 0.0, 0.15], bounds=(0.0, 1.0))
    assert lo == 0.0 and 0 < hi <= 1.0
    _, lo, hi = t_interval(0.99, 0.05, 4, bounds=(0.0, 1.0))
    assert hi == 1.0


def test_one_way_cluster_interval_equals_t_over_balanced_cluster_means():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 10)
    y = rng.normal(size=60) + rng.normal(size=6)[groups]
    r = clustered_mean_interval(y, clusters=groups)
    means = np.array([y[groups == g].mean() for g in range(6)])
    ref = stats.t.interval(0.95, 5, loc=means.mean(), scale=stats.sem(means))
    assert (r["lo"], r["hi"]) == pytest.approx(ref)
    assert r["df"] == 5 and r["n_clusters"] == 6


def test_two_way_interval_covers_under_crossed_random_effects():
    """3 seeds x 18 hazard clusters with both components: the 95% interval covers the true mean
    in at least ~93% of replications (a one-way interval over prompts would not)."""
    rng = np.random.default_rng(1)
    seeds = np.repeat(np.arange(3), 18 * 4)
    hazards = np.tile(np.repeat(np.arange(18), 4), 3)
    cover = naive = 0
    reps = 300
    for _ in range(reps):
        y = (0.5 + 0.1 * rng.normal(size=3)[seeds] + 0.1 * rng.normal(size=18)[hazards]
             + 0.2 * rng.normal(size=seeds.size))
        r = clustered_mean_interval(y, seeds=seeds, clusters=hazards)
        cover += r["lo"] <= 0.5 <= r["hi"]
        _, lo, hi = mean_t_interval(y)
        naive += lo <= 0.5 <= hi
    assert cover / reps >= 0.93
    assert naive / reps < 0.8  # treating 216 prompts as independent is far too narrow


def test_binomial_floor_sets_the_width_when_groups_do_not_vary():
    y = np.zeros(120)
    r = clustered_mean_interval(y, seeds=np.repeat([0, 1], 60), clusters=np.tile(np.arange(6), 20),
                                se_floor=rate_se_floor([0], [120]))
    assert r["lo"] < 0 < r["hi"] and "floor" in r["method"]
    # Two seeds that tie are still two seeds: the floor sets the standard error, the seeds the df.
    assert r["df"] == 1
    assert r["hi"] == pytest.approx(stats.t.ppf(0.975, 1) * rate_se_floor([0], [120]))


def test_holm_and_one_sided_p():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5]) == [0.5]
    p = t_pvalue_greater(0.3, 0.1, 10, 0.1)
    assert p == pytest.approx(stats.t.sf(2.0, 10))
    assert math.isnan(t_pvalue_greater(0.3, 0.0, 10, 0.1))


def test_seeds_that_tie_are_never_dropped_as_a_grouping():
    """Three seeds fine-tuned from one base that give the same outputs are still three seeds:
    the grouping stays (df = seeds - 1), so the interval is no narrower than t(2) allows, and
    wider than the hazard clusters alone would make it (the old rule dropped the seeds and
    reported the clusters' 17 df)."""
    rng = np.random.default_rng(3)
    one = (rng.random(18 * 5) < np.repeat(rng.random(18), 5)).astype(float)
    y = np.tile(one, 3)
    seeds = np.repeat(np.arange(3), one.size)
    clusters = np.tile(np.repeat(np.arange(18), 5), 3)
    r = clustered_mean_interval(y, seeds=seeds, clusters=clusters)
    single = clustered_mean_interval(one, clusters=np.repeat(np.arange(18), 5))
    assert r["df"] == 2 and "agree exactly" in r["method"] and "kept as a grouping" in r["method"]
    assert r["se"] == pytest.approx(single["se"])
    assert r["hi"] - r["lo"] > single["hi"] - single["lo"]


def test_a_third_grouping_carries_the_spread_between_models():
    """Five targets that transfer 0, 0, 0.5, 1 and 1: over seeds x hazards alone the mean looks certain; with the
    target model as a third (crossed) grouping its interval spans the models' spread. A grouping that repeats
    another adds nothing: three-way with models = seeds is the two-way variance."""
    from safetylab.metrics.stats import clustered_mean_interval

    rng = np.random.default_rng(0)
    s, m, h = (g.ravel() for g in np.meshgrid(np.arange(5), np.arange(5), np.arange(18), indexing="ij"))
    s, m, h = np.repeat(s, 2), np.repeat(m, 2), np.repeat(h, 2)
    y = (rng.random(s.size) < np.array([0.0, 0.0, 0.5, 1.0, 1.0])[m]).astype(float)
    two = clustered_mean_interval(y, seeds=s, clusters=h)
    three = clustered_mean_interval(y, seeds=s, clusters=h, models=m)
    assert two["lo"] > 0.4 and three["lo"] < 0.0 and three["df"] == 4
    assert "three-way" in three["method"] and "5 models" in three["method"]
    same = clustered_mean_interval(y, seeds=s, clusters=h, models=s)
    assert same["se"] == pytest.approx(two["se"], rel=1e-9)
    with pytest.raises(ValueError, match="third grouping"):
        clustered_mean_interval(y, seeds=s, models=m)
    one = clustered_mean_interval([0.0, 1.0, 0.0, 1.0], seeds=[0] * 4, clusters=[1] * 4, models=[2] * 4)
    assert one["estimate"] == 0.5 and math.isnan(one["lo"]) and one["df"] == 0  # no interval, not a crash


def test_one_seed_gives_the_mean_without_an_interval_and_several_defer_to_the_caller():
    from safetylab.metrics.stats import one_seed

    v = np.array([1.0, 0.0, 1.0, 1.0])
    iv = one_seed(v, ["s0"] * 4, bounds=(0.0, 1.0), why="training seed: no interval over seeds")
    assert iv is not None and iv.estimate == 0.75 and iv.lo is None and iv.hi is None and iv.se is None
    assert iv.method == "one training seed: no interval over seeds" and iv.n == 1
    # seeds compare as text: 0 and "0" are one seed, 0 and 1 are two
    assert one_seed(v, [0, "0", 0, "0"], why="seed") is not None
    assert one_seed(v, [0, 0, 1, 1], why="seed") is None
