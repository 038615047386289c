"""Study `learning-rules`: do different learning rules converge on one representation?

The Platonic Representation Hypothesis (Huh et al., ICML 2024) says networks
converge on a shared representation, but every model it tested learned by
backpropagation. The source experiment trained one MLP (784→256→128→10) on MNIST
from the exact same initialisation with backprop, feedback alignment, evolution
strategies and forward-forward, and found radically different internal structure.

Design. Units are ``(rule, seed)``. For seed index ``s`` every rule starts from
the same saved initialisation (``init seed = 1000·config.seed + s``, a safetensors
file in ``run_dir/artifacts``) and sees the same minibatch order (training seed
derived from ``(config.seed, s)``): *same init across rules, different data
order/init across seeds*. Each unit stores test accuracy and the hidden
activations of every hidden layer on a fixed probe set (the first
``probe_size`` test inputs, float32, base64 in the JSON result), so ``analyze``
recomputes every similarity from raw results. For each hidden layer and measure
we report the rules × rules matrix (off-diagonal: same seed, different rule;
diagonal: the within-rule baseline, same rule, different seeds). Verdict: per
seed, mean within-rule similarity minus mean cross-rule similarity (verdict
measure, averaged over layers); the claim holds when the bootstrap interval over
seeds lies above 0. Sharing the init across rules, but not across seeds, biases
the comparison *towards* cross-rule similarity, so a positive gap is conservative.
"""

from __future__ import annotations

import base64
import itertools
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from safetylab.claims import Claim, ThreatModel
from safetylab.metrics.similarity import MEASURES
from safetylab.metrics.stats import bootstrap_interval, format_interval, mean_t_interval
from safetylab.study import Analysis, Context, Figure, Study, StudyConfig, Table, Unit

ALL_RULES = (
    "backprop",
    "feedback_alignment",
    "direct_feedback_alignment",
    "evolution_strategies",
    "forward_forward",
    "predictive_coding",
)
_CCA_LIKE = ("cca", "svcca", "pwcca")


class Config(StudyConfig):
    rules: tuple[str, ...] = ALL_RULES
    """Learning rules to compare (names from ``safetylab.learning.RULES``); at least two."""
    seeds: int = Field(5, ge=2)
    """Seeds per rule; seed s shares its initialisation across rules. ≥ 2 for the within-rule baseline."""
    dataset: Literal["auto", "digits", "mnist1d", "mnist"] = "auto"
    """Training data. 'auto' = MNIST when ``mnist_path`` is set (the essay's setup), else sklearn digits."""
    mnist_path: str | None = None
    """Local MNIST: IDX folder, .npz or Hugging Face dataset folder (never downloaded)."""
    hidden_sizes: tuple[int, ...] = (256, 128)
    """Hidden widths of the shared MLP (the essay's 784→256→128→10; input/output widths come from the data)."""
    train_subsample: int | None = Field(None, ge=100)
    """Use only this many training examples (None = all); our knob for slow rules on full MNIST."""
    budget: float = Field(1.0, gt=0)
    """Multiplier on every rule's default number of epochs (ES: steps); the rules' defaults are tuned on digits."""
    probe_size: int = Field(500, ge=20)
    """Test inputs whose hidden activations are stored and compared (capped at the test-set size)."""
    measures: tuple[str, ...] = ("linear_cka", "debiased_cka", "rsa", "procrustes", "mutual_knn")
    """Similarity measures (names from ``safetylab.metrics.similarity.MEASURES``)."""
    verdict_measure: str = "linear_cka"
    """Measure the verdict is read from (distances are mapped to 1 − d/d_max)."""

    @model_validator(mode="after")
    def _check(self) -> "Config":
        bad = [r for r in self.rules if r not in ALL_RULES]
        if bad:
            raise ValueError(f"rules: unknown rule(s) {bad}; choose from {list(ALL_RULES)}")
        if len(set(self.rules)) != len(self.rules) or len(self.rules) < 2:
            raise ValueError(f"rules: need at least two distinct rules, got {list(self.rules)}")
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes: need at least one positive width, got {self.hidden_sizes}")
        bad = [m for m in self.measures if m not in MEASURES]
        if bad or not self.measures:
            raise ValueError(f"measures: unknown or empty {bad or list(self.measures)}; choose from {sorted(MEASURES)}")
        if self.verdict_measure not in self.measures:
            raise ValueError(f"verdict_measure='{self.verdict_measure}' must be one of measures={list(self.measures)}")
        if "mutual_knn" in self.measures and self.probe_size <= 10:
            raise ValueError(f"probe_size={self.probe_size}: mutual_knn uses k=10 and needs probe_size >= 11")
        if any(m in _CCA_LIKE for m in self.measures) and self.probe_size <= max(self.hidden_sizes):
            raise ValueError(
                f"probe_size={self.probe_size} must exceed the widest hidden layer ({max(self.hidden_sizes)}) "
                "for CCA-family measures; raise probe_size or drop cca/svcca/pwcca from measures"
            )
        if self.dataset == "mnist" and self.mnist_path is None:
            raise ValueError("dataset='mnist' needs mnist_path (a local IDX folder, .npz or HF dataset folder); or use dataset='digits'")
        if self.mnist_path is not None and self.dataset in ("digits", "mnist1d"):
            raise ValueError(f"mnist_path is set but dataset='{self.dataset}'; set dataset='mnist' (or 'auto') or drop mnist_path")
        return self

    @property
    def resolved_dataset(self) -> str:
        if self.dataset == "auto":
            return "mnist" if self.mnist_path else "digits"
        return self.dataset


CLAIM = Claim(
    statement=(
        "The same MLP, data and initialisation trained with different learning rules ends with internal "
        "representations less similar to each other than two seeds of one rule are — a gap in the "
        "Platonic Representation Hypothesis, which was tested on backprop models only."
    ),
    metric="similarity/within_minus_cross",
    direction="greater",
    threshold=0.0,
    metric_doc=(
        "Per seed: mean within-rule similarity (same rule, other seeds) minus mean cross-rule similarity "
        "(same seed and init, other rules), verdict measure averaged over hidden layers; in [-1, 1]. "
        "Interval: percentile bootstrap over seeds."
    ),
)

THREAT_MODEL = ThreatModel(
    deployer="an interpretability or safety team that transfers findings (probes, circuits, similarity "
    "audits) from backprop-trained models to models trained otherwise",
    adversary="none (a scientific claim about representations, not an attack)",
    access="none",
    budget="n/a",
    protected="the validity of representation-level safety tools across training methods",
    out_of_scope=("large models", "architectures other than MLPs", "rules beyond the ones listed"),
)


# --------------------------------------------------------------------------- helpers


def encode_array(a: np.ndarray) -> dict:
    """A float32 array as JSON: ``{"dtype", "shape", "b64"}`` (little-endian bytes, base64)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    return np.frombuffer(base64.b64decode(d["b64"]), dtype="<f4").reshape(d["shape"]).astype(np.float64)


def _load_data(config: Config):
    from safetylab.data import load_dataset

    try:
        data = load_dataset(config.resolved_dataset, config.mnist_path, seed=0)
    except ValueError as exc:
        from safetylab.errors import UserError

        raise UserError(f"learning-rules: {exc}") from exc
    if config.train_subsample is not None:
        data = data.subsample_train(config.train_subsample, np.random.default_rng(0))
    return data


def _sizes(config: Config, data) -> tuple[int, ...]:
    return (data.n_features, *config.hidden_sizes, data.n_classes)


def _init_seed(config: Config, s: int) -> int:
    return 1000 * config.seed + s


def _scaled_hp(module, budget: float):
    hp = module.Hyperparams()
    field = "steps" if "steps" in type(hp).model_fields else "epochs"
    return hp.model_copy(update={field: max(1, int(round(getattr(hp, field) * budget)))})


# --------------------------------------------------------------------------- runner API


def prepare(config: Config, ctx: Context) -> None:
    """Write the shared initialisations (one per seed) before any unit runs."""
    from safetylab.learning import ensure_init

    data = _load_data(config)
    for s in range(config.seeds):
        ensure_init(Path(ctx.run_dir) / "artifacts", _sizes(config, data), _init_seed(config, s))


def units(config: Config) -> list[Unit]:
    return [Unit(key=f"{rule}/seed{s}", params={"rule": rule, "seed": s}) for s in range(config.seeds) for rule in config.rules]


def run_unit(config: Config, unit: Unit, ctx: Context) -> dict:
    from safetylab.learning import ensure_init, get_rule, load_init

    rule_name, s = unit.params["rule"], int(unit.params["seed"])
    rule = get_rule(rule_name)
    data = _load_data(config)
    sizes = _sizes(config, data)
    init_path = ensure_init(Path(ctx.run_dir) / "artifacts", sizes, _init_seed(config, s))
    model = load_init(init_path)
    train_seed = ctx.seed_for(f"seed{s}")  # shared by all rules at this seed: same data order
    t0 = time.perf_counter()
    log = rule.train(model, data, seed=train_seed, hp=_scaled_hp(rule, config.budget))
    seconds = time.perf_counter() - t0
    probe = data.x_test[: config.probe_size]
    hidden = rule.hidden(model, probe)
    return {
        "rule": rule_name,
        "seed": s,
        "init_seed": _init_seed(config, s),
        "init_file": init_path.name,
        "train_seed": train_seed,
        "dataset": data.name,
        "sizes": list(sizes),
        "test_accuracy": float(np.mean(rule.predict(model, data.x_test) == data.y_test)),
        "train_accuracy": float(np.mean(rule.predict(model, data.x_train) == data.y_train)),
        "loss_curve": [float(v) for v in log["loss"]],
        "train_seconds": seconds,
        "probe_n": int(len(probe)),
        "hidden": [encode_array(h) for h in hidden],
    }


def _similarity(name: str, a: np.ndarray, b: np.ndarray) -> float:
    """A measure on a pair; constant representations (dead layers) count as similarity nan."""
    try:
        return MEASURES[name](a, b)
    except ValueError:
        return float("nan")


def _pairwise(config: Config, records: list[dict]):
    """All needed pair values: ``vals[(layer, measure)][(rule1, s1, rule2, s2)]``."""
    acts = {(r["result"]["rule"], r["result"]["seed"]): [decode_array(h) for h in r["result"]["hidden"]] for r in records}
    rules = [r for r in config.rules if any((r, s) in acts for s in range(config.seeds))]
    seeds = sorted({s for _, s in acts})
    n_layers = len(next(iter(acts.values())))
    pairs = []
    for s in seeds:  # cross-rule, same seed
        for r1, r2 in itertools.combinations(rules, 2):
            if (r1, s) in acts and (r2, s) in acts:
                pairs.append((r1, s, r2, s))
    for r in rules:  # within-rule, different seeds
        for s1, s2 in itertools.combinations(seeds, 2):
            if (r, s1) in acts and (r, s2) in acts:
                pairs.append((r, s1, r, s2))
    vals = {}
    for layer in range(n_layers):
        for m in config.measures:
            vals[(layer, m)] = {p: _similarity(m, acts[(p[0], p[1])][layer], acts[(p[2], p[3])][layer]) for p in pairs}
    return rules, seeds, n_layers, vals


def _matrix(rules, vals_lm) -> np.ndarray:
    """rules × rules: off-diagonal mean over seeds (same seed), diagonal mean over seed pairs."""
    k = len(rules)
    out = np.full((k, k), np.nan)
    for i, j in itertools.product(range(k), repeat=2):
        if i == j:
            v = [x for (r1, s1, r2, s2), x in vals_lm.items() if r1 == r2 == rules[i]]
        else:
            v = [x for (r1, s1, r2, s2), x in vals_lm.items() if {r1, r2} == {rules[i], rules[j]} and r1 != r2]
        v = [x for x in v if np.isfinite(x)]
        out[i, j] = float(np.mean(v)) if v else np.nan
    return out


def analyze(config: Config, records: list[dict]) -> Analysis:
    from safetylab.claims import VerdictRecord

    records = [r for r in records if isinstance(r.get("result"), dict) and "hidden" in r["result"]]
    if not records:
        verdict = VerdictRecord.from_interval(CLAIM, None, None, None, n=0, interval_method="no completed units")
        return Analysis(verdict=verdict, headline="No completed units: nothing to compare.", metrics={"rules": [], "seeds": []})
    rules, seeds, n_layers, vals = _pairwise(config, records)
    vm = MEASURES[config.verdict_measure]

    # per-seed gap: mean within-rule minus mean cross-rule (verdict measure, averaged over layers)
    diffs, within_s, cross_s = [], [], []
    for s in seeds:
        w, c = [], []
        for layer in range(n_layers):
            for (r1, s1, r2, s2), x in vals[(layer, config.verdict_measure)].items():
                if not np.isfinite(x):
                    continue
                x = vm.as_similarity(x)
                if r1 == r2 and s in (s1, s2):
                    w.append(x)
                elif r1 != r2 and s1 == s:
                    c.append(x)
        if w and c:
            within_s.append(float(np.mean(w)))
            cross_s.append(float(np.mean(c)))
            diffs.append(within_s[-1] - cross_s[-1])
    est, lo, hi = bootstrap_interval(diffs) if diffs else (float("nan"),) * 3
    verdict = VerdictRecord.from_interval(
        CLAIM, est, lo, hi, n=len(diffs), interval_method=f"percentile bootstrap over {len(diffs)} seeds (per-seed gap)"
    )

    metrics: dict = {
        "similarity/within_minus_cross": est,
        "similarity/within_minus_cross_ci": [lo, hi],
        "similarity/within_minus_cross_per_seed": diffs,
        "similarity/within_mean": float(np.mean(within_s)) if within_s else None,
        "similarity/cross_mean": float(np.mean(cross_s)) if cross_s else None,
        "rules": rules,
        "seeds": seeds,
    }
    tables: list[Table] = []

    acc_rows = []
    for r in rules:
        accs = [rec["result"]["test_accuracy"] for rec in records if rec["result"]["rule"] == r]
        m, a_lo, a_hi = mean_t_interval(accs)
        a_lo, a_hi = float(np.clip(a_lo, 0, 1)), float(np.clip(a_hi, 0, 1))  # accuracy lives in [0, 1]; nan stays nan
        metrics[f"accuracy/{r}"] = m
        metrics[f"accuracy/{r}_per_seed"] = accs
        secs = float(np.mean([rec["result"]["train_seconds"] for rec in records if rec["result"]["rule"] == r]))
        acc_rows.append([r, format_interval(m, a_lo, a_hi, 3), len(accs), f"{secs:.1f}"])
    tables.append(
        Table(
            title="Test accuracy per learning rule",
            columns=["rule", "test accuracy (mean [95% t-interval])", "seeds", "train time (s)"],
            rows=acc_rows,
        )
    )

    findings = []
    for layer in range(n_layers):
        for m in config.measures:
            mat = _matrix(rules, vals[(layer, m)])
            metrics[f"matrix/layers.{layer}/{m}"] = [[None if not np.isfinite(v) else float(v) for v in row] for row in mat]
            tables.append(
                Table(
                    title=f"{m} at hidden layer layers.{layer} ({MEASURES[m].kind})",
                    columns=["rule"] + list(rules),
                    rows=[[r] + ["–" if not np.isfinite(v) else f"{v:.3f}" for v in mat[i]] for i, r in enumerate(rules)],
                    caption="Diagonal: within-rule baseline (same rule, different seeds and inits). "
                    "Off-diagonal: same seed and initialisation, different rule; mean over seeds.",
                )
            )
        # how many cross-rule pairs fall below both rules' own baselines (verdict measure)
        mat = np.vectorize(vm.as_similarity)(_matrix(rules, vals[(layer, config.verdict_measure)]))
        below = [
            (rules[i], rules[j])
            for i, j in itertools.combinations(range(len(rules)), 2)
            if mat[i, j] < min(mat[i, i], mat[j, j])
        ]
        n_pairs = len(rules) * (len(rules) - 1) // 2
        metrics[f"similarity/layers.{layer}/pairs_below_baseline"] = len(below)
        findings.append(
            f"Hidden layer layers.{layer}: {len(below)} of {n_pairs} rule pairs are less similar "
            f"({config.verdict_measure}) than both rules' own seed baselines."
        )
    findings.append(
        f"Mean {config.verdict_measure}: within-rule {metrics['similarity/within_mean']:.3f}, "
        f"cross-rule {metrics['similarity/cross_mean']:.3f} (over {len(seeds)} seeds, {n_layers} hidden layers)."
        if within_s
        else "Not enough seeds to compare within- and cross-rule similarity."
    )
    undefined = {f"layers.{layer}/{m}": sum(not np.isfinite(x) for x in vals[(layer, m)].values()) for layer, m in vals}
    metrics["similarity/undefined_pairs"] = undefined
    if any(undefined.values()):
        findings.append(
            "Some pairs were left out because a measure is undefined on them (a constant, dead layer): "
            + ", ".join(f"{k}: {v}" for k, v in undefined.items() if v)
            + "."
        )
    weak = [r for r in rules if metrics[f"accuracy/{r}"] < 0.5]
    if weak:
        findings.append(f"Rules below 50% test accuracy (their representations may differ because they did not learn): {weak}.")

    headline = (
        f"Within-rule minus cross-rule {config.verdict_measure} = {format_interval(est, lo, hi, 3)} "
        f"(bootstrap over {len(diffs)} seeds); verdict: {verdict.verdict.value}."
    )
    data_name = records[0]["result"]["dataset"] if records else config.resolved_dataset
    notes = [
        f"Dataset: {data_name}; network {records[0]['result']['sizes'] if records else '?'} with ReLU hidden layers.",
        "Same initialisation (a saved safetensors file) and minibatch order across rules at each seed; "
        "different initialisation and order across seeds. The within-rule baseline therefore also varies the init, "
        "which makes a positive gap conservative.",
        "Hyperparameters: each rule's defaults (tuned by us on digits, where the essay is silent), scaled by budget="
        f"{config.budget}. Forward-forward activations are read under a neutral label (0.1 in each label slot).",
        f"Probe set: the first {config.probe_size} test inputs (capped at the test-set size); RSA uses Euclidean RDMs; "
        "mutual k-NN uses k=10 with cosine neighbours (Huh et al. 2024).",
        "Pairs where a measure is undefined (a constant, dead layer) are left out of the means.",
    ]
    return Analysis(verdict=verdict, headline=headline, metrics=metrics, tables=tables, findings=findings, setup_notes=notes)


def plots(config: Config, records: list[dict], analysis: Analysis, out_dir: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rules = analysis.metrics["rules"]
    if not rules:
        return []
    short = [r.replace("direct_feedback_alignment", "DFA").replace("feedback_alignment", "FA")
             .replace("evolution_strategies", "ES").replace("forward_forward", "FF")
             .replace("predictive_coding", "PC").replace("backprop", "BP") for r in rules]
    figs = []
    layer_keys = sorted({k.split("/")[1] for k in analysis.metrics if k.startswith("matrix/")})
    n_l, n_m = len(layer_keys), len(config.measures)
    fig, axes = plt.subplots(n_l, n_m, figsize=(3.2 * n_m, 3.0 * n_l), squeeze=False)
    for i, lk in enumerate(layer_keys):
        for j, m in enumerate(config.measures):
            ax = axes[i][j]
            mat = np.array([[np.nan if v is None else v for v in row] for row in analysis.metrics[f"matrix/{lk}/{m}"]])
            lo_v, hi_v = MEASURES[m].value_range
            cmap = "viridis" if MEASURES[m].kind == "similarity" else "viridis_r"
            im = ax.imshow(mat, vmin=max(lo_v, 0.0) if m != "debiased_cka" else -0.1, vmax=hi_v, cmap=cmap)
            for a, b in itertools.product(range(len(rules)), repeat=2):
                if np.isfinite(mat[a, b]):
                    bright = (mat[a, b] - lo_v) / (hi_v - lo_v) > 0.6
                    if MEASURES[m].kind == "distance":
                        bright = not bright
                    ax.text(b, a, f"{mat[a, b]:.2f}", ha="center", va="center", fontsize=6, color="k" if bright else "w")
            ax.set_xticks(range(len(rules)), short, fontsize=7)
            ax.set_yticks(range(len(rules)), short, fontsize=7)
            ax.set_title(f"{m} ({MEASURES[m].kind}), {lk}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Rules × rules similarity (diagonal = within-rule seed baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "similarity_heatmaps.png", dpi=150)
    plt.close(fig)
    figs.append(Figure(path="similarity_heatmaps.png", caption="Hidden-layer similarity between rules (off-diagonal, same init) and within each rule across seeds (diagonal)."))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, r in enumerate(rules):
        accs = analysis.metrics[f"accuracy/{r}_per_seed"]
        m, lo, hi = mean_t_interval(accs)
        lo, hi = float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1))
        ax1.bar(k, m, color="C0", alpha=0.7)
        if np.isfinite(lo):
            ax1.errorbar(k, m, yerr=[[m - lo], [hi - m]], color="k", capsize=3)
        ax1.scatter([k] * len(accs), accs, color="k", s=8, zorder=3)
    ax1.set_xticks(range(len(rules)), short)
    ax1.set_ylabel("test accuracy")
    ax1.set_ylim(0, 1)
    ax1.set_title("Accuracy per rule (mean, 95% t-interval, seeds as dots)")
    d = analysis.metrics["similarity/within_minus_cross_per_seed"]
    ax2.scatter(range(len(d)), d, color="C1", label="per seed")
    v = analysis.verdict
    if v.estimate is not None:
        ax2.axhline(v.estimate, color="C1", label="mean")
        if v.ci_low is not None:
            ax2.axhspan(v.ci_low, v.ci_high, color="C1", alpha=0.2, label="95% bootstrap CI")
    ax2.axhline(0, color="k", lw=0.8, ls="--")
    ax2.set_xticks(range(len(d)))
    ax2.set_xlabel("seed index")
    ax2.set_ylabel(f"within − cross {config.verdict_measure}")
    ax2.set_title("Gap between within-rule and cross-rule similarity")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_and_gap.png", dpi=150)
    plt.close(fig)
    figs.append(Figure(path="accuracy_and_gap.png", caption="Left: test accuracy per rule. Right: per-seed gap (verdict metric) with its bootstrap interval."))
    return figs


STUDY = Study(
    name="learning-rules",
    config_cls=Config,
    claim=CLAIM,
    threat_model=THREAT_MODEL,
    units=units,
    run_unit=run_unit,
    analyze=analyze,
    plots=plots,
    prepare=prepare,
    scales={
        "quick": {"seeds": 3, "hidden_sizes": (64, 32), "probe_size": 300},
        "paper": {},
    },
    unit_threads=1,  # small MLPs: one thread is fastest and gives the same bits under any executor
)
