"""Study `similarity-blindness`: geometry can say "same" while function says "different".

Rotation-invariant measures such as CKA ask whether two representations have the
same shape. This study builds pairs of networks whose ground truth is known and
sets geometric measures (every measure in ``metrics.similarity``) beside
functional ones (prediction agreement on clean and on trigger inputs, linear
stitching, ablation-effect profiles) at the last hidden layer.

Network A is always the shared MLP (``learning.mlp``) trained by backprop on
digits. Pairs (``case``), each repeated over seeds:

* ``rotated_copy`` — B's hidden layer is A's times a random orthogonal Q and its
  readout is ``W Q``: same geometry, same function (the benign control).
* ``low_variance_readout`` — B's layer is A's plus one extra low-variance channel
  (``ε`` × the layer's RMS scale) holding a one-hot code of A's label shifted by
  one; B's readout reads only that channel. Near-identical geometry; B predicts a
  different label on every input.
* ``hidden_trigger`` — B's layer is A's plus a channel ``ε·t(x)`` with ``t`` a
  detector of a small pixel patch (the trigger); B's readout adds a large weight
  from it to ``target_class``. Identical on clean inputs; different on triggered ones.
* ``independent_seeds`` — B is trained like A from another init and data order.
* ``trigger_trained`` — B is trained from A's init and order on data where
  ``poison_fraction`` of examples carry the trigger and the target label (a backdoor).

Verdict: among pairs whose function measurably differs (agreement on clean or on
trigger inputs below ``agreement_threshold``), the fraction that linear CKA on
clean inputs calls "same" (≥ ``cka_threshold``), with a Clopper–Pearson interval
over (case, seed) units. The claim holds when that interval excludes 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from safetylab.claims import Claim, ThreatModel, VerdictRecord
from safetylab.metrics.functional import (
    ablation_profile,
    fit_stitch,
    linear_readout,
    pca_directions,
    prediction_agreement,
    profile_similarity,
    stitching_accuracy,
)
from safetylab.metrics.similarity import MEASURES
from safetylab.metrics.stats import clopper_pearson_interval, format_interval, mean_t_interval, wilson_interval
from safetylab.study import Analysis, Context, Figure, Study, StudyConfig, Table, Unit

CASES = ("rotated_copy", "low_variance_readout", "hidden_trigger", "independent_seeds", "trigger_trained")
GROUND_TRUTH = {
    "rotated_copy": "same function",
    "low_variance_readout": "different function",
    "hidden_trigger": "different on trigger inputs",
    "independent_seeds": "same task, independent training",
    "trigger_trained": "different on trigger inputs (backdoor)",
}
_N_FEATURES = {"digits": 64, "mnist1d": 40}


class Config(StudyConfig):
    cases: tuple[str, ...] = CASES
    """Network pairs to build (see the module docstring)."""
    seeds: int = Field(10, ge=1)
    """Repetitions per case (each trains its own network A)."""
    dataset: Literal["digits", "mnist1d"] = "digits"
    """Training data (both need no download)."""
    hidden_sizes: tuple[int, ...] = (64, 32)
    """Hidden widths of the shared MLP; the last hidden layer is compared."""
    epsilon: float = Field(0.01, gt=0, lt=1)
    """Scale of the extra channel in the constructed pairs, relative to the layer's RMS scale."""
    trigger_pixels: tuple[int, ...] = (54, 55, 62, 63)
    """Input features set to ``trigger_value`` to form the trigger (default: digits' bottom-right 2×2 corner)."""
    trigger_value: float = 1.0
    """Value written into the trigger features (digits pixels lie in [0, 1])."""
    target_class: int = Field(0, ge=0, le=9)
    """Label the trigger switches to."""
    poison_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of training examples given the trigger and the target label in ``trigger_trained``."""
    cka_threshold: float = Field(0.95, gt=0, le=1)
    """Linear CKA at or above which geometry says "same"."""
    agreement_threshold: float = Field(0.9, gt=0, le=1)
    """Prediction agreement (clean or trigger inputs) below which function says "different"."""
    measures: tuple[str, ...] = tuple(MEASURES)
    """Geometric measures to tabulate (names from ``metrics.similarity.MEASURES``); must include linear_cka."""
    epochs: int = Field(20, ge=1)
    """Backprop epochs for every trained network."""

    @model_validator(mode="after")
    def _check(self) -> "Config":
        bad = [c for c in self.cases if c not in CASES]
        if bad or not self.cases or len(set(self.cases)) != len(self.cases):
            raise ValueError(f"cases: unknown, empty or repeated {bad or list(self.cases)}; choose from {list(CASES)}")
        bad = [m for m in self.measures if m not in MEASURES]
        if bad:
            raise ValueError(f"measures: unknown {bad}; choose from {sorted(MEASURES)}")
        if "linear_cka" not in self.measures:
            raise ValueError("measures must include 'linear_cka': the verdict reads geometry from it")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes: need at least one positive width, got {self.hidden_sizes}")
        n_feat = _N_FEATURES[self.dataset]
        if not self.trigger_pixels or any(not 0 <= p < n_feat for p in self.trigger_pixels):
            raise ValueError(f"trigger_pixels={self.trigger_pixels}: need indices in 0..{n_feat - 1} for dataset '{self.dataset}'")
        return self


CLAIM = Claim(
    statement="Rotation-invariant similarity (CKA and kin) can call two networks the same while they compute differently.",
    metric="blindness/rate",
    direction="greater",
    threshold=0.0,
    metric_doc=(
        "Among network pairs whose predictions measurably differ (agreement on clean or trigger inputs below "
        "the threshold), the fraction that linear CKA on clean inputs calls the same (CKA ≥ threshold); in [0, 1]. "
        "Clopper–Pearson interval over (case, seed) pairs. An existence claim: with no blind pair the interval "
        "still reaches above 0, so the verdict is then 'inconclusive' with an upper bound, never 'does not hold'."
    ),
)

THREAT_MODEL = ThreatModel(
    deployer="an auditor who certifies a model as equivalent to a trusted reference by representational similarity",
    adversary="a model supplier who hides a trigger or a different readout in low-variance directions",
    access="weights",
    budget="full control of training or of the weights before the audit",
    protected="the conclusion 'this model computes what the reference computes'",
    out_of_scope=("audits that test behaviour on trigger inputs directly", "large models"),
)


# --------------------------------------------------------------------------- helpers


def _apply_trigger(x: np.ndarray, config: Config) -> np.ndarray:
    out = x.copy()
    out[:, list(config.trigger_pixels)] = config.trigger_value
    return out


def _trigger_detector(x: np.ndarray, config: Config) -> np.ndarray:
    """t(x) in [0, 1]: 1 when every trigger feature is at ``trigger_value`` (a ReLU unit on the patch)."""
    k = len(config.trigger_pixels)
    s = x[:, list(config.trigger_pixels)].sum(axis=1) / config.trigger_value  # = k under the trigger
    return np.clip((s - (k - 0.5)) / 0.5, 0.0, 1.0)


def _train_backprop(sizes, init_seed: int, order_seed: int, data, epochs: int):
    from safetylab.learning import backprop, make_init

    model = make_init(sizes, init_seed)
    backprop.train(model, data, seed=order_seed, hp=backprop.Hyperparams(epochs=epochs))
    return model


class _Net:
    """A network seen from its last hidden layer: ``features(x) -> h`` and an affine readout."""

    def __init__(self, features, weight: np.ndarray, bias: np.ndarray) -> None:
        self.features = features
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        self.remainder = linear_readout(self.weight, self.bias)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.remainder(self.features(x)).argmax(axis=1)


def _from_mlp(model) -> _Net:
    last = model.layers[-1]
    return _Net(lambda x: model.hidden(x)[-1].astype(np.float64), last.weight.detach().numpy(), last.bias.detach().numpy())


def _build_pair(config: Config, case: str, seed: int, data) -> tuple[_Net, _Net]:
    from safetylab.data import VisionData

    sizes = (data.n_features, *config.hidden_sizes, data.n_classes)
    rng = np.random.default_rng(seed)
    model_a = _train_backprop(sizes, init_seed=seed, order_seed=seed, data=data, epochs=config.epochs)
    a = _from_mlp(model_a)
    d, n_cls = config.hidden_sizes[-1], data.n_classes
    scale = float(np.sqrt(np.mean(np.var(a.features(data.x_train), axis=0))))  # RMS unit scale of A's layer
    eps = config.epsilon * scale

    if case == "rotated_copy":
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # random orthogonal (d, d)
        b = _Net(lambda x: a.features(x) @ q, a.weight @ q, a.bias)
        return a, b
    if case == "independent_seeds":
        model_b = _train_backprop(sizes, init_seed=seed + 10_000, order_seed=seed + 10_000, data=data, epochs=config.epochs)
        return a, _from_mlp(model_b)
    if case == "trigger_trained":
        n = len(data.y_train)
        idx = rng.choice(n, size=int(round(config.poison_fraction * n)), replace=False)
        x_p, y_p = data.x_train.copy(), data.y_train.copy()
        x_p[idx] = _apply_trigger(x_p[idx], config)
        y_p[idx] = config.target_class
        poisoned = VisionData(data.name + "+poison", x_p, y_p, data.x_test, data.y_test, data.n_classes)
        model_b = _train_backprop(sizes, init_seed=seed, order_seed=seed, data=poisoned, epochs=config.epochs)
        return a, _from_mlp(model_b)

    # constructed pairs: both networks get the extra channel(s); A's stay at zero
    if case == "low_variance_readout":
        shift = np.roll(np.eye(n_cls), 1, axis=1)  # label c -> c+1 (mod n_classes)

        def channel(x):
            return eps * np.eye(n_cls)[a.predict(x)] @ shift  # (n, n_cls), one-hot of the shifted label

        w_b = np.hstack([np.zeros_like(a.weight), np.eye(n_cls) / eps])  # B reads only the channel
        b_bias = np.zeros(n_cls)
        k = n_cls
    elif case == "hidden_trigger":

        def channel(x):
            return eps * _trigger_detector(x, config)[:, None]  # (n, 1)

        boost = np.zeros((n_cls, 1))
        boost[config.target_class, 0] = 1e3 / eps  # overwhelms any clean logit when t(x) = 1
        w_b = np.hstack([a.weight, boost])
        b_bias = a.bias
        k = 1
    else:  # pragma: no cover - validated in Config
        raise ValueError(case)
    a_pad = _Net(lambda x: np.hstack([a.features(x), np.zeros((len(x), k))]), np.hstack([a.weight, np.zeros((n_cls, k))]), a.bias)
    b = _Net(lambda x: np.hstack([a.features(x), channel(x)]), w_b, b_bias)
    return a_pad, b


def _ablation(net: _Net, h: np.ndarray) -> list[float]:
    """Drop in agreement with the intact network when each principal direction of h is mean-ablated."""
    dirs, _ = pca_directions(h)
    own = net.remainder(h).argmax(axis=1)
    return [float(v) for v in ablation_profile(h, net.remainder, own, dirs)]


# --------------------------------------------------------------------------- runner API


def units(config: Config) -> list[Unit]:
    return [Unit(key=f"{case}/seed{s}", params={"case": case, "seed": s}) for s in range(config.seeds) for case in config.cases]


def run_unit(config: Config, unit: Unit, ctx: Context) -> dict:
    from safetylab.data import load_dataset

    case, s = unit.params["case"], int(unit.params["seed"])
    data = load_dataset(config.dataset, seed=0)
    seed = ctx.seed_for(f"seed{s}")  # network A is the same for every case at this seed
    a, b = _build_pair(config, case, seed, data)
    x_te, y_te = data.x_test, data.y_test
    x_trig = _apply_trigger(x_te, config)
    h_a, h_b = a.features(x_te), b.features(x_te)
    geometry = {}
    for m in config.measures:
        try:
            geometry[m] = MEASURES[m](h_a, h_b)
        except ValueError as exc:  # e.g. CCA with too few samples: record why, keep the unit
            geometry[m] = None
            geometry[m + "_error"] = str(exc)
    stitch = fit_stitch(a.features(data.x_train), b.features(data.x_train))
    pred_b = b.predict(x_te)
    stitched = b.remainder(stitch.predict(h_a)).argmax(axis=1)
    prof_a, prof_b = _ablation(a, h_a), _ablation(b, h_b)
    return {
        "case": case,
        "seed": s,
        "geometry": geometry,
        "labels": y_te.tolist(),
        "pred_a_clean": a.predict(x_te).tolist(),
        "pred_b_clean": pred_b.tolist(),
        "pred_a_trigger": a.predict(x_trig).tolist(),
        "pred_b_trigger": b.predict(x_trig).tolist(),
        "pred_b_stitched": stitched.tolist(),
        "stitch_accuracy": stitching_accuracy(stitch, h_a, b.remainder, y_te),
        "ablation_a": prof_a,
        "ablation_b": prof_b,
        "ablation_similarity": profile_similarity(prof_a, prof_b),
    }


def _summarise(config: Config, r: dict) -> dict:
    """Functional numbers of one unit, recomputed from its raw predictions."""
    y = np.asarray(r["labels"])
    out = {
        "agree_clean": prediction_agreement(np.asarray(r["pred_a_clean"]), np.asarray(r["pred_b_clean"])),
        "agree_trigger": prediction_agreement(np.asarray(r["pred_a_trigger"]), np.asarray(r["pred_b_trigger"])),
        "acc_a": float(np.mean(np.asarray(r["pred_a_clean"]) == y)),
        "acc_b": float(np.mean(np.asarray(r["pred_b_clean"]) == y)),
        "stitch_acc": float(np.mean(np.asarray(r["pred_b_stitched"]) == y)),
        "stitch_fidelity": prediction_agreement(np.asarray(r["pred_b_stitched"]), np.asarray(r["pred_b_clean"])),
        "ablation_r": r["ablation_similarity"],
        "cka": r["geometry"]["linear_cka"],
        "n": len(y),
    }
    out["geometry_same"] = out["cka"] is not None and out["cka"] >= config.cka_threshold
    out["function_different"] = min(out["agree_clean"], out["agree_trigger"]) < config.agreement_threshold
    return out


def _completed(records: list[dict]) -> list[dict]:
    return [r for r in records if isinstance(r.get("result"), dict) and "geometry" in r["result"]]


def analyze(config: Config, records: list[dict]) -> Analysis:
    per = [(_r["result"], _summarise(config, _r["result"])) for _r in _completed(records)]
    diff_units = [(r, s) for r, s in per if s["function_different"]]
    blind = [(r, s) for r, s in diff_units if s["geometry_same"]]
    k, n = len(blind), len(diff_units)
    lo, hi = clopper_pearson_interval(k, n) if n else (math.nan, math.nan)
    rate = k / n if n else math.nan
    verdict = VerdictRecord.from_interval(CLAIM, rate, lo, hi, n=n, interval_method=f"Clopper–Pearson over {n} function-different pairs")

    metrics: dict = {"blindness/rate": rate, "blindness/ci": [lo, hi], "blindness/count": k, "blindness/n_function_different": n}
    cases = [c for c in config.cases if any(r["case"] == c for r, _ in per)]
    geo_rows, fun_rows = [], []
    for c in cases:
        rs = [(r, s) for r, s in per if r["case"] == c]
        geo_row = [c]
        for m in config.measures:
            vals = [r["geometry"].get(m) for r, _ in rs]
            vals = [v for v in vals if v is not None]
            mm, mlo, mhi = mean_t_interval(vals) if vals else (math.nan,) * 3
            rlo, rhi = MEASURES[m].value_range
            mlo, mhi = float(np.clip(mlo, rlo, rhi)), float(np.clip(mhi, rlo, rhi))  # a t-interval can overshoot the measure's range
            metrics[f"geometry/{c}/{m}"] = mm
            geo_row.append(format_interval(mm, mlo, mhi, 3))
        geo_rows.append(geo_row)

        def pooled(key_a: str, key_b: str) -> str:
            same = sum(int(np.sum(np.asarray(r[key_a]) == np.asarray(r[key_b]))) for r, _ in rs)
            tot = sum(len(r[key_a]) for r, _ in rs)
            wl, wh = wilson_interval(same, tot)
            return format_interval(same / tot, wl, wh, 3)

        for key in ("agree_clean", "agree_trigger", "acc_b", "stitch_acc", "stitch_fidelity", "ablation_r"):
            metrics[f"function/{c}/{key}"] = float(np.mean([s[key] for _, s in rs]))
        abl = [s["ablation_r"] for _, s in rs]
        am, alo, ahi = mean_t_interval(abl)
        n_same = sum(s["geometry_same"] for _, s in rs)
        n_diff = sum(s["function_different"] for _, s in rs)
        fun_rows.append(
            [
                c,
                GROUND_TRUTH[c],
                pooled("pred_a_clean", "pred_b_clean"),
                pooled("pred_a_trigger", "pred_b_trigger"),
                pooled("pred_b_clean", "labels"),
                pooled("pred_b_stitched", "labels"),
                format_interval(am, alo, ahi, 2),
                f"{n_same}/{len(rs)}",
                f"{n_diff}/{len(rs)}",
            ]
        )
    tables = [
        Table(
            title="Geometric measures at the last hidden layer (clean test inputs)",
            columns=["case"] + [f"{m} ({MEASURES[m].kind})" for m in config.measures],
            rows=geo_rows,
            caption="Mean over seeds [95% t-interval]. Similarities: 1 = same; Procrustes is a distance: 0 = same.",
        ),
        Table(
            title="Functional measures",
            columns=[
                "case",
                "ground truth",
                "agreement, clean",
                "agreement, trigger inputs",
                "B accuracy",
                "stitched A→B accuracy",
                "ablation-profile r",
                f"geometry says same (CKA ≥ {config.cka_threshold})",
                f"function says different (agreement < {config.agreement_threshold})",
            ],
            rows=fun_rows,
            caption="Agreement and accuracies pooled over seeds and inputs [Wilson 95%]; ablation r: mean over seeds [t-interval].",
        ),
    ]
    findings = [
        f"{k} of {n} pairs whose predictions differ are called the same by linear CKA (≥ {config.cka_threshold}); "
        f"rate {format_interval(rate, lo, hi, 2)}.",
    ]
    for c in cases:
        findings.append(
            f"{c}: linear CKA {metrics[f'geometry/{c}/linear_cka']:.3f}, agreement clean "
            f"{metrics[f'function/{c}/agree_clean']:.3f}, on trigger inputs {metrics[f'function/{c}/agree_trigger']:.3f}, "
            f"stitched accuracy {metrics[f'function/{c}/stitch_acc']:.3f}, ablation-profile r {metrics[f'function/{c}/ablation_r']:.2f}."
        )
    if "rotated_copy" in cases:
        ok = all(s["geometry_same"] and not s["function_different"] for r, s in per if r["case"] == "rotated_copy")
        findings.append(f"Control: the rotated copy is {'correctly' if ok else 'NOT'} called same by both geometry and function.")
    headline = (
        f"Linear CKA called {k} of {n} functionally different network pairs the same "
        f"(rate {format_interval(rate, lo, hi, 2)}, Clopper–Pearson); verdict: {verdict.verdict.value}."
    )
    notes = [
        f"Network A: the shared MLP {config.hidden_sizes} trained by backprop on {config.dataset} for {config.epochs} epochs; "
        "the last hidden layer is compared, on the clean test set.",
        f"Constructed channels have scale epsilon={config.epsilon} × the layer's RMS unit scale (our choice).",
        f"Trigger: features {list(config.trigger_pixels)} set to {config.trigger_value}; target class {config.target_class}; "
        f"poison fraction {config.poison_fraction} for the trained backdoor (same init and data order as A).",
        "Stitching: ridge regression (alpha 1e-3) from A's layer onto B's layer on the training set, then B's readout "
        "(direct matching, Csiszárik et al. 2021). Ablation: mean-ablate each principal direction of each network's own "
        "layer; profile = drop in agreement with the intact network; compared by Pearson r.",
        "Ground truth for the verdict is measured, not assumed: a pair counts as functionally different when agreement "
        f"on clean or on trigger inputs is below {config.agreement_threshold}.",
    ]
    return Analysis(verdict=verdict, headline=headline, metrics=metrics, tables=tables, findings=findings, setup_notes=notes)


def plots(config: Config, records: list[dict], analysis: Analysis, out_dir: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = [(_r["result"], _summarise(config, _r["result"])) for _r in _completed(records)]
    cases = [c for c in config.cases if any(r["case"] == c for r, _ in per)]
    if not per:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, c in enumerate(cases):
        pts = [(s["cka"], min(s["agree_clean"], s["agree_trigger"])) for r, s in per if r["case"] == c]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=c, color=f"C{i}", s=30, alpha=0.8)
    ax.axvline(config.cka_threshold, color="k", ls="--", lw=0.8)
    ax.axhline(config.agreement_threshold, color="k", ls=":", lw=0.8)
    ax.fill_between([config.cka_threshold, 1.005], -0.02, config.agreement_threshold, color="red", alpha=0.08, label="blind spot")
    ax.set_xlabel("linear CKA, last hidden layer (clean inputs)")
    ax.set_ylabel("prediction agreement (min of clean, trigger)")
    ax.set_xlim(min(0.5, min(s["cka"] for _, s in per) - 0.02), 1.005)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Geometry vs function, one dot per (case, seed)")
    ax.text(config.cka_threshold, 1.0, f" CKA {config.cka_threshold}", fontsize=7, va="top")
    ax.text(ax.get_xlim()[0], config.agreement_threshold, f" agreement {config.agreement_threshold}", fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "geometry_vs_function.png", dpi=150)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / max(1, len(config.measures))
    for j, m in enumerate(config.measures):
        vals = [MEASURES[m].as_similarity(analysis.metrics[f"geometry/{c}/{m}"]) for c in cases]
        ax.bar(np.arange(len(cases)) + j * width, vals, width, label=m)
    centre = np.arange(len(cases)) + 0.4 - width / 2
    ax.plot(centre, [analysis.metrics[f"function/{c}/agree_clean"] for c in cases], "wo", mec="k", ms=8, label="agreement, clean inputs")
    ax.plot(centre, [analysis.metrics[f"function/{c}/agree_trigger"] for c in cases], "k*", ms=11, label="agreement, trigger inputs")
    ax.set_xticks(centre, cases, fontsize=7)
    ax.set_ylabel("similarity (distances as 1 − d/d_max)")
    ax.set_ylim(min(0, ax.get_ylim()[0]), 1.05)
    ax.legend(fontsize=6, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("Geometric measures per case (mean over seeds) and functional agreement")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "measures_by_case.png", dpi=150)
    plt.close(fig)
    return [
        Figure(path="geometry_vs_function.png", caption="Each pair's linear CKA against its prediction agreement; the shaded corner is where geometry says same but function differs."),
        Figure(path="measures_by_case.png", caption="Every geometric measure per construction (bars; distances mapped to 1 − d/d_max), with prediction agreement on clean inputs (circles) and on trigger inputs (stars)."),
    ]


STUDY = Study(
    name="similarity-blindness",
    config_cls=Config,
    claim=CLAIM,
    threat_model=THREAT_MODEL,
    units=units,
    run_unit=run_unit,
    analyze=analyze,
    plots=plots,
    scales={"quick": {"seeds": 3}, "paper": {}},
    unit_threads=1,  # small MLPs: one thread is fastest and gives the same bits under any executor
)
