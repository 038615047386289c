"""Study `learning-rules`: do different learning rules converge on one representation?

The Platonic Representation Hypothesis (Huh et al., ICML 2024) says networks converge on a
shared representation, but every model it tested learned by backpropagation. The source
experiment trained one MLP (784→256→128→10) on MNIST from the same initialisation with
backprop (BP), feedback alignment (FA), evolution strategies (ES) and forward-forward (FF),
and reported radically different internal structure. This study puts that claim on the
verdict protocol (``DESIGN.md``, "How a study decides").

**Replicates are the unit.** Replicate ``s`` draws its own initialisation (a saved
safetensors file; FA/DFA's fixed random feedback matrices are drawn from the same seed, as
part of the init) and two data orders ``a`` and ``b``. Every rule trains twice from that
init, once per order (``rule/seed{s}/a``, ``rule/seed{s}/b``; "order" = the training seed:
minibatch order plus the rule's own noise, e.g. ES perturbations, FF negative labels). All
rules share order ``a``, which can only make two rules look *more* alike, so it biases the
contrast against the claim. Nothing is shared between replicates, so per-replicate numbers
are independent and a Student-t interval over them is valid (3-5 correlated per-seed gaps
under a percentile bootstrap covered 73-84%; this design replaces it).

**One reading for every rule.** FF writes the label into the first ``n_classes`` inputs
(Hinton 2022, Sec. 3.3). So that every rule is trained on and read from identical inputs,
that *label slot* holds the neutral value 0.1 for every rule and every input (FF overwrites
it with labels only inside its own training and classification). Representations are the
post-ReLU activities of the shared MLP's ordinary forward pass (``MLP.hidden``) on the same
probe inputs, for every rule; FF's own pass (layer 2 fed the unit-normalised layer 1) is
only compared with it (``ff/own_pass_linear_cka``).

**Primary contrast.** With ``D = 1 - CKA`` (the verdict measure as a dissimilarity), for a
pair of rules ``(r1, r2)`` in replicate ``s`` at hidden layer ``l``:

    ratio = D(r1_a, r2_a) / mean(D(r1_a, r1_b), D(r2_a, r2_b))

cross-rule dissimilarity (same init, same data order) over within-rule dissimilarity (same
init, other data order). A replicate contributes the mean ``log ratio`` over the pairs of
the essay's rules and the hidden layers; the verdict reads the t interval of its mean,
back-transformed (a geometric mean ratio), against 2: "radically different" = the rule's
share of the dissimilarity is at least the seed noise floor (``D_cross = D_within + D_rule``
with ``D_rule >= D_within``). Rules are compared at **matched test accuracy**: each unit
stores the representation at the first checkpoint where its test accuracy reaches
``match_accuracy``, and at the end of training (the essay's comparison, reported beside).

**Controls.** Negative: a third backprop run at the same init with a third data order
(``backprop-twin``) scored as if it were another rule must not clear 2. Positive: each
rule's own representation on shuffled probe rows (a representation of other inputs) must
clear 2, i.e. the rules' seed noise leaves room to see a radical difference at all.

**Also reported.** Every rule's distance from its own init (1 - CKA and relative weight
change), the within-rule baseline across different inits (disjoint replicate pairs) and the
ratio against it (a sensitivity analysis: its cross-rule pairs share an init, its
within-rule pairs do not), accuracy beside
every similarity, the other registered measures (debiased CKA, RSA, Procrustes, mutual
k-NN) as rules x rules matrices, and the extension rules (DFA, predictive coding) beside,
not in, the verdict.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from safetylab.claims import Claim, Contrast, Control, ThreatModel, VerdictRecord, judge_control
from safetylab.errors import UserError
from safetylab.metrics.similarity import MEASURES
from safetylab.metrics.stats import format_interval, mean_t_interval
from safetylab.study import Analysis, Calibration, Context, Figure, Study, StudyConfig, Table, Unit

ESSAY_RULES = ("backprop", "feedback_alignment", "evolution_strategies", "forward_forward")
"""The source essay's four rules: the primary contrast."""
EXTENSION_RULES = ("direct_feedback_alignment", "predictive_coding")
"""Further rules, reported beside the contrast."""
ALL_RULES = ESSAY_RULES + EXTENSION_RULES
SHORT = {"backprop": "BP", "feedback_alignment": "FA", "evolution_strategies": "ES", "forward_forward": "FF",
         "direct_feedback_alignment": "DFA", "predictive_coding": "PC"}

DATA_NAMES = ("auto", "digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files (gzip)."""
MATCH_ACCURACY = {"digits": 0.85, "fashion-mnist": 0.6}
"""Default matched test accuracy per dataset: about the highest every essay rule reaches at its
default budget in our runs (digits: FF ends at 0.87-0.93; Fashion-MNIST: ES ends near 0.65,
BP 0.89, FA 0.82, FF 0.81). Any other dataset (a PATH) uses :data:`MATCH_ACCURACY_OTHER`."""
MATCH_ACCURACY_OTHER = 0.7

RATIO_THRESHOLD = 2.0
LABEL_SLOT_VALUE = 0.1
"""Hinton's neutral label: every rule sees this in the first n_classes inputs."""
D_FLOOR = 1e-6
"""Dissimilarities are floored here before logs (two bit-identical representations)."""
ORDERS = ("a", "b")
TWIN = "backprop-twin"
INIT = "init"
N_CHECKPOINTS = 40
"""Accuracy checkpoints per run: 40 log-spaced plus 40 evenly spaced steps (the union)."""
EARLY_MATCH = 0.05
"""A run matched within this fraction of its training is read 'early' (a finding says so)."""
CHECK_SIZE = 2000
"""Test inputs the checkpoint accuracies are measured on (all of a smaller test set)."""
_CCA_LIKE = ("cca", "svcca", "pwcca")


class Config(StudyConfig):
    rules: tuple[str, ...] = ESSAY_RULES
    """Rules in the primary contrast (the essay's BP, FA, ES, FF); at least two, from safetylab.learning.RULES."""
    extensions: tuple[str, ...] = EXTENSION_RULES
    """Further rules trained and reported beside the contrast, not in the verdict (our addition)."""
    seeds: int = Field(10, ge=2)
    """Independent replicates: each has its own init and data orders; the intervals are over them (>= 2)."""
    data: str = "auto"
    """'digits' (sklearn 8x8, bundled), 'fashion-mnist' (apt-get install dataset-fashion-mnist),
    'auto' (Fashion-MNIST when installed, else digits), or a PATH to a folder of MNIST-format IDX
    files (e.g. MNIST: the essay's data), a Keras .npz or a Hugging Face dataset folder."""
    hidden_sizes: tuple[int, ...] = (256, 128)
    """Hidden widths of the shared MLP (the essay's 784→256→128→10; input/output widths come from the data)."""
    train_subsample: int | None = Field(None, ge=100)
    """Use only this many training examples (None = all); our knob for slow rules on full datasets."""
    budget: float = Field(1.0, gt=0)
    """Multiplier on every rule's default number of epochs (ES: steps); the rules' defaults are tuned on digits."""
    probe_size: int = Field(500, ge=20)
    """Test inputs whose hidden activations are stored and compared (capped at the test-set size)."""
    match_accuracy: float | None = Field(None, gt=0, lt=1)
    """Test accuracy at which rules are compared (first checkpoint reaching it); None = the dataset's
    default (digits 0.85, Fashion-MNIST 0.60, other data 0.70)."""
    measures: tuple[str, ...] = ("linear_cka", "debiased_cka", "rsa", "procrustes", "mutual_knn")
    """Similarity measures reported as rules x rules matrices (names from safetylab.metrics.similarity.MEASURES)."""
    verdict_measure: str = "linear_cka"
    """Measure of the primary contrast, as a dissimilarity D = 1 - similarity (distances: d / d_max)."""

    @model_validator(mode="after")
    def _check(self) -> "Config":
        for field, names in (("rules", self.rules), ("extensions", self.extensions)):
            bad = [r for r in names if r not in ALL_RULES]
            if bad:
                raise ValueError(f"{field}: unknown rule(s) {bad}; choose from {list(ALL_RULES)}")
        if len(set(self.rules)) != len(self.rules) or len(self.rules) < 2:
            raise ValueError(f"rules: need at least two distinct rules, got {list(self.rules)}")
        both = sorted(set(self.rules) & set(self.extensions))
        if both or len(set(self.extensions)) != len(self.extensions):
            raise ValueError(f"extensions: {both or list(self.extensions)} repeat(s) a rule; list each rule once")
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
        if not self.data.strip():
            raise ValueError(f"data: empty; use one of {list(DATA_NAMES)} or a path to IDX files")
        return self

    @property
    def all_rules(self) -> tuple[str, ...]:
        return self.rules + self.extensions


CLAIM = Claim(
    statement=(
        "The same MLP, data and initialisation trained with different learning rules (backprop, feedback "
        "alignment, evolution strategies, forward-forward) ends with radically different internal "
        "representations: at equal test accuracy, two rules differ at least twice as much as one rule "
        "differs from itself under another data order (a gap in the Platonic Representation Hypothesis, "
        "which was tested on backprop models only)."
    ),
    metric="similarity/cross_within_ratio",
    direction="greater",
    threshold=RATIO_THRESHOLD,
    metric_doc=(
        "Geometric mean, over the pairs of the essay's rules and the hidden layers, of D(rule 1, rule 2) / "
        "mean(D(rule 1, itself), D(rule 2, itself)), with D = 1 - linear CKA: between rules trained from the "
        "same init and data order, and within a rule between two data orders from the same init; read at the "
        "first checkpoint where each run reaches the matched test accuracy. 1 = rules differ no more than "
        "seeds of one rule; in (0, inf). Interval: Student t over independent replicates of the "
        "per-replicate mean log ratio, back-transformed."
    ),
    contrast=Contrast(
        treatment=ESSAY_RULES,
        control=("each rule against itself: same init, another data order",),
        measure="1 - linear CKA between two rules over 1 - linear CKA within each rule (geometric mean over "
        "rule pairs and hidden layers), at matched test accuracy",
        unit="replicates (each its own init and data orders, shared by all its rules)",
        threshold_reason=(
            "'Radically different' read as: the learning rule adds at least as much dissimilarity as the "
            "seed noise floor (D_cross = D_within + D_rule with D_rule >= D_within gives a ratio >= 2); "
            "rules that converge on one representation, as the PRH predicts, give 1."
        ),
    ),
    controls=(
        Control(
            name="backprop twin is not another rule",
            kind="negative",
            arms=("backprop", TWIN),
            measure="the same ratio with a third backprop run (same init, third data order) as the other rule",
            threshold=RATIO_THRESHOLD,
            reason="the twin is backprop: its distance to backprop is distributed as backprop's own baseline, "
            "so its ratio is 1 in distribution; clearing 2 means the ratio invents differences",
        ),
        Control(
            name="a shuffled representation is radically different",
            kind="positive",
            arms=ESSAY_RULES,
            measure="the same ratio between each rule and its own other-order representation on shuffled probe "
            "rows (a representation of other inputs), mean log over rules and layers",
            threshold=RATIO_THRESHOLD,
            reason="a representation of other inputs shares no geometry beyond chance; if even it does not "
            "clear 2, the rules' seed noise is too large for any verdict",
        ),
    ),
)

THREAT_MODEL = ThreatModel(
    deployer="an interpretability or safety team that transfers findings (probes, circuits, similarity "
    "audits) from backprop-trained models to models trained otherwise",
    adversary="none (a scientific claim about representations, not an attack)",
    access="none",
    budget="n/a",
    protected="the validity of representation-level safety tools across training methods",
    out_of_scope=("large models", "architectures other than MLPs", "rules beyond the ones listed",
                  "similarity measures other than the verdict measure (reported, not decided on)"),
)


# --------------------------------------------------------------------------- helpers


def encode_array(a: np.ndarray) -> dict:
    """A float32 array as JSON: ``{"dtype", "shape", "b64"}`` (little-endian bytes, base64)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: dict) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    return np.frombuffer(base64.b64decode(d["b64"]), dtype="<f4").reshape(d["shape"]).astype(np.float64)


def _fashion_present() -> bool:
    return all((FASHION_MNIST_DIR / f"{s}.gz").exists() for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


FASHION_HINT = (
    f"learning-rules: Fashion-MNIST not found in {FASHION_MNIST_DIR}, using sklearn digits (8x8); for the "
    "essay's 28x28 setup: apt-get install dataset-fashion-mnist, or --set data=PATH to MNIST IDX files"
)


def resolve_data(data: str) -> tuple[str, Path | None]:
    """``(dataset name, path or None)`` for the ``data`` config value.

    Raises:
        UserError: 'fashion-mnist' is not installed.
    """
    if data == "auto":
        return ("fashion-mnist", FASHION_MNIST_DIR) if _fashion_present() else ("digits", None)
    if data == "digits":
        return data, None
    if data == "fashion-mnist":
        if not _fashion_present():
            raise UserError(f"learning-rules: data=fashion-mnist but {FASHION_MNIST_DIR} lacks its IDX files; "
                            "apt-get install dataset-fashion-mnist, or --set data=PATH to IDX files")
        return "fashion-mnist", FASHION_MNIST_DIR
    path = Path(data).expanduser()
    return path.name or str(path), path


def with_label_slot(x: np.ndarray, n_classes: int) -> np.ndarray:
    """A copy of ``x`` (n, d) whose first ``n_classes`` features hold :data:`LABEL_SLOT_VALUE`."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, :n_classes] = LABEL_SLOT_VALUE
    return out


def _load_data(config: Config):
    """The dataset every rule trains on and is read from (label slot neutral, optional subsample)."""
    from safetylab.data import load_dataset, load_mnist

    name, path = resolve_data(config.data)
    try:
        data = load_dataset(name) if path is None else dataclasses.replace(load_mnist(path), name=name)
    except ValueError as exc:
        hint = "" if path is None or config.data in DATA_NAMES else f"; or use data={'|'.join(DATA_NAMES)}"
        raise UserError(f"learning-rules: data={config.data}: {exc}{hint}") from None
    if data.n_features < data.n_classes:
        raise UserError(f"learning-rules: {name} has {data.n_features} input features, fewer than its "
                        f"{data.n_classes} classes; forward-forward needs one input per class for the label")
    if config.train_subsample is not None:
        data = data.subsample_train(config.train_subsample, np.random.default_rng(0))
    return dataclasses.replace(data, x_train=with_label_slot(data.x_train, data.n_classes),
                               x_test=with_label_slot(data.x_test, data.n_classes))


def _sizes(config: Config, data) -> tuple[int, ...]:
    return (data.n_features, *config.hidden_sizes, data.n_classes)


def _match_target(config: Config, dataset: str) -> float:
    if config.match_accuracy is not None:
        return config.match_accuracy
    return MATCH_ACCURACY.get(dataset, MATCH_ACCURACY_OTHER)


def _init_seed(ctx: Context, s: int) -> int:
    return ctx.seed_for(f"init/seed{s}")


def _train_seed(ctx: Context, s: int, order: str) -> int:
    return ctx.seed_for(f"seed{s}/order-{order}")  # shared by all rules of replicate s


def _scaled_hp(module, budget: float):
    hp = module.Hyperparams()
    field = "steps" if "steps" in type(hp).model_fields else "epochs"
    return hp.model_copy(update={field: max(1, int(round(getattr(hp, field) * budget)))})


def checkpoint_steps(total_steps: int, n: int = N_CHECKPOINTS) -> set[int]:
    """Steps at which accuracy is measured: ``n`` log-spaced and ``n`` evenly spaced ones, and the last."""
    geo = np.geomspace(1, max(total_steps, 1), n)
    lin = np.linspace(1, max(total_steps, 1), n)
    return {int(v) for v in np.unique(np.round(np.concatenate([geo, lin])))} | {int(total_steps)}


def _relative_weight_change(model, init) -> list[float]:
    """``||W - W0||_F / ||W0||_F`` per layer (weights only)."""
    out = []
    for layer, layer0 in zip(model.layers, init.layers):
        w, w0 = layer.weight.detach().numpy(), layer0.weight.detach().numpy()
        out.append(float(np.linalg.norm(w - w0) / np.linalg.norm(w0)))
    return out


# --------------------------------------------------------------------------- runner API


def prepare(config: Config, ctx: Context) -> None:
    """Check the data (one-line errors, nothing written) and write one shared init per replicate."""
    from safetylab.learning import ensure_init

    if config.data == "auto" and not _fashion_present():
        print(FASHION_HINT, file=sys.stderr)
    data = _load_data(config)
    for s in range(config.seeds):
        ensure_init(Path(ctx.run_dir) / "artifacts", _sizes(config, data), _init_seed(ctx, s))


def units(config: Config) -> list[Unit]:
    out = []
    for s in range(config.seeds):
        out.append(Unit(key=f"{INIT}/seed{s}", params={"arm": INIT, "rule": None, "seed": s, "order": None}))
        for rule in config.all_rules:
            for order in ORDERS:
                out.append(Unit(key=f"{rule}/seed{s}/{order}", params={"arm": rule, "rule": rule, "seed": s, "order": order}))
        if "backprop" in config.all_rules:
            out.append(Unit(key=f"{TWIN}/seed{s}", params={"arm": TWIN, "rule": "backprop", "seed": s, "order": "c"}))
    return out


def _snapshot(model, probe: np.ndarray, step: int, accuracy: float) -> dict:
    return {"step": int(step), "test_accuracy": float(accuracy), "hidden": [encode_array(h) for h in model.hidden(probe)]}


def run_unit(config: Config, unit: Unit, ctx: Context) -> dict:
    from safetylab.learning import ensure_init, get_rule, load_init
    from safetylab.metrics.similarity import linear_cka

    p = unit.params
    s, arm = int(p["seed"]), p["arm"]
    data = _load_data(config)
    sizes = _sizes(config, data)
    init_seed = _init_seed(ctx, s)
    init_path = ensure_init(Path(ctx.run_dir) / "artifacts", sizes, init_seed)
    model = load_init(init_path)
    probe = data.x_test[: config.probe_size]  # label slot neutral, identical for every rule
    x_check, y_check = data.x_test[:CHECK_SIZE], data.y_test[:CHECK_SIZE]
    target = _match_target(config, data.name)
    result: dict[str, Any] = {
        "arm": arm, "rule": p["rule"], "seed": s, "order": p["order"], "init_seed": init_seed,
        "init_file": init_path.name, "train_seed": None, "dataset": data.name, "sizes": list(sizes),
        "probe_n": int(len(probe)), "check_n": int(len(y_check)), "match_accuracy": target,
    }
    if arm == INIT:  # the untrained network: reference for every rule's distance from its init
        acc = float(np.mean(model.predict(data.x_test) == data.y_test))
        result.update(total_steps=0, accuracy_trace=[], train_seconds=0.0, loss_curve=[], test_accuracy=acc,
                      final=_snapshot(model, probe, 0, acc), matched=None, weight_change=[0.0] * len(model.layers),
                      own_pass_linear_cka=[1.0] * model.n_hidden)
        return result

    rule = get_rule(p["rule"])
    train_seed = _train_seed(ctx, s, p["order"])
    init = load_init(init_path)
    trace: list[list[float]] = []
    matched: dict | None = None
    schedule: set[int] = set()

    def on_step(step: int, total: int) -> None:
        nonlocal matched, schedule
        if not schedule:
            schedule = checkpoint_steps(total)
        if step not in schedule:
            return
        acc = float(np.mean(rule.predict(model, x_check) == y_check))
        trace.append([step, acc])
        if matched is None and acc >= target:
            matched = _snapshot(model, probe, step, acc)

    kwargs: dict[str, Any] = {}
    if "feedback_seed" in inspect.signature(rule.train).parameters:
        kwargs["feedback_seed"] = init_seed  # FA/DFA's fixed feedback weights belong to the init
    t0 = time.perf_counter()
    log = rule.train(model, data, seed=train_seed, hp=_scaled_hp(rule, config.budget), on_step=on_step, **kwargs)
    seconds = time.perf_counter() - t0
    final_acc = float(np.mean(rule.predict(model, data.x_test) == data.y_test))
    own = rule.hidden(model, probe)  # the rule's own reading (FF: normalised pass)
    result.update(
        train_seed=train_seed,
        total_steps=int(trace[-1][0]) if trace else 0,
        accuracy_trace=trace,
        train_seconds=seconds,
        loss_curve=[float(v) for v in log["loss"]],
        test_accuracy=final_acc,
        final=_snapshot(model, probe, int(trace[-1][0]) if trace else 0, final_acc),
        matched=matched,
        weight_change=_relative_weight_change(model, init),
        own_pass_linear_cka=[linear_cka(a, b) for a, b in zip(model.hidden(probe), own)],
    )
    return result


# --------------------------------------------------------------------------- analysis


class _Reader:
    """Representations by ``(arm, seed, order)`` at one checkpoint, and cached dissimilarities."""

    def __init__(self, records: list[dict], checkpoint: str, measure: str) -> None:
        self.checkpoint = checkpoint
        self.measure = MEASURES[measure]
        self.units: dict[tuple, dict] = {}
        for rec in records:
            r = rec["result"]
            snap = r["final"] if checkpoint == "final" or r["arm"] == INIT else (r["matched"] or r["final"])
            self.units[(r["arm"], r["seed"], r["order"] or "")] = {
                "snap": snap, "reached": r["arm"] == INIT or checkpoint == "final" or r["matched"] is not None}
        self._acts: dict[tuple, list[np.ndarray]] = {}
        self._cache: dict[tuple, float] = {}

    def has(self, *keys: tuple) -> bool:
        return all(k in self.units for k in keys)

    def acts(self, key: tuple) -> list[np.ndarray]:
        if key not in self._acts:
            self._acts[key] = [decode_array(h) for h in self.units[key]["snap"]["hidden"]]
        return self._acts[key]

    def accuracy(self, key: tuple) -> float:
        return float(self.units[key]["snap"]["test_accuracy"])

    def dissimilarity(self, k1: tuple, k2: tuple, layer: int, shuffle: int | None = None) -> float:
        """``1 - similarity`` of the measure; ``nan`` where it is undefined (a dead layer).

        ``shuffle``: read ``k2`` on probe rows permuted by this seed (the positive control).
        """
        ck = (k1, k2, layer, shuffle)
        if ck not in self._cache:
            b = self.acts(k2)[layer]
            if shuffle is not None:
                b = b[np.random.default_rng([shuffle, 7]).permutation(len(b))]
            try:
                v = self.measure.fn(self.acts(k1)[layer], b)
                self._cache[ck] = 1.0 - self.measure.as_similarity(v)
            except ValueError:
                self._cache[ck] = float("nan")
        return self._cache[ck]


def _log_ratio(cross: float, within_1: float, within_2: float) -> float:
    """``log(D_cross / mean(D_within))``, dissimilarities floored at :data:`D_FLOOR`; nan propagates."""
    return math.log(max(cross, D_FLOOR)) - math.log(max((within_1 + within_2) / 2, D_FLOOR))


def _geo(values: list[float]) -> tuple[float, float, float]:
    """Geometric mean and back-transformed t interval of per-replicate log ratios."""
    v = [x for x in values if np.isfinite(x)]
    m, lo, hi = mean_t_interval(v)
    return tuple(float(np.exp(x)) if np.isfinite(x) else float("nan") for x in (m, lo, hi))  # type: ignore[return-value]


def _pair_log_ratios(rd: _Reader, r1: str, r2: str, s: int, n_layers: int) -> list[float]:
    """Per layer, log ratio of rules ``r1``, ``r2`` in replicate ``s`` (empty if a unit is missing)."""
    a1, b1, a2, b2 = (r1, s, "a"), (r1, s, "b"), (r2, s, "a"), (r2, s, "b")
    if not rd.has(a1, b1, a2, b2):
        return []
    return [_log_ratio(rd.dissimilarity(a1, a2, l), rd.dissimilarity(a1, b1, l), rd.dissimilarity(a2, b2, l))
            for l in range(n_layers)]


def _replicate_means(per_rep: dict[int, list[float]]) -> list[float]:
    out = []
    for s in sorted(per_rep):
        v = [x for x in per_rep[s] if np.isfinite(x)]
        if v:
            out.append(float(np.mean(v)))
    return out


def _contrast(rd: _Reader, rules: tuple[str, ...], seeds: list[int], n_layers: int) -> dict:
    """The primary ratio at one checkpoint: pooled per replicate, and per pair and layer."""
    pooled: dict[int, list[float]] = {s: [] for s in seeds}
    per_pair: dict[tuple, dict[int, list[float]]] = {}
    for r1, r2 in itertools.combinations(rules, 2):
        for s in seeds:
            lr = _pair_log_ratios(rd, r1, r2, s, n_layers)
            pooled[s].extend(lr)
            for l, v in enumerate(lr):
                per_pair.setdefault((r1, r2, l), {})[s] = v
    reps = _replicate_means(pooled)
    est, lo, hi = _geo(reps)
    return {"estimate": est, "lo": lo, "hi": hi, "n": len(reps), "per_replicate": [float(np.exp(x)) for x in reps],
            "per_pair": {k: _geo(list(v.values())) + (len([x for x in v.values() if np.isfinite(x)]),)
                         for k, v in per_pair.items()}}


def _contrast_other_init(rd: _Reader, rules: tuple[str, ...], seeds: list[int], n_layers: int) -> dict:
    """The ratio against the *different-init* baseline, over disjoint pairs of replicates ``(s1, s2)``:
    cross-rule D (mean of the two replicates) over mean within-rule D between the replicates."""
    per_unit: dict[int, list[float]] = {}
    for j, (s1, s2) in enumerate((seeds[i], seeds[i + 1]) for i in range(0, len(seeds) - 1, 2)):
        for r1, r2 in itertools.combinations(rules, 2):
            keys = [(r, s, "a") for r in (r1, r2) for s in (s1, s2)]
            if not rd.has(*keys):
                continue
            for l in range(n_layers):
                cross = (rd.dissimilarity((r1, s1, "a"), (r2, s1, "a"), l) + rd.dissimilarity((r1, s2, "a"), (r2, s2, "a"), l)) / 2
                w1, w2 = rd.dissimilarity((r1, s1, "a"), (r1, s2, "a"), l), rd.dissimilarity((r2, s1, "a"), (r2, s2, "a"), l)
                per_unit.setdefault(j, []).append(_log_ratio(cross, w1, w2))
    reps = _replicate_means(per_unit)
    est, lo, hi = _geo(reps)
    return {"estimate": est, "lo": lo, "hi": hi, "n": len(reps)}


def _negative_control(rd: _Reader, seeds: list[int], n_layers: int) -> tuple[float, float, float, int]:
    per_rep = {}
    for s in seeds:
        a, b, twin = ("backprop", s, "a"), ("backprop", s, "b"), (TWIN, s, "c")
        if rd.has(a, b, twin):
            per_rep[s] = [_log_ratio(rd.dissimilarity(a, twin, l), rd.dissimilarity(a, b, l), rd.dissimilarity(a, b, l))
                          for l in range(n_layers)]
    reps = _replicate_means(per_rep)
    return _geo(reps) + (len(reps),)


def _positive_control(rd: _Reader, rules: tuple[str, ...], seeds: list[int], n_layers: int) -> tuple[float, float, float, int]:
    per_rep: dict[int, list[float]] = {}
    for s in seeds:
        for r in rules:
            a, b = (r, s, "a"), (r, s, "b")
            if not rd.has(a, b):
                continue
            for l in range(n_layers):  # shuffle seeded by the replicate: the report is recomputable
                w = rd.dissimilarity(a, b, l)
                per_rep.setdefault(s, []).append(_log_ratio(rd.dissimilarity(a, b, l, shuffle=s), w, w))
    reps = _replicate_means(per_rep)
    return _geo(reps) + (len(reps),)


def _similarity_bounds(name: str) -> tuple[float, float]:
    """Range of ``as_similarity`` of a measure (distances map into [0, 1])."""
    m = MEASURES[name]
    return (float(m.value_range[0]), 1.0) if m.kind == "similarity" else (0.0, 1.0)


def _t(values: list[float], bounds=None) -> tuple[float, float, float]:
    v = [x for x in values if np.isfinite(x)]
    return mean_t_interval(v, bounds=bounds)


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _fmt(est: float, lo: float, hi: float, digits: int = 2) -> str:
    return format_interval(est, lo, hi, digits)


def analyze(config: Config, records: list[dict]) -> Analysis:
    """The verdict and the report from raw records (pure; one BLAS thread: hundreds of small
    products, which a contended thread pool slows a hundredfold)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _analyze(config, records)


def _analyze(config: Config, records: list[dict]) -> Analysis:
    records = [r for r in records if isinstance(r.get("result"), dict) and "final" in r["result"]]
    present = {r["result"]["arm"] for r in records}
    rules = tuple(r for r in config.rules if r in present)
    extensions = tuple(r for r in config.extensions if r in present)
    seeds = sorted({r["result"]["seed"] for r in records})
    if len(rules) < 2:
        controls = [judge_control(c, None, None, None, "not run: no completed units") for c in CLAIM.controls]
        verdict = VerdictRecord.from_interval(CLAIM, None, None, None, n=0, controls=controls,
                                              interval_method="fewer than two rules completed")
        return Analysis(verdict=verdict, headline="Fewer than two learning rules completed: nothing to compare.",
                        controls=controls, metrics={"rules": list(rules), "extensions": [], "seeds": seeds})
    first = records[0]["result"]
    n_layers = len(first["final"]["hidden"])
    target = first["match_accuracy"]
    measure = config.verdict_measure
    readers = {c: _Reader(records, c, measure) for c in ("matched", "final")}
    rd = readers["matched"]

    # primary contrast (matched accuracy) and the same at the end of training
    res = {c: _contrast(readers[c], rules, seeds, n_layers) for c in readers}
    prim = res["matched"]
    other_init = _contrast_other_init(rd, rules, seeds, n_layers)
    neg_c, pos_c = CLAIM.controls
    neg = _negative_control(rd, seeds, n_layers)
    pos = _positive_control(rd, rules, seeds, n_layers)
    controls = [
        judge_control(neg_c, neg[0], neg[1], neg[2],
                      f"backprop twin vs backprop: ratio {_fmt(*neg[:3])} over {neg[3]} replicates (must not clear {RATIO_THRESHOLD:g})")
        if neg[3] else judge_control(neg_c, None, None, None, "not run: needs backprop (with its twin) among the rules"),
        judge_control(pos_c, pos[0], pos[1], pos[2],
                      f"each rule vs its shuffled other-order self: ratio {_fmt(*pos[:3])} over {pos[3]} replicates (must clear {RATIO_THRESHOLD:g})"),
    ]
    verdict = VerdictRecord.from_interval(
        CLAIM, prim["estimate"], prim["lo"], prim["hi"], n=prim["n"], controls=controls,
        interval_method=f"Student t (df {max(prim['n'] - 1, 0)}) over {prim['n']} independent replicates of the mean log "
        f"ratio over {len(rules) * (len(rules) - 1) // 2} rule pairs x {n_layers} hidden layers, back-transformed",
    )

    metrics: dict[str, Any] = {
        "similarity/cross_within_ratio": prim["estimate"],
        "similarity/cross_within_ratio_ci": [prim["lo"], prim["hi"]],
        "similarity/cross_within_ratio_per_seed": prim["per_replicate"],
        "similarity/cross_within_ratio_final": res["final"]["estimate"],
        "similarity/cross_within_ratio_final_ci": [res["final"]["lo"], res["final"]["hi"]],
        "similarity/cross_within_ratio_final_per_seed": res["final"]["per_replicate"],
        "similarity/cross_within_ratio_other_init": other_init["estimate"],
        "similarity/cross_within_ratio_other_init_ci": [other_init["lo"], other_init["hi"]],
        "control/backprop_twin_ratio": list(neg[:3]),
        "control/shuffled_ratio": list(pos[:3]),
        "match_accuracy": target,
        "rules": list(rules),
        "extensions": list(extensions),
        "seeds": seeds,
        "n_layers": n_layers,
    }
    tables: list[Table] = []
    findings: list[str] = []
    all_rules = rules + extensions

    # accuracy beside everything
    acc_rows = []
    for r in all_rules + ((TWIN,) if TWIN in present else ()):
        recs = [x["result"] for x in records if x["result"]["arm"] == r]
        final = _t([x["test_accuracy"] for x in recs], bounds=(0, 1))
        reached = [x for x in recs if x["matched"] is not None]
        m_acc = _t([x["matched"]["test_accuracy"] for x in reached], bounds=(0, 1))
        frac = [x["matched"]["step"] / max(x["total_steps"], 1) for x in reached]
        metrics[f"accuracy/{r}"] = final[0]
        metrics[f"accuracy/{r}_per_seed"] = [x["test_accuracy"] for x in recs]
        metrics[f"accuracy/{r}_matched"] = m_acc[0]
        metrics[f"accuracy/{r}_matched_reached"] = [len(reached), len(recs)]
        metrics[f"accuracy/{r}_matched_fraction"] = float(np.mean(frac)) if frac else None
        secs = float(np.mean([x["train_seconds"] for x in recs])) if recs else float("nan")
        acc_rows.append([r, _fmt(*final, 3), _fmt(*m_acc, 3), f"{len(reached)}/{len(recs)}",
                         f"{np.mean(frac):.2f}" if frac else "–", f"{secs:.1f}"])
    tables.append(Table(
        title="Test accuracy per learning rule",
        columns=["rule", "final test accuracy [95% t]", f"accuracy at the matched checkpoint (target {target:.2f})",
                 "runs reaching the target", "mean fraction of training at the match", "train time (s)"],
        rows=acc_rows,
        caption=f"Each run stores its representation at the first checkpoint whose accuracy (on the first "
        f"{first['check_n']} test inputs) reaches {target:.2f}; a run that never does is compared at its end."))

    # per pair and layer: the contrast with accuracies beside it
    for c, title in (("matched", f"at matched test accuracy ({target:.2f}); the verdict"),
                     ("final", "at the end of training (the essay's comparison)")):
        rdc = readers[c]
        rows = []
        pairs = list(itertools.combinations(all_rules, 2))
        per_pair = _contrast(rdc, all_rules, seeds, n_layers)["per_pair"] if extensions else res[c]["per_pair"]
        for (r1, r2), l in itertools.product(pairs, range(n_layers)):
            ratio = per_pair.get((r1, r2, l))
            if ratio is None or not ratio[3]:
                continue
            keys = [((r1, s, "a"), (r2, s, "a"), (r1, s, "b"), (r2, s, "b")) for s in seeds
                    if rdc.has((r1, s, "a"), (r2, s, "a"), (r1, s, "b"), (r2, s, "b"))]
            sim = lambda k1, k2: float(np.nanmean([1 - rdc.dissimilarity(k[k1], k[k2], l) for k in keys]))  # noqa: E731
            acc = lambda i: float(np.mean([rdc.accuracy(k[i]) for k in keys]))  # noqa: E731
            role = "contrast" if r1 in rules and r2 in rules else "extension"
            rows.append([f"{SHORT.get(r1, r1)}–{SHORT.get(r2, r2)}", f"layers.{l}", role, f"{acc(0):.3f}", f"{acc(1):.3f}",
                         f"{sim(0, 1):.3f}", f"{sim(0, 2):.3f}", f"{sim(1, 3):.3f}", _fmt(*ratio[:3])])
            metrics[f"ratio/{c}/{r1}~{r2}/layers.{l}"] = list(ratio[:3])
        tables.append(Table(
            title=f"Cross-rule over within-rule dissimilarity per rule pair, {title}",
            columns=["pair", "layer", "role", "accuracy rule 1", "accuracy rule 2", f"{measure} between rules",
                     f"{measure} rule 1 vs itself", f"{measure} rule 2 vs itself", "ratio (1 - sim) [95% t]"],
            rows=rows,
            caption=f"Means over {len(seeds)} replicates. 'Between rules': same init and data order; 'vs itself': same "
            f"init, other data order. Ratio: geometric mean over replicates with an unadjusted 95% t interval; "
            f"the claim needs > {RATIO_THRESHOLD:g}."))

    # accuracy of the snapshots compared at the matched checkpoint (a run that never reached it: its end)
    compared_acc = {r: float(np.mean([rd.accuracy((r, s, o)) for s in seeds for o in ORDERS if rd.has((r, s, o))]))
                    for r in all_rules}
    metrics["accuracy/compared_at_match"] = compared_acc

    # baselines and distance from init
    base_rows = []
    sim_bounds = _similarity_bounds(measure)
    pairs_of_seeds = [(seeds[i], seeds[i + 1]) for i in range(0, len(seeds) - 1, 2)]  # disjoint: independent
    for r, l in itertools.product(all_rules, range(n_layers)):
        same = [1 - rd.dissimilarity((r, s, "a"), (r, s, "b"), l) for s in seeds if rd.has((r, s, "a"), (r, s, "b"))]
        other = [1 - rd.dissimilarity((r, s1, "a"), (r, s2, "a"), l) for s1, s2 in pairs_of_seeds
                 if rd.has((r, s1, "a"), (r, s2, "a"))]
        from_init = [readers["final"].dissimilarity((r, s, "a"), (INIT, s, ""), l) for s in seeds
                     if readers["final"].has((r, s, "a"), (INIT, s, ""))]
        wchange = [x["result"]["weight_change"][l] for x in records if x["result"]["arm"] == r and x["result"]["order"] == "a"]
        t_same, t_other, t_init = _t(same, sim_bounds), _t(other, sim_bounds), _t(from_init, (0.0, 1.0 - sim_bounds[0]))
        metrics[f"within_same_init/{r}/layers.{l}"] = list(t_same)
        metrics[f"within_other_init/{r}/layers.{l}"] = list(t_other)
        metrics[f"from_init/{r}/layers.{l}"] = list(t_init)
        metrics[f"weight_change/{r}/layers.{l}"] = float(np.mean(wchange)) if wchange else None
        base_rows.append([r, f"layers.{l}", _num(compared_acc[r]), _fmt(*t_same, 3), _fmt(*t_other, 3),
                          _num(metrics[f"accuracy/{r}"]), _fmt(*t_init, 3), f"{np.mean(wchange):.2f}" if wchange else "–"])
    tables.append(Table(
        title="Within-rule baselines and distance from the initialisation",
        columns=["rule", "layer", "accuracy (compared, matched)", f"{measure} vs itself, same init (matched)",
                 f"{measure} vs itself, other init (matched)", "accuracy (final)", f"1 - {measure} from own init (final)",
                 "relative weight change ||W - W0|| / ||W0|| (final)"],
        rows=base_rows,
        caption=f"'Other init': disjoint pairs of replicates ({len(pairs_of_seeds)} independent pairs). "
        "Intervals: 95% Student t."))

    # other measures: rules x rules matrices at the matched checkpoint (diagonal = same init, other order)
    undefined: dict[str, int] = {}
    for m in config.measures:
        mrd = rd if m == measure else _Reader(records, "matched", m)
        for l in range(n_layers):
            k = len(all_rules)
            mat = np.full((k, k), np.nan)
            n_undef = 0
            for i, j in itertools.product(range(k), repeat=2):
                if j < i:
                    continue
                keys = [((all_rules[i], s, "a"), (all_rules[j], s, "b" if i == j else "a")) for s in seeds]
                vals = [1 - mrd.dissimilarity(a, b, l) for a, b in keys if mrd.has(a, b)]
                n_undef += sum(not np.isfinite(v) for v in vals)
                fin = [v for v in vals if np.isfinite(v)]
                if fin:
                    v = float(np.mean(fin))
                    mat[i, j] = mat[j, i] = v
            undefined[f"layers.{l}/{m}"] = n_undef
            metrics[f"matrix/layers.{l}/{m}"] = [[None if not np.isfinite(v) else float(v) for v in row] for row in mat]
            tables.append(Table(
                title=f"{m} at hidden layer layers.{l}, matched accuracy (as a similarity)",
                columns=["rule"] + [SHORT.get(r, r) for r in all_rules],
                rows=[[SHORT.get(r, r)] + ["–" if not np.isfinite(v) else f"{v:.3f}" for v in mat[i]]
                      for i, r in enumerate(all_rules)],
                kind="matrix",
                caption="Diagonal: the rule against itself (same init, other data order). Off-diagonal: same init and "
                "data order, different rule. Means over replicates; distances shown as 1 - d/d_max. Test accuracy at "
                "this checkpoint: " + ", ".join(f"{SHORT.get(r, r)} {_num(compared_acc[r])}" for r in all_rules)
                + "."))
    metrics["similarity/undefined_pairs"] = undefined

    # findings, each backed by a metric or table
    verdict_word = verdict.verdict.value
    findings.append(
        f"At matched accuracy the essay's rules differ {_fmt(prim['estimate'], prim['lo'], prim['hi'])} times as much "
        f"from each other as from themselves (threshold {RATIO_THRESHOLD:g}): {verdict.label}. At the end of training: "
        f"{_fmt(res['final']['estimate'], res['final']['lo'], res['final']['hi'])}."
    )
    clear = [(r1, r2, l) for (r1, r2, l), v in prim["per_pair"].items() if np.isfinite(v[1]) and v[1] > RATIO_THRESHOLD]
    below = [(r1, r2, l) for (r1, r2, l), v in prim["per_pair"].items() if np.isfinite(v[2]) and v[2] <= RATIO_THRESHOLD]
    n_cells = len(prim["per_pair"])
    fmt_cells = lambda cells: ", ".join(f"{SHORT[a]}–{SHORT[b]} layers.{l}" for a, b, l in cells) or "none"  # noqa: E731
    findings.append(f"Per pair and layer (unadjusted 95% t, matched accuracy): {len(clear)} of {n_cells} clear "
                    f"{RATIO_THRESHOLD:g} ({fmt_cells(clear)}); {len(below)} lie wholly below it ({fmt_cells(below)}).")
    findings.append(
        "Against the within-rule baseline across *different* inits instead (same data order; "
        f"{other_init['n']} disjoint replicate pair(s)): {_fmt(other_init['estimate'], other_init['lo'], other_init['hi'])}. "
        "The primary contrast uses the same-init baseline because its cross-rule pairs share their init too."
    )
    noisy = max(rules, key=lambda r: np.nanmean([1 - metrics[f"within_same_init/{r}/layers.{l}"][0] for l in range(n_layers)]))
    findings.append(
        f"Seed noise differs by rule: {measure} of a rule against itself (same init, other data order), mean over layers: "
        + ", ".join(f"{SHORT.get(r, r)} {np.nanmean([metrics[f'within_same_init/{r}/layers.{l}'][0] for l in range(n_layers)]):.3f}"
                    for r in rules)
        + f"; pairs with {SHORT.get(noisy, noisy)} need the largest cross-rule difference to clear {RATIO_THRESHOLD:g}."
    )
    for r in rules:
        d0 = [metrics[f"from_init/{r}/layers.{l}"][0] for l in range(n_layers)]
        metrics[f"from_init/{r}"] = float(np.nanmean(d0))
    findings.append(
        "Distance from the shared init at the end of training (1 - " + measure + ", mean over layers; per layer with "
        "intervals in the baselines table): " + ", ".join(f"{SHORT.get(r, r)} {metrics[f'from_init/{r}']:.3f}" for r in rules)
        + "; relative weight change " + ", ".join(
            f"{SHORT.get(r, r)} {np.mean([metrics[f'weight_change/{r}/layers.{l}'] for l in range(n_layers)]):.2f}" for r in rules)
        + "."
    )
    ff = [x["result"]["own_pass_linear_cka"] for x in records if x["result"]["arm"] == "forward_forward"]
    if ff:
        per_layer = np.mean(np.array(ff), axis=0)
        metrics["ff/own_pass_linear_cka"] = [float(v) for v in per_layer]
        findings.append("Forward-forward read through its own pass (layer 2 fed the unit-normalised layer 1) vs the "
                        "shared pass every rule is read through: linear CKA " +
                        ", ".join(f"layers.{l} {v:.3f}" for l, v in enumerate(per_layer)) + ".")
    early = {r: metrics[f"accuracy/{r}_matched_fraction"] for r in rules
             if (metrics[f"accuracy/{r}_matched_fraction"] or 1.0) < EARLY_MATCH}
    if early:
        findings.append(
            f"At the matched accuracy {target:.2f} some rules are read early in their training ("
            + ", ".join(f"{SHORT.get(r, r)} after {100 * v:.1f}% of its steps" for r, v in early.items())
            + "): there the comparison is close to one between inits; a higher match_accuracy needs every rule, "
            "the slowest included, to reach it (see the end-of-training ratio for the other extreme)."
        )
    missed = {r: metrics[f"accuracy/{r}_matched_reached"] for r in all_rules
              if metrics[f"accuracy/{r}_matched_reached"][0] < metrics[f"accuracy/{r}_matched_reached"][1]}
    if missed:
        findings.append(f"Runs that never reached the matched accuracy {target:.2f} (compared at their end instead): "
                        + ", ".join(f"{r} {a}/{b} reached" for r, (a, b) in missed.items()) + ".")
    if any(undefined.values()):
        findings.append("Pairs left out because a measure is undefined on them (a constant, dead layer): "
                        + ", ".join(f"{k}: {v}" for k, v in undefined.items() if v) + ".")

    headline = (
        f"Cross-rule over within-rule dissimilarity (1 - {measure}) at matched accuracy: "
        f"{_fmt(prim['estimate'], prim['lo'], prim['hi'])} (95% t over {prim['n']} replicates; claim needs > "
        f"{RATIO_THRESHOLD:g}); verdict: {verdict_word}."
    )
    contrast = (
        f"Treatment: the {len(rules) * (len(rules) - 1) // 2} pairs of {', '.join(SHORT.get(r, r) for r in rules)}, "
        f"each pair trained from the same init and data order; control: each rule against itself at the same init "
        f"with another data order. Measure: geometric mean of (1 - {measure}) between rules over (1 - {measure}) "
        f"within rules, over pairs and {n_layers} hidden layers, at test accuracy {target:.2f}: "
        f"{_fmt(prim['estimate'], prim['lo'], prim['hi'])} over {prim['n']} replicates (threshold {RATIO_THRESHOLD:g})."
    )
    notes = [
        f"Dataset: {first['dataset']}; network {first['sizes']} with ReLU hidden layers. The first {first['sizes'][-1]} "
        f"inputs are a label slot holding {LABEL_SLOT_VALUE} for every rule (forward-forward writes its labels there "
        "while training), so all rules train on and are read from identical inputs.",
        "Every rule's representation is the shared MLP's ordinary forward pass on the same probe inputs; "
        "forward-forward's own pass differs at layer 2 (unit-normalised input) and is only compared with it.",
        "Replicate = one init (safetensors file; FA/DFA feedback matrices drawn from the same seed) and two data "
        "orders; all rules share order a, which can only make rules look alike (conservative for the claim). "
        "Replicates share nothing, so the t interval over them is over independent units.",
        f"Matched accuracy {target:.2f} ({'set by the config' if config.match_accuracy is not None else 'our default for this dataset'}); "
        f"accuracy checked at {N_CHECKPOINTS} log-spaced and {N_CHECKPOINTS} evenly spaced steps on the first "
        f"{first['check_n']} test inputs; final accuracy on the whole test set.",
        "Hyperparameters: each rule's defaults (tuned by us on digits, where the essay is silent), scaled by budget="
        f"{config.budget}.",
        f"Probe set: the first {first['probe_n']} test inputs; RSA uses Euclidean RDMs; mutual k-NN uses k=10 with "
        "cosine neighbours (Huh et al. 2024). Dissimilarities are floored at 1e-6 before logs.",
    ]
    return Analysis(verdict=verdict, headline=headline, metrics=metrics, tables=tables, controls=controls,
                    contrast=contrast, findings=findings, setup_notes=notes)


# --------------------------------------------------------------------------- simulation

SIM_WITHIN = 0.05
"""Median within-rule dissimilarity (1 - CKA) of a simulated run pair."""
SIM_WITHIN_LOG_SD = 0.5
"""Log-sd of the within-rule dissimilarity across replicates and layers."""
SIM_REPLICATE_LOG_SD = 0.2
"""Log-sd of the true ratio between replicates. Our quick run on digits (8 replicates) had a log-sd
of 0.16 for the whole per-replicate statistic; with the layer term the simulator's is about 0.23."""
SIM_LAYER_LOG_SD = 0.15
"""Log-sd of the true ratio between the layers of one replicate."""
SIM_RUN_LOG_SD = 0.2
"""Log-sd of each run's own noise weight (makes every pair's dissimilarity differ a little)."""


def _orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` orthonormal, mean-zero vectors in R^n, as columns ``(n, k)``."""
    a = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, k))], axis=1)
    q, _ = np.linalg.qr(a)
    return q[:, 1:]


def simulate(config: Config, effect: float, rng: np.random.Generator) -> list[dict]:
    """Records shaped as :func:`run_unit` returns them, with a true cross/within ratio ``effect``.

    Each run's hidden layer is rank one, ``x wᵀ``, so linear CKA between two runs is the squared
    correlation of their ``x`` (exactly: the parts of ``x`` are orthonormal vectors). In replicate
    ``s`` and layer ``l`` every run is ``x = √α·shared + √β·rule + √ω·order + noise``: two rules
    at the same order share ``α + ω``, one rule at two orders ``α + β``; the weights are set so
    that within-rule dissimilarity is ``D_w`` (log-normal around :data:`SIM_WITHIN`) and
    cross-rule dissimilarity ``R·D_w`` with ``log R = log effect + replicate + layer`` noise. The
    backprop twin is backprop at a third order (ratio 1: the negative control passes); the
    positive control comes from the data as it does for real runs.
    """
    n = config.probe_size
    all_rules = config.all_rules
    target = config.match_accuracy or MATCH_ACCURACY["digits"]
    sizes = [64, *config.hidden_sizes, 10]
    the_units = units(config)
    out: dict[str, dict] = {}
    for s in range(config.seeds):
        rep = float(rng.normal(0, SIM_REPLICATE_LOG_SD))
        runs = [u for u in the_units if u.params["seed"] == s]
        layers_by_ckpt: dict[str, dict[str, list[np.ndarray]]] = {}
        for ckpt in ("matched", "final"):
            layers: dict[str, list[np.ndarray]] = {u.key: [] for u in runs}
            for h in config.hidden_sizes:
                ratio = effect * math.exp(rep + rng.normal(0, SIM_LAYER_LOG_SD))
                d_w = min(SIM_WITHIN * math.exp(rng.normal(0, SIM_WITHIN_LOG_SD)), 0.3)
                d_c = min(ratio * d_w, 0.95)
                c_w, c_c = math.sqrt(1 - d_w), math.sqrt(1 - d_c)  # correlations
                if c_w >= c_c:  # rules differ more than orders: a rule component
                    alpha, beta, omega = c_c, c_w - c_c, 0.0
                else:  # orders differ more than rules: an order component
                    alpha, beta, omega = c_w, 0.0, c_c - c_w
                basis = _orthonormal(n, 1 + len(all_rules) + 3 + len(runs), rng)
                shared, rule_v = basis[:, 0], dict(zip(all_rules, basis[:, 1:].T))
                order_v = dict(zip(("a", "b", "c"), basis[:, 1 + len(all_rules):].T))
                noise = basis[:, 4 + len(all_rules):].T
                for i, u in enumerate(runs):
                    rule, order = u.params["rule"], u.params["order"]
                    if u.params["arm"] == INIT:
                        x = math.sqrt(0.5) * shared + math.sqrt(0.5) * noise[i]
                    else:
                        g = (1 - alpha - beta - omega) * math.exp(rng.normal(0, SIM_RUN_LOG_SD))
                        x = (math.sqrt(alpha) * shared + math.sqrt(beta) * rule_v[rule] + math.sqrt(omega) * order_v[order]
                             + math.sqrt(max(g, 0.0)) * noise[i])
                    w = np.abs(rng.normal(size=h))
                    layers[u.key].append(np.outer(x, w / np.linalg.norm(w)))  # (n, h), rank one
            layers_by_ckpt[ckpt] = layers
        for u in runs:
            trained = u.params["arm"] != INIT
            acc = float(np.clip(rng.normal(0.92, 0.02), 0, 1)) if trained else 0.1
            m_acc = float(np.clip(target + abs(rng.normal(0, 0.01)), 0, 1))
            snap = lambda ck, a, step: {"step": step, "test_accuracy": a,  # noqa: E731
                                        "hidden": [encode_array(h) for h in layers_by_ckpt[ck][u.key]]}
            out[u.key] = {
                "arm": u.params["arm"], "rule": u.params["rule"], "seed": s, "order": u.params["order"],
                "init_seed": s, "init_file": f"init_sim_seed{s}.safetensors", "train_seed": None, "dataset": "simulated",
                "sizes": sizes, "probe_n": n, "check_n": 450, "match_accuracy": target,
                "total_steps": 1000 if trained else 0, "accuracy_trace": [], "train_seconds": 0.0, "loss_curve": [],
                "test_accuracy": acc, "final": snap("final", acc, 1000 if trained else 0),
                "matched": snap("matched", m_acc, 300) if trained else None,
                "weight_change": [0.5 if trained else 0.0] * (len(sizes) - 1),
                "own_pass_linear_cka": [1.0] * len(config.hidden_sizes),
            }
    return [{"key": u.key, "params": u.params, "result": out[u.key]} for u in the_units]


# --------------------------------------------------------------------------- plots


def plots(config: Config, records: list[dict], analysis: Analysis, out_dir: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    m = analysis.metrics
    rules = m.get("rules", [])
    if len(rules) < 2:
        return []
    all_rules = rules + m.get("extensions", [])
    short = [SHORT.get(r, r) for r in all_rules]
    figs = []

    # 1. the contrast per pair and layer, matched and final, on a log axis
    cells = []
    for r1, r2 in itertools.combinations(all_rules, 2):
        for l in range(m["n_layers"]):
            if f"ratio/matched/{r1}~{r2}/layers.{l}" in m:
                cells.append((f"{SHORT.get(r1, r1)}–{SHORT.get(r2, r2)} L{l}", r1, r2, l))
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(cells) + 1.8))
    for offset, (ckpt, colour) in zip((-0.15, 0.15), (("matched", "C0"), ("final", "C1"))):
        for y, (_, r1, r2, l) in enumerate(cells):
            est, lo, hi = m[f"ratio/{ckpt}/{r1}~{r2}/layers.{l}"]
            if est is None or not np.isfinite(est):
                continue
            ax.plot([lo, hi] if np.isfinite(lo) else [est, est], [y + offset] * 2, color=colour, lw=1.5)
            ax.scatter([est], [y + offset], color=colour, s=14, zorder=3,
                       label=f"{ckpt} (95% t)" if y == 0 else None)
    v = analysis.verdict
    y0 = len(cells) + 0.5
    if v.estimate is not None:
        ax.plot([v.ci_low or v.estimate, v.ci_high or v.estimate], [y0, y0], color="k", lw=2.5)
        ax.scatter([v.estimate], [y0], color="k", s=24, zorder=3)
    ax.axvline(RATIO_THRESHOLD, color="C3", ls="--", lw=1, label=f"threshold {RATIO_THRESHOLD:g}")
    ax.axvline(1.0, color="grey", ls=":", lw=1, label="1 = no rule effect")
    ax.set_xscale("log")
    ax.set_yticks(list(range(len(cells))) + [y0], [c[0] for c in cells] + ["pooled (verdict)"], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"(1 - {config.verdict_measure}) between rules / within rules")
    ax.set_title("Cross-rule over within-rule dissimilarity, per pair and layer", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "ratio_per_pair.png", dpi=150)
    plt.close(fig)
    figs.append(Figure(path="ratio_per_pair.png", caption="The primary contrast per rule pair and hidden layer at matched "
                       "accuracy (blue; the verdict pools the essay's pairs, black) and at the end of training (orange)."))

    # 2. accuracy per rule: final and at the matched checkpoint
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, r in enumerate(all_rules):
        accs = m.get(f"accuracy/{r}_per_seed", [])
        ax.scatter([k - 0.1] * len(accs), accs, color="C0", s=10, label="final" if k == 0 else None)
        ma = m.get(f"accuracy/{r}_matched")
        if ma is not None and np.isfinite(ma):
            ax.scatter([k + 0.1], [ma], color="C1", marker="s", s=18, label="matched checkpoint (mean)" if k == 0 else None)
    ax.axhline(m["match_accuracy"], color="C1", ls="--", lw=0.8)
    ax.set_xticks(range(len(all_rules)), short)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per rule (dots: replicates, order a and b)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=150)
    plt.close(fig)
    figs.append(Figure(path="accuracy.png", caption="Test accuracy per rule at the end of training and at the "
                       "matched-accuracy checkpoint the verdict compares at (dashed: the target)."))

    # 3. rules x rules matrices per measure and layer
    n_l, n_m = m["n_layers"], len(config.measures)
    fig, axes = plt.subplots(n_l, n_m, figsize=(3.2 * n_m, 3.0 * n_l), squeeze=False)
    for i, j in itertools.product(range(n_l), range(n_m)):
        name = config.measures[j]
        ax = axes[i][j]
        mat = np.array([[np.nan if x is None else x for x in row] for row in m[f"matrix/layers.{i}/{name}"]])
        lo_v = max(MEASURES[name].value_range[0], 0.0) if MEASURES[name].kind == "similarity" else 0.0
        im = ax.imshow(mat, vmin=lo_v, vmax=1.0, cmap="viridis")
        for a, b in itertools.product(range(len(all_rules)), repeat=2):
            if np.isfinite(mat[a, b]):
                ax.text(b, a, f"{mat[a, b]:.2f}", ha="center", va="center", fontsize=6,
                        color="k" if (mat[a, b] - lo_v) / (1 - lo_v) > 0.6 else "w")
        ax.set_xticks(range(len(all_rules)), short, fontsize=7)
        ax.set_yticks(range(len(all_rules)), short, fontsize=7)
        ax.set_title(f"{name}, layers.{i}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Rules x rules similarity at matched accuracy (diagonal: same rule and init, other data order)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "similarity_heatmaps.png", dpi=150)
    plt.close(fig)
    figs.append(Figure(path="similarity_heatmaps.png", caption="Hidden-layer similarity between rules (off-diagonal, "
                       "same init and data order) and within each rule (diagonal, same init, other data order)."))
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
    simulate=simulate,
    calibration=Calibration(
        null_effect=RATIO_THRESHOLD,
        alternative_effect=3.0,
        power=0.8,
        effect="true ratio of cross-rule to within-rule dissimilarity (1 - linear CKA)",
        scale="quick",
        overrides={"measures": ("linear_cka",), "probe_size": 40, "hidden_sizes": (4, 2)},
    ),
    scales={
        "quick": {"seeds": 8, "data": "digits", "hidden_sizes": (64, 32), "probe_size": 300, "extensions": ()},
        "paper": {},
    },
    unit_threads=1,  # small MLPs: one thread is fastest and gives the same bits under any executor
)
