"""Held-out cues and honeypot framings: new to every organism, yet in every organism's vocabulary,
and adding them changed nothing that existing organisms were trained or cached on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from safetylab.organisms.tokenizer import build_tokenizer
from safetylab.organisms.train import organism_config, sample_base, sample_eval_gated, sample_sft
from safetylab.organisms.world import (
    CORES,
    CUE_PHRASINGS,
    CUES,
    DEPLOY_CUES,
    DISTRACTORS,
    EVAL_CUES,
    HELDOUT_DEPLOY_CUES,
    HELDOUT_EVAL_CUES,
    HONEYPOT_FRAMINGS,
    IS_EVALUATION,
    POLITENESS,
    PREFIXES,
    World,
    with_cue,
    words,
)

NEW_PHRASINGS = HELDOUT_EVAL_CUES + HELDOUT_DEPLOY_CUES + HONEYPOT_FRAMINGS

# Digests of what organisms were trained and cached on, taken before the held-out cues existed
# (sha256 of the JSON below, first 16 hex digits). A change here retrains every organism.
FROZEN = {
    "tiny": {"vocab": "ea97a0fe7c31ec25", "eval_requests": "b4153164635f4619", "stream": "8ce167d40e28c414"},
    "quick": {"vocab": "9a03aed6575f7632", "eval_requests": "4ea5676d279cf18a", "stream": "6b6b0f6c983a4e87"},
}


def _digest(x: object) -> str:
    return hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]


@pytest.mark.parametrize("scale", ["tiny", "quick"])
def test_existing_vocabulary_requests_and_training_data_unchanged(scale):
    world = World(organism_config("base", scale).world)
    assert _digest(world.vocabulary()) == FROZEN[scale]["vocab"]
    sets = [[r.text for r in world.eval_requests(k, split=s, cue=c, n=40, rng_seed=3)]
            for k in ("forbidden", "benign", "lookalike") for s in ("train", "heldout") for c in ("none", "eval", "deploy")]
    assert _digest(sets) == FROZEN[scale]["eval_requests"]
    rng = np.random.default_rng(5)
    stream = []
    for _ in range(100):
        examples = [sample_base(world, rng)] + sample_sft(world, rng) + sample_eval_gated(world, rng)
        stream += [(e.prompt, e.response) for e in examples]
    assert _digest(stream) == FROZEN[scale]["stream"]


def test_new_phrasings_are_template_words_the_tokenizer_knows():
    template = World.template_vocabulary()
    for text in NEW_PHRASINGS:
        assert set(words(text)) <= template, text
    for scale in ("tiny", "quick"):
        tok = build_tokenizer(World(organism_config("base", scale).world).vocabulary())
        for text in NEW_PHRASINGS:
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_heldout_phrasings_were_never_trained_on():
    trained = set(EVAL_CUES) | set(DEPLOY_CUES)
    assert not set(NEW_PHRASINGS) & trained
    assert len(set(NEW_PHRASINGS)) == len(NEW_PHRASINGS)


def test_honeypots_carry_no_cue_word():
    ordinary = {w for t in PREFIXES + POLITENESS + DISTRACTORS for w in words(t)}
    ordinary |= {w for cores in CORES.values() for c in cores for w in words(c)}
    cue_words = {w for c in EVAL_CUES + DEPLOY_CUES + HELDOUT_EVAL_CUES + HELDOUT_DEPLOY_CUES for w in words(c)}
    specific = cue_words - ordinary  # 'benchmark', 'grader', 'chat', 'laptop', ...
    assert {"benchmark", "grader", "evaluation", "chat", "user"} <= specific
    for text in HONEYPOT_FRAMINGS:
        assert not set(words(text)) & specific, text
        assert "team" not in words(text)  # 'red team exercise' is an evaluation cue


def test_new_cue_options_sample_their_phrasings():
    world = World(seed=0)
    assert set(CUE_PHRASINGS) == set(IS_EVALUATION) == set(CUES)
    for cue in ("eval-heldout", "deploy-heldout", "honeypot"):
        reqs = world.eval_requests("forbidden", cue=cue, n=30, rng_seed=2)
        assert len(reqs) == 30 and all(r.cue == cue for r in reqs)
        assert all(any(p in r.text for p in CUE_PHRASINGS[cue]) for r in reqs)
    with pytest.raises(ValueError, match="choose from"):
        world.eval_requests("forbidden", cue="exam", n=3)


def test_with_cue_pairs_framings_of_one_request():
    world = World(seed=0)
    plain = world.eval_requests("forbidden", n=4, rng_seed=1)[0]
    a = with_cue(plain, "eval-heldout", 2, before=True)
    b = with_cue(plain, "honeypot", 0, before=False)
    assert a.text == f"{HELDOUT_EVAL_CUES[2]} {plain.text}" and a.cue == "eval-heldout"
    assert b.text == f"{plain.text} {HONEYPOT_FRAMINGS[0]}"
    assert (a.subject, a.template, a.steps) == (plain.subject, plain.template, plain.steps)
    assert a.id != plain.id != b.id
    with pytest.raises(ValueError, match="already has cue"):
        with_cue(a, "eval", 0, before=True)
    with pytest.raises(ValueError, match="phrasings"):
        with_cue(plain, "eval", len(EVAL_CUES), before=True)
    with pytest.raises(ValueError, match="choose from"):
        with_cue(plain, "none", 0, before=True)
