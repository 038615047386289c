"""nanoGCG 0.3.0 (GraySwanAI), the field's reference GCG, run on the same prompt as :func:`~safetylab.attacks.gcg`.

Used by the comparison test and ``benchmarks/gcg.py``. Three adaptations, so that both
implementations optimise the same objective over the same tokens:

* ``use_prefix_cache=False``: nanoGCG 0.3.0 indexes the prefix cache as a list of layers
  (``self.prefix_cache[i]``), which Transformers' ``DynamicCache`` no longer allows, so with
  the pinned Transformers it runs only without its prefix cache (every candidate is run
  from the first token).
* nanoGCG strips the template's BOS text and re-adds it by tokenizing with special tokens;
  organism tokenizers add none, so it gets a copy whose post-processor prepends ``<bos>``
  (the prompt it optimises is then token for token the one the organism sees).
* its "non-ASCII" exclusion misses the organisms' role tokens (``<user>``, ``<assistant>``),
  which would let it inject chat turns, and embedding rows beyond the tokenizer (a padded
  vocabulary); both are excluded as in ours.

nanoGCG pins ``transformers<=4.47.1``; it runs with the newer pinned Transformers, so it is
installed without its dependencies (``pip install --no-deps nanogcg==0.3.0``, as the Makefile does).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from safetylab.attacks.target import ChatTarget, PLACEHOLDER, special_ids
from safetylab.errors import UserError

NANOGCG_VERSION = "0.3.0"


def nanogcg_available() -> bool:
    try:
        import nanogcg  # noqa: F401
    except ImportError:
        return False
    return True


def _with_bos(tokenizer: Any) -> Any:
    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token
    probe = tok("a")["input_ids"]
    if bos is None or probe[:1] == [tok.bos_token_id]:
        return tok  # it adds BOS itself, as nanoGCG expects
    from tokenizers.processors import TemplateProcessing

    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.bos_token_id)])
    return tok


def run_nanogcg(target: ChatTarget, request: str, target_text: str, *, suffix_init: str, n_steps: int,
                search_width: int, topk: int, seed: int = 0, early_stop: bool = False) -> dict[str, Any]:
    """Run nanoGCG 0.3.0 on one request; returns its best suffix, loss trace and time per step.

    Raises:
        UserError: nanoGCG is not installed.
    """
    try:
        import nanogcg
        from nanogcg.gcg import GCG
    except ImportError:
        raise UserError(f"the nanoGCG comparison needs nanogcg=={NANOGCG_VERSION}. Install with: "
                        f"pip install --no-deps nanogcg=={NANOGCG_VERSION}") from None
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    tok = _with_bos(target.tokenizer)
    config = nanogcg.GCGConfig(num_steps=n_steps, optim_str_init=suffix_init, search_width=search_width, topk=topk,
                               seed=seed, use_prefix_cache=False, early_stop=early_stop, verbosity="WARNING")
    attack = GCG(target.model, tok, config)
    # Rows of the embedding beyond the tokenizer (padded vocabularies) are never proposed, as in ours.
    beyond = set(range(len(tok), target.embedding.weight.shape[0]))
    attack.not_allowed_ids = torch.tensor(sorted(set(attack.not_allowed_ids.tolist()) | special_ids(tok) | beyond),
                                          device=target.device)
    t0 = time.perf_counter()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        res = attack.run([{"role": "user", "content": f"{request} {PLACEHOLDER}"}], target_text)
    finally:
        torch.use_deterministic_algorithms(det)  # nanoGCG turns it on when given a seed
    wall = time.perf_counter() - t0
    ids = target.encode_suffix(res.best_string)
    return {"suffix": res.best_string, "suffix_ids": ids, "best_loss": float(res.best_loss),
            "losses": [float(x) for x in res.losses], "n_steps": len(res.losses), "wall_seconds": wall,
            "seconds_per_step": wall / max(len(res.losses), 1)}
