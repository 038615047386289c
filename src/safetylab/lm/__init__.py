"""Any causal LM: loading, decoder-layer discovery, early-exit truncation, batched
generation, first-token readouts, residual-stream reading and steering hooks, refusal
judges and prompt sets.

>>> from safetylab.lm import load_causal_lm, truncated, generate_at_depths
>>> lm = load_causal_lm("path/to/organism-or-hf-folder")
>>> with truncated(lm.model, 4):          # only the first 4 decoder layers run
...     out = lm.model(**batch)
"""

from safetylab.lm.generate import (
    LayerReadout,
    empty_readout,
    encode_prompts,
    eos_ids,
    first_token_readout,
    generate_at_depths,
    generate_confident,
    greedy_generate,
    pad_id,
)
from safetylab.lm.hooks import check_layers, check_strength, direction_ablation, read_residual, residual_edit, steering
from safetylab.lm.judges import REFUSAL_PHRASES, ClassifierJudge, KeywordJudge, make_judge
from safetylab.lm.layers import DecoderStack, find_decoder_stack, readout_logits
from safetylab.lm.load import LoadedLM, load_causal_lm, source_kind
from safetylab.lm.prompts import load_prompts
from safetylab.lm.truncate import (
    ExitGate,
    check_depth,
    depth_sorted_batch,
    evenly_spread_depths,
    identity_patched,
    softmax_response,
    truncated,
)

__all__ = [
    "ClassifierJudge", "DecoderStack", "ExitGate", "evenly_spread_depths", "KeywordJudge", "LayerReadout", "LoadedLM",
    "REFUSAL_PHRASES", "check_depth", "empty_readout", "depth_sorted_batch", "encode_prompts", "eos_ids", "find_decoder_stack",
    "first_token_readout", "generate_at_depths", "generate_confident", "greedy_generate",
    "identity_patched", "load_causal_lm", "load_prompts", "make_judge", "pad_id", "readout_logits",
    "softmax_response", "source_kind", "truncated",
    "check_layers", "check_strength", "direction_ablation", "read_residual", "residual_edit", "steering",
]
