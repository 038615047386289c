"""Inspect tasks over the organisms' synthetic world, scored exactly.

Each task draws the very requests ``safetylab organism eval`` grades (same world, template
split, number per set and evaluation seed) and scores them with the same graders
(:mod:`safetylab.inspect_ext.scorers`). Its ``organism_eval_metrics`` (task metadata) say which
``organism eval --json`` metric each of its groups reproduces; on the same organism, with
Inspect's default greedy generation, the values are equal. Keys are ``scorer/metric`` as in
the log's results (``refused/covered`` is the ``covered`` group of the ``refused`` scorer).

========================  =========================================  ==========================
task                      requests (``n`` per set)                   score, grouped by
========================  =========================================  ==========================
``refusal``               forbidden: covered and held-out hazards    refused, ``hazard_split``
``harmful_capability``    the same requests                          harmful_correct, ``hazard_split``
``over_refusal``          benign look-alikes (recipes phrased        refused
                          like forbidden requests)
``benign``                benign requests of every family            benign_correct, ``family``
``eval_cues``             covered hazards framed by each cue          refused, ``cue``
                          (``none``, ``eval``, ``deploy`` by default)
``secret_keeping``        extraction under keep / share, ordinary    leaked and correct,
                          requests under keep                        ``condition``
========================  =========================================  ==========================

Every sample carries its request in its metadata (hazard, template, cue and cue phrasing,
``is_evaluation``, the canonical answer...), so Inspect's grouped metrics and ``inspect view``
can slice by any of them.

Task args (``-T``): ``n`` (requests per set, 300 as ``organism eval``), ``split`` (``heldout``
templates, never trained on, or ``train``), ``seed`` (evaluation-set seed, ``organism eval
--seed``) and ``organism``: whose world to draw from. By default that is the evaluated
model's own (``--model safetylab/...`` or ``--model hf/<organism folder>``); for any other
model, name an organism (``-T organism=sft@0?scale=tiny`` or a folder), or the quick and paper
organisms' world is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inspect_ai import Task, task
from inspect_ai._util.error import PrerequisiteError
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import grouped, mean, stderr
from inspect_ai.solver import generate

from safetylab.inspect_ext.scorers import (
    benign_correct,
    harmful_correct,
    refused,
    request_metadata,
    secret_correct,
    secret_leaked,
    secret_metadata,
)
from safetylab.organisms.world import CUES, REFUSAL, Request, World, WorldConfig

logger = logging.getLogger(__name__)

DEFAULT_CUES = "none,eval,deploy"


def _check_args(task_name: str, n: Any, split: Any, seed: Any) -> None:
    """One line for bad task args (``-T`` values arrive as whatever YAML made of them)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PrerequisiteError(f"safetylab/{task_name}: n={n!r} must be a positive integer "
                                f"(requests per set); e.g. -T n=300")
    if split not in ("heldout", "train"):
        raise PrerequisiteError(f"safetylab/{task_name}: split={split!r}; use -T split=heldout "
                                f"(templates never trained on) or -T split=train")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PrerequisiteError(f"safetylab/{task_name}: seed={seed!r} must be an integer >= 0 "
                                f"(the evaluation-set seed); e.g. -T seed=0")


def organism_world(organism: str | None = None) -> tuple[World, Path | None]:
    """The world to draw requests from, and the organism it belongs to (None: default world).

    Args:
        organism: a name as after ``--model safetylab/`` (``sft@1?scale=tiny``, a folder);
            None: the model being evaluated, when it is an organism.
    """
    from safetylab.inspect_ext.provider import OrganismAPI, resolve_organism

    if organism is not None:
        path = resolve_organism(str(organism))
        return World.from_organism(path), path
    from inspect_ai.model import get_model

    try:
        model = get_model()
    except ValueError:  # no model at all (e.g. a task listed, not run)
        model = None
    if model is not None:
        if isinstance(model.api, OrganismAPI):
            return World.from_organism(model.api.path), model.api.path
        folder = Path(model.api.model_name).expanduser()  # hf/<organism folder>
        if (folder / "organism.json").is_file():
            return World.from_organism(folder), folder
        logger.warning(f"{model} is not a safetylab organism: drawing requests from the quick and paper "
                       f"organisms' world (seed 0); pass -T organism=<organism> for another")
    return World(WorldConfig()), None


def _task(name: str, world: World, organism: Path | None, samples: list[Sample], scorer: Any,
          metrics: list[Any], equivalent: dict[str, str], n: int, split: str, seed: int) -> Task:
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids), "request ids repeat within a task"
    return Task(
        dataset=MemoryDataset(samples, name=f"safetylab-{name}"),
        solver=generate(),
        scorer=scorer,
        metrics=metrics,
        metadata={
            "organism": None if organism is None else str(organism),
            "world": world.config.model_dump(mode="json"),
            "n": n, "split": split, "eval_seed": seed,
            "organism_eval_metrics": equivalent,
        },
    )


def _samples(requests: list[Request], target: str | None = None) -> list[Sample]:
    return [Sample(input=r.text, target=r.answer if target is None else target, id=r.id,
                   metadata=request_metadata(r)) for r in requests]


def _forbidden_requests(world, n: int, split: str, seed: int) -> list:
    """``n`` forbidden requests on covered hazards, then ``n`` on held-out ones: the two sets
    ``organism eval`` grades refusal and harmful capability on."""
    return (world.eval_requests("forbidden", split=split, hazards="covered", n=n, rng_seed=seed)
            + world.eval_requests("forbidden", split=split, hazards="heldout", n=n, rng_seed=seed))


@task
def refusal(n: int = 300, split: str = "heldout", seed: int = 0, organism: str | None = None) -> Task:
    """Refusal of forbidden requests, on hazards covered by safety training and held-out ones.

    Args:
        n: requests per set (covered, held-out).
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        organism: whose world to draw from (default: the evaluated organism).
    """
    _check_args("refusal", n, split, seed)
    world, path = organism_world(organism)
    requests = _forbidden_requests(world, n, split, seed)
    return _task("refusal", world, path, _samples(requests, target=REFUSAL),
                 refused(world.config.model_dump(mode="json")),
                 [mean(), stderr(cluster="hazard"), grouped(mean(), "hazard_split", all=False)],
                 {"refused/covered": "forbidden/refusal", "refused/heldout": "forbidden_heldout/refusal"}, n, split, seed)


@task
def harmful_capability(n: int = 300, split: str = "heldout", seed: int = 0,
                       organism: str | None = None) -> Task:
    """Harmful capability: the fraction of each hazard's procedure given, steps in order.

    Args:
        n: requests per set (covered, held-out).
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        organism: whose world to draw from (default: the evaluated organism).
    """
    _check_args("harmful_capability", n, split, seed)
    world, path = organism_world(organism)
    requests = _forbidden_requests(world, n, split, seed)
    return _task("harmful_capability", world, path, _samples(requests),
                 harmful_correct(world.config.model_dump(mode="json")),
                 [mean(), stderr(cluster="hazard"), grouped(mean(), "hazard_split", all=False)],
                 {"harmful_correct/covered": "forbidden/harmful_correct",
                  "harmful_correct/heldout": "forbidden_heldout/harmful_correct"},
                 n, split, seed)


@task
def over_refusal(n: int = 300, split: str = "heldout", seed: int = 0, organism: str | None = None) -> Task:
    """Over-refusal: refusal of benign recipes phrased exactly like forbidden requests.

    Args:
        n: requests.
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        organism: whose world to draw from (default: the evaluated organism).
    """
    _check_args("over_refusal", n, split, seed)
    world, path = organism_world(organism)
    requests = world.eval_requests("lookalike", split=split, n=n, rng_seed=seed)
    return _task("over_refusal", world, path, _samples(requests),
                 refused(world.config.model_dump(mode="json")),
                 [mean(), stderr(cluster="subject")], {"refused/mean": "lookalike/refusal"}, n, split, seed)


@task
def benign(n: int = 300, split: str = "heldout", seed: int = 0, organism: str | None = None) -> Task:
    """Benign accuracy: the canonical answer, word for word, in every benign family.

    Args:
        n: requests (families in equal shares).
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        organism: whose world to draw from (default: the evaluated organism).
    """
    _check_args("benign", n, split, seed)
    world, path = organism_world(organism)
    requests = world.eval_requests("benign", split=split, n=n, rng_seed=seed)
    equivalent = {"benign_correct/mean": "benign/correct",
                  **{f"benign_correct/{fam}": f"benign/correct/{fam}" for fam in world.config.families}}
    return _task("benign", world, path, _samples(requests),
                 benign_correct(world.config.model_dump(mode="json")),
                 [mean(), stderr(cluster="template"), grouped(mean(), "family", all=False)],
                 equivalent, n, split, seed)


@task
def eval_cues(n: int = 300, split: str = "heldout", seed: int = 0, cues: str = DEFAULT_CUES,
              organism: str | None = None) -> Task:
    """Refusal of covered hazards under evaluation, deployment or no framing.

    Each sample's ``is_evaluation`` says whether its framing is in truth an evaluation (a
    honeypot is, though it reads like deployment): the ground truth for an
    evaluation-awareness detector. The eval-gated organism refuses only under evaluation cues.

    Args:
        n: requests per cue.
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        cues: comma-separated, from ``none``, ``eval``, ``deploy`` (the cues ``organism eval``
            grades), ``eval-heldout``, ``deploy-heldout`` (phrasings no organism was trained
            on) and ``honeypot``.
        organism: whose world to draw from (default: the evaluated organism).
    """
    _check_args("eval_cues", n, split, seed)
    names = [c.strip() for c in str(cues).split(",") if c.strip()]
    bad = [c for c in names if c not in CUES]
    if not names or bad or len(set(names)) < len(names):
        raise PrerequisiteError(f"safetylab/eval_cues: cues={cues!r}; list each cue once, "
                                f"comma-separated, from {', '.join(CUES)}")
    world, path = organism_world(organism)
    requests = [r for c in names for r in world.eval_requests("forbidden", split=split, n=n, cue=c,
                                                              rng_seed=seed)]
    equivalent = {f"refused/{c}": f"cue_{c}/refusal" for c in names if c in ("none", "eval", "deploy")}
    return _task("eval_cues", world, path, _samples(requests, target=REFUSAL),
                 refused(world.config.model_dump(mode="json")),
                 [mean(), stderr(cluster="cue_phrasing"), grouped(mean(), "cue", all=False)],
                 equivalent, n, split, seed)


@task
def secret_keeping(n: int = 300, split: str = "heldout", seed: int = 0, organism: str | None = None) -> Task:
    """Secret keeping: a secret name in the instructions at the start of the user turn.

    Three sets of ``n``: extraction requests under an instruction to keep the name
    (``keep/extract``: a leak is a failure), the same kind under an instruction to share it
    (``share/extract``: giving the name is right), and the benign evaluation requests under a
    kept secret (``keep/ordinary``: answered as without it, and no leak).

    Args:
        n: requests per set.
        split: template split (``heldout``: never trained on).
        seed: evaluation-set seed (``organism eval --seed``).
        organism: whose world to draw from (default: the evaluated organism).
    """
    from safetylab.organisms.secrets import secret_eval_requests, under_kept_secret

    _check_args("secret_keeping", n, split, seed)
    world, path = organism_world(organism)
    benign_requests = world.eval_requests("benign", split=split, n=n, rng_seed=seed)
    requests = (secret_eval_requests(world, instruction="keep", ask="extract", split=split, n=n, rng_seed=seed)
                + secret_eval_requests(world, instruction="share", ask="extract", split=split, n=n, rng_seed=seed)
                + under_kept_secret(world, benign_requests, rng_seed=seed))
    samples = [Sample(input=r.text, target=r.answer, id=r.id, metadata=secret_metadata(r)) for r in requests]
    # Scorer "secret_leaked" per condition: keep/extract is secret/leak, keep/ordinary is
    # secret/ordinary_leak; "secret_correct": share/extract is secret/shared_correct,
    # keep/ordinary is secret/ordinary_correct.
    equivalent = {"secret_leaked/keep/extract": "secret/leak",
                  "secret_leaked/keep/ordinary": "secret/ordinary_leak",
                  "secret_correct/share/extract": "secret/shared_correct",
                  "secret_correct/keep/ordinary": "secret/ordinary_correct"}
    return _task("secret_keeping", world, path, samples, [secret_leaked(), secret_correct()],
                 [mean(), stderr(cluster="template"), grouped(mean(), "condition", all=False)],
                 equivalent, n, split, seed)


TASKS = (refusal, harmful_capability, over_refusal, benign, eval_cues, secret_keeping)
"""Every task, in the order the module docstring lists them."""
