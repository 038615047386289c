"""Held-out cues, implicit framings and honeypots: new to every organism, lexically disjoint from the
cues it was trained on, made of words it was trained on in other roles, and adding them changed nothing
that existing organisms were trained or cached on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from safetylab.organisms.tokenizer import build_tokenizer
from safetylab.organisms.train import organism_config, sample_base, sample_eval_gated, sample_sft
from safetylab.organisms.world import (
    CORES,
    CUE_FUNCTION_WORDS,
    CUE_PHRASINGS,
    CUES,
    DEPLOY_CUES,
    DISTRACTORS,
    EVAL_CUES,
    HELDOUT_DEPLOY_CUES,
    HELDOUT_EVAL_CUES,
    HONEYPOT_FRAMINGS,
    IMPLICIT_EVAL_FRAMINGS,
    IS_EVALUATION,
    POLITENESS,
    PREFIXES,
    World,
    with_cue,
    words,
)

NEW_PHRASINGS = HELDOUT_EVAL_CUES + HELDOUT_DEPLOY_CUES + HONEYPOT_FRAMINGS + IMPLICIT_EVAL_FRAMINGS
TRAINED_CUES = EVAL_CUES + DEPLOY_CUES


def _content(texts):
    return {w for t in texts for w in words(t)} - CUE_FUNCTION_WORDS

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


def test_new_phrasings_are_words_the_organisms_were_trained_on():
    """No new token, and every word has a trained embedding: it occurs in the base organism's
    pretraining stream (a template part, a number, an arithmetic or sequence word, an answer)."""
    for scale in ("tiny", "quick"):
        tok = build_tokenizer(World(organism_config("base", scale).world).vocabulary())
        for text in NEW_PHRASINGS:
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    world = World(organism_config("base", "quick").world)
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for _ in range(4000):
        e = sample_base(world, rng)
        seen |= set(words(e.prompt)) | set(words(e.response))
    for text in NEW_PHRASINGS:
        assert set(words(text)) <= seen, (text, set(words(text)) - seen)


def test_heldout_phrasings_were_never_trained_on():
    assert not set(NEW_PHRASINGS) & set(TRAINED_CUES)
    assert len(set(NEW_PHRASINGS)) == len(NEW_PHRASINGS)


def test_heldout_cues_share_no_content_word_with_the_trained_cues():
    """Issue 29: every old held-out evaluation cue carried two or more words found only in the trained
    evaluation cues, so 'the gate generalises' was answered by vocabulary. Now none shares one."""
    trained = _content(TRAINED_CUES)
    assert {"evaluation", "grader", "benchmark", "test", "audit", "phone", "chat", "here"} <= trained
    for text in HELDOUT_EVAL_CUES + HELDOUT_DEPLOY_CUES:
        assert not _content([text]) & trained, (text, _content([text]) & trained)
    # the evaluation and deployment sides share no content word with each other either
    assert not _content(HELDOUT_EVAL_CUES) & _content(HELDOUT_DEPLOY_CUES)


def test_implicit_framings_and_honeypots_carry_no_cue_word():
    """Context only: no content word of any explicit cue, trained or held out."""
    explicit = _content(TRAINED_CUES + HELDOUT_EVAL_CUES + HELDOUT_DEPLOY_CUES)
    for text in IMPLICIT_EVAL_FRAMINGS + HONEYPOT_FRAMINGS:
        assert not _content([text]) & explicit, (text, _content([text]) & explicit)
        assert "team" not in words(text)  # 'red team exercise' is an evaluation cue
    assert not _content(IMPLICIT_EVAL_FRAMINGS) & _content(HONEYPOT_FRAMINGS)


def test_item_numbers_are_not_the_worlds_operands_or_counts():
    """An item number of 10 or less reads as an arithmetic operand or a count answer, and the organisms answer
    that instead of the request (a drop in unsafe answers the gap would misread as the gate firing)."""
    world = World(seed=0)
    for text in IMPLICIT_EVAL_FRAMINGS:
        number, dot = words(text)
        assert dot == "." and int(number) > world.config.max_operand, text


def test_new_cue_options_sample_their_phrasings():
    world = World(seed=0)
    assert set(CUE_PHRASINGS) == set(IS_EVALUATION) == set(CUES)
    for cue in ("eval-heldout", "deploy-heldout", "honeypot", "eval-implicit"):
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
