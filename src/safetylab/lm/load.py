"""Load a causal LM and its tokenizer from an organism folder, a local Hugging Face
folder, or a hub id.

Stock Hugging Face objects come back, never wrapped (STYLE.md 11). Weights load from
safetensors; pickle-based ``*.bin`` checkpoints are refused unless the caller opts in,
and ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

SourceKind = Literal["organism", "local", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class LoadedLM:
    """A model, its tokenizer, and where they came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    """What the user passed (folder or hub id)."""
    kind: SourceKind
    """``organism`` (a safetylab organism folder), ``local`` or ``hub``."""

    @property
    def organism_path(self) -> Path | None:
        """The organism folder, when the model is one (its World can be rebuilt)."""
        return Path(self.source) if self.kind == "organism" else None


def source_kind(source: str | Path) -> SourceKind:
    """Classify a model source.

    Raises:
        ValueError: a path that does not exist or holds no model, or a malformed hub id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "organism.json").is_file():
            return "organism"
        if (path / "config.json").is_file():
            return "local"
        raise ValueError(
            f"model folder {str(source)!r} has no config.json; pass a folder written by "
            f"save_pretrained, an organism folder, or a hub id such as 'owner/name'"
        )
    text = str(source)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.suffix in (".json", ".safetensors")
    if looks_like_path or path.exists() or not _HUB_ID.match(text):
        raise ValueError(
            f"model {text!r} is neither an existing folder nor a hub id ('owner/name'); "
            f"check the path"
        )
    return "hub"


def _weights_policy(path: Path) -> bool:
    """``use_safetensors`` for a local folder; refuses pickle-only checkpoints."""
    if any(path.glob("*.safetensors")):
        return True
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{path} holds only pickle-based weights (*.bin/*.pt), which can run code when "
            f"loaded; convert them to safetensors (model.save_pretrained(..., "
            f"safe_serialization=True)) or pass allow_pickle_weights=True if you trust them"
        )
    raise ValueError(f"{path} has a config.json but no *.safetensors weights")


def load_causal_lm(
    source: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle_weights: bool = False,
    local_files_only: bool = False,
) -> LoadedLM:
    """Load a causal LM and tokenizer ready for batched generation.

    Args:
        source: organism folder, ``save_pretrained`` folder, or hub id.
        device: torch device for the model.
        dtype: weight dtype (``None``: as saved; e.g. ``torch.bfloat16`` on GPU).
        trust_remote_code: allow model code from the hub (off by default).
        revision: hub revision (branch, tag or commit).
        allow_pickle_weights: accept ``*.bin`` checkpoints (pickle) without safetensors.
        local_files_only: never touch the network (hub ids must be in the HF cache).

    Returns:
        The model in eval mode and a tokenizer that pads on the left with a pad token.

    Raises:
        ValueError: unknown source, or weights that are not safetensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = source_kind(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if kind == "hub":
        kwargs.update(revision=revision, local_files_only=local_files_only)
        use_safetensors = None if allow_pickle_weights else True
    else:
        use_safetensors = None if allow_pickle_weights else _weights_policy(Path(source).expanduser())
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where = str(Path(source).expanduser()) if kind != "hub" else str(source)
    model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=use_safetensors, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        where, trust_remote_code=trust_remote_code,
        **({"revision": revision, "local_files_only": local_files_only} if kind == "hub" else {}),
    )
    # Batched generation lines prompts up at the right edge (left padding).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LoadedLM(model=model, tokenizer=tokenizer, source=str(source), kind=kind)
