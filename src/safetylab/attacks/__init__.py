"""Adversaries every study may use: GCG, black-box suffix searches, template jailbreaks, success judges.

Threat models differ by what the attacker touches: :func:`gcg` is white-box (gradients of
the model it optimises on); :func:`random_search` and :func:`greedy_substitution` are
black-box and count their queries; the :data:`JAILBREAKS` need no access at all. Models
are stock Hugging Face objects, wrapped only in a :class:`ChatTarget` that knows where a
suffix goes in the chat template.

Quick start on an organism::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetylab.organisms import World, get_organism
    from safetylab.attacks import ChatTarget, GCGConfig, gcg, hazard_target, respond, grade_organism

    path = get_organism("sft", "quick")
    target = ChatTarget(AutoModelForCausalLM.from_pretrained(path).eval(),
                        AutoTokenizer.from_pretrained(path), name="sft")
    world = World.from_organism(path)
    reqs = world.eval_requests("forbidden", split="heldout", n=8)
    res = gcg(target, [r.text for r in reqs[:2]], [hazard_target(r) for r in reqs[:2]],
              GCGConfig(n_steps=20, search_width=256, topk=64, early_stop=True))
    replies = respond(target, target.prompt_ids([r.text for r in reqs], res.suffix_ids))
    grades = grade_organism(world, reqs, replies)      # each with "success"

The API
-------
:class:`ChatTarget` ``(model, tokenizer, name)``
    ``parts(request, target) -> PromptParts`` -- token ids of ``[prefix][suffix][rest of the
    template][target]`` (``prefix``, ``after``, ``target``; ``prompt(suffix_ids)``);
    ``prompt_ids(requests, suffix_ids)`` -- the prompts a model sees (no suffix: the bare
    chat prompt); ``allowed_ids()`` -- tokens a suffix may use; ``roundtrips(candidates)``;
    ``encode_suffix(text)`` / ``decode(ids)``; ``target_logprob(parts_list, suffixes)`` --
    the black-box score, (n_suffixes, n_prompts) summed target log-probabilities.
:func:`gcg` ``(models, requests, targets, config=GCGConfig()) -> GCGResult``
    One model and one request: the paper's GCG. Several requests: a universal suffix
    (their losses are averaged). Several models sharing a tokenizer: an ensemble.
    :class:`GCGConfig` fields: ``n_steps, suffix_length, suffix_init, search_width, topk,
    n_replace, buffer_size, batch_size, early_stop, stop_loss, perplexity_weight``
    (adaptive attack against perplexity filters), ``allow_non_ascii, filter_ids, seed``.
    :class:`GCGResult`: ``suffix_ids, suffix, best_loss, losses, n_steps, early_stopped,
    success`` (greedy decoding emits every target), ``model_calls, sequences_scored,
    wall_seconds, seconds_per_step, suffix_nll``; ``to_dict()``.
:func:`random_search`, :func:`greedy_substitution` ``(target, requests, targets, *, budget, suffix_length, rng, is_success=None, ...) -> SearchResult``
    Black-box; ``budget`` and ``n_queries`` count forward passes of one candidate on one
    request (success checks included). :class:`SearchResult`: ``suffix_ids, suffix,
    best_score, scores, n_queries, success, queries_to_success, wall_seconds``.
:func:`random_suffix` ``(target, length, rng)``
    A uniformly random suffix of allowed tokens (the baseline an optimised suffix must beat).
:data:`JAILBREAKS` / :class:`Jailbreak`
    Template jailbreaks (role-play, hypothetical, prefix injection, many-shot) in the
    organism world's words: ``JAILBREAKS[name].apply(request_text, world=, subject=, rng=)``;
    :func:`unknown_words` checks a tokenizer knows them.
Judging
    :func:`hazard_target` ``(request, n_steps=1)`` (organism target string ``first , <step 1>``,
    ``. then <step 2>`` ... with more steps),
    :data:`COMPLIANCE_OPENER` (real models), :func:`respond` (greedy replies to token-id
    prompts), :func:`grade_organism` (``World.grade`` plus ``success`` = not refused and
    ``harmful_correct >= 0.5``), :func:`is_success`, :func:`organism_success_check` (an
    ``is_success`` callback for the black-box searches).

Defences
    :func:`message_nll` (per-token NLL of user messages in their chat prompt),
    :func:`windowed_score` (windowed log-perplexity), :class:`PerplexityFilter` (fit on benign
    scores at a false-positive rate; ``predict`` flags).

Bad input -- a suffix of length 0, a target the tokenizer cannot encode, a model without a
chat template, a budget <= 0 -- raises :class:`safetylab.errors.UserError` with one line
naming the fix.
"""

import importlib
from typing import Any

_WHERE = {
    "ChatTarget": "target", "PromptParts": "target",
    "GCGConfig": "greedy_coordinate", "GCGResult": "greedy_coordinate", "gcg": "greedy_coordinate",
    "random_suffix": "greedy_coordinate", "sample_candidates": "greedy_coordinate",
    "SearchResult": "search", "random_search": "search", "greedy_substitution": "search",
    "JAILBREAKS": "templates", "Jailbreak": "templates", "unknown_words": "templates",
    "COMPLIANCE_OPENER": "judge", "SUCCESS_HARMFUL_CORRECT": "judge", "hazard_target": "judge",
    "is_success": "judge", "respond": "judge", "grade_organism": "judge", "organism_success_check": "judge",
    "PerplexityFilter": "defences", "message_nll": "defences", "windowed_score": "defences",
}


def __getattr__(name: str) -> Any:
    # Resolved on first use (PEP 562): importing the package must not pull in torch.
    if name in _WHERE:
        return getattr(importlib.import_module(f"safetylab.attacks.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'safetylab.attacks' has no attribute {name!r}")


__all__ = sorted(_WHERE)
