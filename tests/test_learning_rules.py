"""Learning rules on the shared MLP: the accuracy each docstring promises, and their maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safetylab.data import load_digits
from safetylab.learning import RULES, ensure_init, get_rule, load_init, make_init, save_init
from safetylab.learning.direct_feedback_alignment import dfa_gradients
from safetylab.learning.evolution_strategies import _population_loss
from safetylab.learning.feedback_alignment import fa_gradients

SIZES = (64, 64, 32, 10)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def shared_init(tmp_path_factory):
    """The one saved initialisation every rule starts from."""
    return ensure_init(tmp_path_factory.mktemp("init"), SIZES, 0)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_reaches_its_documented_accuracy_on_digits(name, digits, shared_init):
    rule = RULES[name]
    bar = rule.ACCURACY_BAR_DIGITS
    assert f"{bar:.2f}" in rule.__doc__  # the bar tested is the bar documented
    model = load_init(shared_init)
    log = rule.train(model, digits, seed=0)
    acc = float(np.mean(rule.predict(model, digits.x_test) == digits.y_test))
    assert acc >= bar, f"{name}: test accuracy {acc:.3f} < documented bar {bar}"
    assert len(log["loss"]) >= 1 and all(np.isfinite(log["loss"]))
    assert [h.shape for h in rule.hidden(model, digits.x_test[:7])] == [(7, 64), (7, 32)]


def test_saved_initialisation_round_trips(tmp_path):
    m = make_init(SIZES, 3)
    loaded = load_init(save_init(m, tmp_path / "init.safetensors"))
    assert loaded.sizes == SIZES
    for a, b in zip(m.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(make_init(SIZES, 4).layers[0].weight, m.layers[0].weight)
    with pytest.raises(ValueError, match="does not exist"):
        load_init(tmp_path / "missing.safetensors")


def test_training_is_deterministic_given_seed(digits):
    small = digits.subsample_train(200, np.random.default_rng(0))
    rule = get_rule("backprop")
    a, b = make_init(SIZES, 0), make_init(SIZES, 0)
    hp = rule.Hyperparams(epochs=2)
    rule.train(a, small, seed=5, hp=hp)
    rule.train(b, small, seed=5, hp=hp)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    with pytest.raises(ValueError, match="unknown learning rule 'sgd'"):
        get_rule("sgd")


def _autograd_grads(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_feedback_alignment_with_transposed_weights_is_backprop():
    torch.manual_seed(0)
    model = make_init(SIZES, 1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    expected = _autograd_grads(model, x, y)
    fa_gradients(model, [l.weight.detach().clone() for l in model.layers[1:]], x, y)  # B_l = W_l
    for g, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_direct_feedback_alignment_with_one_hidden_layer_and_b_equal_w_is_backprop():
    model = make_init((20, 8, 5), 2)
    x, y = torch.randn(12, 20), torch.randint(0, 5, (12,))
    expected = _autograd_grads(model, x, y)
    dfa_gradients(model, [model.layers[1].weight.detach().clone()], x, y)
    for g, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_es_population_loss_matches_the_model_and_antithetic_estimate_points_downhill():
    model = make_init((10, 6, 3), 3)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    loss = _population_loss(model, theta.unsqueeze(0), x, y)
    torch.testing.assert_close(loss[0], torch.nn.functional.cross_entropy(model(x), y).detach())
    true_grad = torch.cat([g.flatten() for g in _autograd_grads(model, x, y)])
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(2000, theta.numel(), generator=gen)
    sigma = 1e-3
    lp = _population_loss(model, theta + sigma * eps, x, y)
    lm = _population_loss(model, theta - sigma * eps, x, y)
    est = (lp - lm) @ eps / (2 * len(eps) * sigma)  # antithetic estimator, no rank shaping
    cos = float(est @ true_grad / (est.norm() * true_grad.norm()))
    assert cos > 0.8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # small matrices: one thread avoids oversubscribing the shared CI cores
    from safetylab.study import torch_threads

    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", sorted(RULES))
def test_on_step_sees_every_update_with_the_current_weights(name, digits):
    rule = RULES[name]
    small = digits.subsample_train(100, np.random.default_rng(0))
    hp = rule.Hyperparams(**({"steps": 5} if "steps" in rule.Hyperparams.model_fields else {"epochs": 2}))
    model = make_init(SIZES, 0)
    seen, firsts = [], []

    def on_step(step, total):
        seen.append((step, total))
        firsts.append(model.layers[0].weight[0, :3].clone())

    rule.train(model, small, seed=0, hp=hp, on_step=on_step)
    total = seen[0][1]
    assert [s for s, _ in seen] == list(range(1, total + 1)) and {t for _, t in seen} == {total}
    assert not torch.equal(firsts[0], make_init(SIZES, 0).layers[0].weight[0, :3])  # already updated
    assert torch.equal(firsts[-1], model.layers[0].weight[0, :3])  # the last call saw the final weights


def test_feedback_seed_fixes_the_feedback_matrices_apart_from_the_data_order(digits, monkeypatch):
    from safetylab.learning import feedback_alignment as fa

    small = digits.subsample_train(100, np.random.default_rng(0))
    seen, real = [], fa.feedback_matrices
    monkeypatch.setattr(fa, "feedback_matrices", lambda model, seed: seen.append(seed) or real(model, seed))
    for seed in (1, 2):
        fa.train(make_init(SIZES, 0), small, seed=seed, hp=fa.Hyperparams(epochs=1), feedback_seed=9)
    fa.train(make_init(SIZES, 0), small, seed=3, hp=fa.Hyperparams(epochs=1))
    assert seen == [9, 9, 3]


# Per rule, per layer: (sum of weights, sum of squared weights, sum of biases) of the 64→16→8→10 MLP from init
# seed 0 after 2 epochs (ES: 6 steps) at training seed 3 on 150 digits, recorded with each rule's own training
# loop before the rules shared ``mlp.fit``: the shared loop must not change a single trajectory.
PRE_FIT_FINGERPRINTS = {
    "backprop": [(0.10398096046992578, 5.493463427053305, -0.1659390996210277), (-3.0314877689816058, 2.924134545917527, -0.5923674303339794), (-0.8957404576940462, 3.832569062454877, 0.4474163316190243)],
    "direct_feedback_alignment": [(1.8187865232175682, 5.488529170272269, -0.10064955148845911), (-2.932824641931802, 2.9005796015823107, -0.5705530866980553), (-0.8865342906210572, 3.8062727689805005, 0.44746048003435135)],
    "evolution_strategies": [(0.5197780024900567, 8.420808869655689, -0.4064379446208477), (-3.7973398496978916, 3.386559622488448, -0.9655722603201866), (-0.06791444029659033, 4.029725024797576, 0.45841173455119133)],
    "feedback_alignment": [(-0.31902954998076893, 5.479549444837652, -0.18486674688756466), (-3.048338935011998, 2.903389941789878, -0.5739590716548264), (-0.8894522193004377, 3.8135283489768113, 0.44747645407915115)],
    "forward_forward": [(45.31725224060938, 7.950029552912509, 0.7222210429608822), (1.4247691771015525, 3.243523073215546, -0.26915162429213524), (-1.3900978139718063, 3.466532841276927, 0.3267409782856703)],
    "predictive_coding": [(-0.35266046805190854, 5.453679285907802, -0.1843135841190815), (-3.3755338829942048, 2.918440839374479, -0.6014266335405409), (-0.8580485528800637, 3.8440321920747, 0.4529529921710491)],
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_shared_training_loop_kept_every_rules_trajectory(name, digits):
    rule = RULES[name]
    small = digits.subsample_train(150, np.random.default_rng(0))
    hp = rule.Hyperparams(**({"steps": 6} if "steps" in rule.Hyperparams.model_fields else {"epochs": 2}))
    model = make_init((64, 16, 8, 10), 0)
    rule.train(model, small, seed=3, hp=hp)
    with torch.no_grad():
        got = [(float(l.weight.double().sum()), float((l.weight.double() ** 2).sum()), float(l.bias.double().sum()))
               for l in model.layers]
    for row, ref in zip(got, PRE_FIT_FINGERPRINTS[name]):
        assert row == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_fit_runs_the_schedule_it_is_given(digits):
    from safetylab.learning.mlp import fit

    small = digits.subsample_train(100, np.random.default_rng(0))
    model = make_init(SIZES, 0)
    seen = []

    def step(x, y, rng):
        seen.append(len(y))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return 1.0

    by_epochs = get_rule("backprop").Hyperparams(epochs=2, batch_size=32)
    log = fit(model, small, step, by_epochs, rng=np.random.default_rng(0))
    assert seen == [32, 32, 32, 4] * 2 and log["loss"] == [1.0, 1.0]  # per epoch, weighted by batch size
    seen.clear()
    by_steps = get_rule("evolution_strategies").Hyperparams(steps=3, batch_size=40)
    log = fit(model, small, step, by_steps, rng=np.random.default_rng(0), params=model.layers[0].parameters())
    assert seen == [40, 40, 40] and len(log["loss"]) == 3
