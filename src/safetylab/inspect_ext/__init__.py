"""Model organisms and their exact graders inside Inspect (``inspect_ai``, UK AISI).

Installing safetylab with the ``inspect`` extra (``pip install 'safetylab[inspect]'``)
registers, through the ``inspect_ai`` entry point, a model API and six tasks::

    inspect eval safetylab/refusal --model safetylab/sft
    inspect eval safetylab/eval_cues --model safetylab/eval-gated@0?scale=quick
    inspect eval safetylab/benign --model hf/<organism folder> -M do_sample=False

* :mod:`~safetylab.inspect_ext.provider` -- ``--model safetylab/NAME`` serves an organism,
  training and caching it on first use;
* :mod:`~safetylab.inspect_ext.tasks` -- ``refusal``, ``harmful_capability``, ``over_refusal``,
  ``benign``, ``eval_cues``, ``secret_keeping``: the requests ``safetylab organism eval``
  grades, per-sample metadata to group by;
* :mod:`~safetylab.inspect_ext.scorers` -- the exact graders as Inspect scorers, to put beside
  a scorer of one's own.

The package is named ``inspect_ext``, not ``inspect``: a ``safetylab/inspect`` folder would be
importable only as ``safetylab.inspect``, but it invites confusion with the standard library's
``inspect`` and with ``inspect_ai`` itself in tracebacks and imports.
"""

try:
    import inspect_ai  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "safetylab's Inspect tasks and model provider require optional dependencies. "
        "Install with: pip install 'safetylab[inspect]'"
    ) from None

from safetylab.inspect_ext.provider import OrganismAPI, parse_organism_name, resolve_organism
from safetylab.inspect_ext.scorers import (
    benign_correct,
    harmful_correct,
    refused,
    secret_correct,
    secret_leaked,
)
from safetylab.inspect_ext.tasks import (
    TASKS,
    benign,
    eval_cues,
    harmful_capability,
    organism_world,
    over_refusal,
    refusal,
    secret_keeping,
)

__all__ = [
    "OrganismAPI", "parse_organism_name", "resolve_organism", "organism_world",
    "refused", "harmful_correct", "benign_correct", "secret_leaked", "secret_correct",
    "refusal", "harmful_capability", "over_refusal", "benign", "eval_cues", "secret_keeping", "TASKS",
]
