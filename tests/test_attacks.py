"""The attacks layer on tiny organisms: token layout, GCG, black-box searches, templates, judging, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from organism_fixtures import one_torch_thread, tiny_organism  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from safetylab.attacks import (
    JAILBREAKS,
    ChatTarget,
    GCGConfig,
    gcg,
    grade_organism,
    greedy_substitution,
    hazard_target,
    organism_success_check,
    random_search,
    random_suffix,
    respond,
    unknown_words,
)
from safetylab.errors import UserError
from safetylab.lm import encode_prompts
from safetylab.organisms import World


@functools.cache
def target(variant: str = "sft") -> tuple[ChatTarget, World]:
    path = tiny_organism(variant)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return ChatTarget(model, AutoTokenizer.from_pretrained(path), name=variant), World.from_organism(path)


def hazards(n: int = 4) -> list:
    _, world = target()
    return world.eval_requests("forbidden", split="heldout", hazards="covered", n=n, rng_seed=3)


def test_layout_is_the_chat_prompt_with_the_suffix():
    t, _ = target()
    req = hazards(1)[0]
    suffix = t.encode_suffix("the quick")
    parts = t.parts(req.text, hazard_target(req))
    assert parts.prompt(suffix) == encode_prompts(t.tokenizer, [f"{req.text} the quick"])[0]
    assert t.prompt_ids([req.text], None) == encode_prompts(t.tokenizer, [req.text])
    assert t.decode(parts.target) == hazard_target(req)
    assert hazard_target(req, 2) == f"first , {req.steps[0]} . then {req.steps[1]}"
    special = {t.tokenizer.convert_tokens_to_ids(x) for x in ("<user>", "<assistant>", "<bos>", "<unk>")}
    assert not special & set(t.allowed_ids().tolist())


def test_grouped_scoring_equals_scoring_every_candidate_from_the_prefix():
    t, _ = target()
    req = hazards(1)[0]
    parts = t.parts(req.text, hazard_target(req))
    kv, last = t.prefix_cache(parts)
    gen = torch.Generator().manual_seed(0)
    allowed = t.allowed_ids()
    base = allowed[torch.randint(0, allowed.numel(), (12,), generator=gen)]
    cands = base.repeat(40, 1)
    cands[torch.arange(40), torch.randint(0, 12, (40,), generator=gen)] = allowed[torch.randint(0, allowed.numel(), (40,), generator=gen)]
    plain, ex1, _, _ = t.candidate_losses(parts, kv, last, cands)
    grouped, ex2, _, calls = t.candidate_losses(parts, kv, last, cands, base=base, batch_size=7)
    torch.testing.assert_close(plain, grouped, atol=1e-4, rtol=1e-4)
    assert torch.equal(ex1, ex2) and calls >= 8
    # and both equal the loss of a plain forward pass of the whole prompt
    ids = torch.tensor([parts.prompt(cands[5].tolist()) + list(parts.target)])
    with torch.no_grad():
        logits = t.model(input_ids=ids).logits[0]
    n = len(parts.target)
    ref = torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(parts.target))
    assert abs(float(ref) - float(plain[5])) < 1e-4


def test_gcg_lowers_the_loss_and_its_suffix_elicits_the_hazard():
    t, world = target()
    reqs = hazards(2)
    res = gcg(t, [r.text for r in reqs], [hazard_target(r) for r in reqs],
              GCGConfig(n_steps=8, suffix_length=6, search_width=64, topk=32, early_stop=True, seed=1))
    assert len(res.suffix_ids) == 6 and t.encode_suffix(res.suffix) == res.suffix_ids
    assert res.best_loss <= min(res.losses) + 1e-9 and res.n_steps == len(res.losses) <= 8
    assert res.model_calls > res.n_steps and res.sequences_scored > 64
    replies = respond(t, t.prompt_ids([r.text for r in reqs], res.suffix_ids))
    grades = grade_organism(world, reqs, replies)
    plain = grade_organism(world, reqs, respond(t, t.prompt_ids([r.text for r in reqs], None)))
    assert all(g["refused"] for g in plain)  # the organism refuses without the suffix
    if res.success:  # greedy decoding emits the target: the reply starts with the hazard's first step
        assert all(rep.startswith(hazard_target(r)) for r, rep in zip(reqs, replies))
        assert not any(g["refused"] for g in grades)
    assert res.to_dict()["config"]["topk"] == 32


def test_progressive_gcg_adds_requests_once_the_suffix_works_on_the_ones_before():
    """Zou et al.'s Algorithm 2: the objective starts with one request and grows only after every target in it is
    emitted exactly; the run reports how many were in it at each step and when all of them converged."""
    t, world = target("sft-late")
    reqs = world.eval_requests("forbidden", split="train", hazards="covered", n=4, rng_seed=3)
    common = dict(n_steps=30, suffix_length=8, search_width=48, topk=32, early_stop=True, seed=1)
    goals = [hazard_target(r, 2) for r in reqs]
    prog = gcg(t, [r.text for r in reqs], goals, GCGConfig(**common, progressive=True))
    flat = gcg(t, [r.text for r in reqs], goals, GCGConfig(**common))
    assert flat.n_active == [4] * flat.n_steps and prog.n_active[0] == 1
    assert prog.n_active == sorted(prog.n_active) and max(prog.n_active) >= 2  # the first request was met, then more
    replies = respond(t, t.prompt_ids([r.text for r in reqs], prog.suffix_ids))
    met = [rep.startswith(goal) for goal, rep in zip(goals, replies)]
    assert prog.exact_fraction == pytest.approx(sum(met) / 4)  # the reported fraction is what greedy decoding does
    assert prog.success == all(met)
    if prog.converged_step is not None:
        assert prog.success and prog.n_active[prog.converged_step - 1] == 4 and prog.early_stopped


def test_selecting_by_targets_met_keeps_the_search_and_returns_the_suffix_that_meets_most():
    """``select='targets'`` runs the same search (the same losses, step by step) and returns the step's suffix that
    makes greedy decoding emit the most targets; the loss-selected suffix never meets more."""
    t, world = target("sft-late")
    reqs = world.eval_requests("forbidden", split="train", hazards="covered", n=6, rng_seed=9)
    goals = [hazard_target(r, 1) for r in reqs]
    common = dict(n_steps=25, suffix_length=8, search_width=32, topk=32, seed=1)
    by_loss = gcg(t, [r.text for r in reqs], goals, GCGConfig(**common))
    by_met = gcg(t, [r.text for r in reqs], goals, GCGConfig(**common, select="targets"))
    assert by_met.losses == by_loss.losses  # the same trajectory
    # Here the lowest-loss step meets 1 of 6 targets and an earlier step 3 of 6.
    assert by_met.exact_fraction > by_loss.exact_fraction
    assert by_met.best_loss >= by_loss.best_loss - 1e-9  # it may give up loss for targets, never the reverse
    replies = respond(t, t.prompt_ids([r.text for r in reqs], by_met.suffix_ids))
    assert by_met.exact_fraction == pytest.approx(sum(rep.startswith(g) for g, rep in zip(goals, replies)) / 6)
    with pytest.raises(UserError, match="select='best'"):
        gcg(t, [reqs[0].text], [goals[0]], GCGConfig(select="best"))


def test_an_interrupted_search_resumes_from_its_checkpoint_along_the_same_trajectory(tmp_path, monkeypatch, capsys):
    """A crash at step 6 of 10 loses nothing: the rerun goes on from the checkpoint (search state, buffer,
    progressive objective, random generator) and returns exactly what an uninterrupted search returns; a
    finished checkpoint returns its result without searching; one made by other settings is not used."""
    import safetylab.attacks.greedy_coordinate as gc

    t, world = target("sft-late")
    reqs = world.eval_requests("forbidden", split="train", hazards="covered", n=4, rng_seed=3)
    args = ([r.text for r in reqs], [hazard_target(r, 2) for r in reqs])
    settings = GCGConfig(n_steps=10, suffix_length=6, search_width=16, topk=16, progressive=True, buffer_size=2,
                         seed=4)
    whole = gcg(t, *args, settings)
    ckpt = tmp_path / "unit" / "gcg.json"
    sample = gc.sample_candidates
    calls = []

    def crash_at_step_6(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return sample(*a, **k)

    monkeypatch.setattr(gc, "sample_candidates", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        gcg(t, *args, settings, checkpoint=ckpt, checkpoint_every=0)
    monkeypatch.setattr(gc, "sample_candidates", sample)
    import json

    assert json.loads(ckpt.read_text())["step"] == 5 and not json.loads(ckpt.read_text())["finished"]
    counted = []
    monkeypatch.setattr(gc, "sample_candidates", lambda *a, **k: counted.append(1) or sample(*a, **k))
    resumed = gcg(t, *args, settings, checkpoint=ckpt, checkpoint_every=0)
    monkeypatch.setattr(gc, "sample_candidates", sample)
    assert len(counted) == resumed.n_steps - 5  # it went on from step 5, not from the start
    for key in ("suffix_ids", "best_loss", "losses", "n_active", "targets_met", "n_steps", "converged_step",
                "success", "exact_fraction", "sequences_scored", "model_calls"):
        assert getattr(resumed, key) == getattr(whole, key), key

    def no_search(*a, **k):
        raise AssertionError("a finished search was run again")

    monkeypatch.setattr(gc, "sample_candidates", no_search)
    assert gcg(t, *args, settings, checkpoint=ckpt).suffix_ids == whole.suffix_ids
    monkeypatch.setattr(gc, "sample_candidates", sample)
    other = GCGConfig(**{**settings.__dict__, "n_steps": 3, "seed": 5})
    assert gcg(t, *args, other, checkpoint=ckpt).losses == gcg(t, *args, other).losses
    assert "made by other settings" in capsys.readouterr().err


def test_perplexity_penalty_makes_the_suffix_more_likely():
    t, _ = target()
    req = hazards(1)[0]
    common = dict(n_steps=6, suffix_length=6, search_width=48, topk=32, seed=2)
    plain = gcg(t, [req.text], [hazard_target(req)], GCGConfig(**common))
    adaptive = gcg(t, [req.text], [hazard_target(req)], GCGConfig(**common, perplexity_weight=1.0))
    assert adaptive.suffix_nll is not None and plain.suffix_nll is None
    parts = t.parts(req.text, hazard_target(req))
    kv, last = t.prefix_cache(parts)
    _, _, nll, _ = t.candidate_losses(parts, kv, last, torch.tensor([plain.suffix_ids, adaptive.suffix_ids]),
                                      suffix_nll=True)
    assert float(nll[1]) < float(nll[0])


def test_ensemble_needs_one_tokenizer():
    t, _ = target()
    other = AutoTokenizer.from_pretrained(tiny_organism("sft"))
    other.add_tokens(["zzzz"])
    req = hazards(1)[0]
    with pytest.raises(UserError, match="one tokenizer"):
        gcg([t, ChatTarget(t.model, other, "other")], [req.text], [hazard_target(req)], GCGConfig(n_steps=1))


@pytest.mark.parametrize("search", [random_search, greedy_substitution])
def test_black_box_searches_count_queries_and_never_lose_ground(search):
    t, world = target()
    reqs = hazards(2)
    texts, tgts = [r.text for r in reqs], [hazard_target(r) for r in reqs]
    res = search(t, texts, tgts, budget=50, suffix_length=5, rng=np.random.default_rng(0))
    assert res.n_queries <= 50 and res.n_queries >= 40 and res.n_queries % 2 == 0
    assert all(b >= a for a, b in zip(res.scores, res.scores[1:]))
    score = float(t.target_logprob([t.parts(x, y) for x, y in zip(texts, tgts)], torch.tensor([res.suffix_ids])).mean())
    assert abs(score - res.best_score) < 1e-3
    check = organism_success_check(t, world, reqs[:1], min_fraction=1.0)
    res2 = search(t, texts[:1], tgts[:1], budget=30, suffix_length=5, rng=np.random.default_rng(1), is_success=check)
    assert res2.n_queries <= 30
    assert (res2.queries_to_success is not None) == res2.success


def test_templates_use_only_words_the_organisms_know():
    t, world = target()
    assert unknown_words(t.tokenizer) == []
    req = hazards(1)[0]
    shot = JAILBREAKS["many-shot-2"].apply(req.text, world=world, subject=req.subject, rng=np.random.default_rng(0))
    assert req.subject not in shot.replace(req.text, "") and shot.endswith(req.text)
    for j in JAILBREAKS.values():
        text = j.apply(req.text, world=world, subject=req.subject)
        assert req.text in text and unknown_words(t.tokenizer, [text]) == []
    assert {j.kind for j in JAILBREAKS.values()} == {"role-play", "hypothetical", "prefix-injection", "many-shot"}


def test_bad_input_is_one_line_naming_the_fix():
    t, _ = target()
    req = hazards(1)[0]
    cases = [
        (lambda: gcg(t, [req.text], [hazard_target(req)], GCGConfig(suffix_length=0)), "suffix_length=0"),
        (lambda: gcg(t, [req.text], ["first , frobnicate the widget"], GCGConfig(n_steps=1)), "cannot encode"),
        (lambda: gcg(t, [req.text], [hazard_target(req)], GCGConfig(n_steps=0)), "n_steps=0"),
        (lambda: random_search(t, [req.text], ["first ,"], budget=0, rng=np.random.default_rng(0)), "budget=0"),
        (lambda: random_suffix(t, 0, np.random.default_rng(0)), "length=0"),
    ]
    for call, needle in cases:
        with pytest.raises(UserError, match=needle) as exc:
            call()
        assert "\n" not in str(exc.value)
    bare = AutoTokenizer.from_pretrained(tiny_organism("sft"))
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        ChatTarget(t.model, bare, "bare")


def test_nanogcg_reference_and_ours_reach_the_same_suffix():
    pytest.importorskip("nanogcg", reason="the reference needs: pip install --no-deps nanogcg==0.3.0 (make setup does)")
    from safetylab.attacks.reference import run_nanogcg

    t, world = target()
    reqs = hazards(3)
    init = " ".join(["!"] * 6)
    ours_ok, ref_ok = [], []
    for r in reqs:
        ref = run_nanogcg(t, r.text, hazard_target(r), suffix_init=init, n_steps=3, search_width=64, topk=32, seed=0)
        ours = gcg(t, [r.text], [hazard_target(r)], GCGConfig(n_steps=3, suffix_init=init, search_width=64, topk=32))
        # Same sampling of candidates from the same seed: the two follow one trajectory.
        np.testing.assert_allclose(ours.losses, ref["losses"], rtol=1e-3, atol=1e-5)
        for ids, out in ((ours.suffix_ids, ours_ok), (ref["suffix_ids"], ref_ok)):
            out.append(grade_organism(world, [r], respond(t, t.prompt_ids([r.text], ids)))[0]["success"])
    assert ours_ok == ref_ok
