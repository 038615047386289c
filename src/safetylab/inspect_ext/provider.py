"""``--model safetylab/NAME``: a model organism served to Inspect as a model API.

Names, after the provider's ``safetylab/``:

* ``sft`` -- the quick-scale organism of that variant, training seed 0;
* ``sft@1`` -- training seed 1;
* ``eval-gated@0?scale=tiny`` -- another scale (``tiny``, ``quick``, ``paper``); ``base_seed=K``
  fine-tunes from the base of seed K, as ``safetylab organism eval --base-seed`` does;
* a folder (``safetylab//abs/path``, ``safetylab/./rel``, ``safetylab/~/x``: any name with a
  ``/`` in it or starting with ``.`` or ``~``) -- an organism folder as printed by
  ``safetylab organism train``.

A variant that the organism cache lacks is trained and cached on first use, base first,
exactly as ``safetylab organism train`` would (same config, same cache key). Model args
(``-M``): ``device`` (torch device, default ``cpu``) and ``cache_dir`` (organism cache, default
``$SAFETYLAB_CACHE/organisms`` or ``~/.cache/safetylab/organisms``).

Generation follows Inspect's :class:`~inspect_ai.model.GenerateConfig`:

* ``temperature`` unset or 0: greedy decoding, the behaviour ``safetylab organism eval``
  grades, with the same batched call to ``model.generate``; so a task's scores equal that
  evaluation's on the same requests.
* ``temperature`` > 0: sampling, with ``top_p`` and ``top_k`` when given. Each draw is seeded
  from (``seed``, the prompt, how many times this prompt was drawn before), so a seeded run
  gives the same replies whatever order Inspect schedules samples in, and epochs of one prompt
  still differ. Without ``seed`` the draws are not reproducible.
* ``max_tokens``: default 64, as ``organism eval``; ``stop_seqs``: the reply is cut before the
  first one.

Prompts use the organism's own chat template (``<bos> <user> TEXT <assistant>``). Organisms
know only the user and assistant roles, so a system message is put at the start of the first
user turn, where the secret-keeping organism reads its instructions
(:mod:`safetylab.organisms.secrets`). Organisms have no tools; a task that offers tools gets an
error saying so.

Requests that Inspect has in flight together are generated as one left-padded batch (up to
``max_connections`` of them), as ``organism eval`` batches its requests.

Bad names (an unknown variant, a seed that is not a number, a folder that is not an organism)
raise :class:`inspect_ai._util.error.PrerequisiteError` with one line naming the problem and the
fix, which ``inspect eval`` prints without a traceback.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
from inspect_ai._util.error import PrerequisiteError
from inspect_ai.model import (
    ChatMessage,
    ChatMessageSystem,
    ChatMessageTool,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from safetylab.errors import UserError

logger = logging.getLogger(__name__)

PROVIDER = "safetylab"
DEFAULT_MAX_TOKENS = 64
"""Longest reply by default: ``organism eval``'s ``max_new_tokens``."""
MODEL_ARGS: tuple[str, ...] = ("device", "cache_dir")
QUERY_KEYS: tuple[str, ...] = ("scale", "base_seed")

_SPEC = re.compile(r"^(?P<variant>[^@?]*)(?:@(?P<seed>[^?]*))?(?:\?(?P<query>.*))?$")


@dataclass(frozen=True)
class OrganismName:
    """What ``--model safetylab/NAME`` asks for: a variant to get from the cache, or a folder."""

    variant: str | None = None
    """One of the organism variants; None when ``folder`` is given."""
    seed: int = 0
    """Training seed."""
    scale: str = "quick"
    base_seed: int | None = None
    """Seed of the base a variant is fine-tuned from (None: ``seed``)."""
    folder: Path | None = None
    """An organism folder, used as it is."""


def _problem(name: str, text: str) -> PrerequisiteError:
    return PrerequisiteError(f"{PROVIDER}/{name}: {text}")


def _int(name: str, what: str, value: str, example: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise _problem(name, f"the {what} {value!r} is not a number; name a training seed, as in "
                             f"{PROVIDER}/{example}") from None
    if out < 0:
        raise _problem(name, f"the {what} {out} is negative; training seeds are integers >= 0")
    return out


def parse_organism_name(name: str) -> OrganismName:
    """Parse the part of ``--model safetylab/NAME`` after ``safetylab/``.

    Raises:
        PrerequisiteError: one line naming the problem and the fix.
    """
    from safetylab.organisms.train import SCALES, VARIANTS

    if not name:
        raise _problem(name, f"no organism named; use {PROVIDER}/sft, {PROVIDER}/sft@1?scale=tiny "
                             f"or {PROVIDER}/<organism folder>")
    if "/" in name or name.startswith((".", "~")):
        return OrganismName(folder=Path(name).expanduser())
    m = _SPEC.match(name)
    assert m is not None  # every string matches: each part is optional
    variant, seed_text, query = m.group("variant"), m.group("seed"), m.group("query")
    if variant not in VARIANTS:
        raise _problem(name, f"unknown organism variant {variant!r}; choose from {', '.join(VARIANTS)}, "
                             f"or name an organism folder ({PROVIDER}/./path)")
    seed = 0 if seed_text is None else _int(name, "seed", seed_text, f"{variant}@1")
    options: dict[str, str] = {}
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise _problem(name, f"cannot read the options {query!r}; write them as "
                                 f"{PROVIDER}/{variant}@{seed}?scale=tiny&base_seed=0") from None
        for key, value in pairs:
            if key not in QUERY_KEYS:
                raise _problem(name, f"unknown option {key!r}; use {' or '.join(QUERY_KEYS)} "
                                     f"({PROVIDER}/{variant}?scale=tiny)")
            options[key] = value
    scale = options.get("scale", "quick")
    if scale not in SCALES:
        raise _problem(name, f"unknown organism scale {scale!r}; choose from {', '.join(SCALES)}")
    base_seed = (None if "base_seed" not in options
                 else _int(name, "base_seed", options["base_seed"], f"{variant}@{seed}?base_seed=0"))
    return OrganismName(variant=variant, seed=seed, scale=scale, base_seed=base_seed)


def resolve_organism(name: str, *, cache_dir: str | Path | None = None, device: str = "cpu") -> Path:
    """The organism folder that ``safetylab/NAME`` serves, training it first if the cache lacks it.

    Raises:
        PrerequisiteError: a bad name, or a folder that is not a complete organism.
    """
    from safetylab.organisms.cache import get_organism, load_meta

    spec = parse_organism_name(name)
    try:
        if spec.folder is not None:
            if not spec.folder.exists():
                raise UserError(f"organism folder {spec.folder} does not exist; list organisms with "
                                f"'safetylab organism list'")
            load_meta(spec.folder)
            return spec.folder
        cache = Path(cache_dir).expanduser() if cache_dir is not None else None
        return get_organism(spec.variant or "", spec.scale, cache_dir=cache, seed=spec.seed,
                            base_seed=spec.base_seed, quiet=False, device=device)
    except UserError as exc:
        raise _problem(name, str(exc)) from None


@dataclass(frozen=True)
class _Settings:
    """The generation settings that requests in one batch share."""

    max_new_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]

    @property
    def sampling(self) -> bool:
        return bool(self.temperature)

    @classmethod
    def from_config(cls, config: GenerateConfig) -> "_Settings":
        return cls(
            max_new_tokens=config.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            seed=config.seed, stop=tuple(config.stop_seqs or ()),
        )


@dataclass
class _Reply:
    text: str
    input_tokens: int
    output_tokens: int
    hit_limit: bool
    """Stopped at ``max_new_tokens`` rather than at ``<eos>``."""


@dataclass(eq=False)
class _Pending:
    prompt: str
    settings: _Settings
    draw: int
    """How many times this prompt was drawn before with these settings (sampling seeds)."""
    batch_limit: int
    """Largest batch this request may join (the config's ``max_connections``)."""
    reply: _Reply | None = None
    error: BaseException | None = None
    wake: anyio.Event | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None


class OrganismAPI(ModelAPI):
    """A model organism (a folder or a cached variant) as an Inspect model API."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),
        **model_args: Any,
    ) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key,
                         api_key_vars=[], config=config)
        unknown = sorted(set(model_args) - set(MODEL_ARGS))
        if unknown:
            raise _problem(model_name, f"unknown model arg {unknown[0]!r}; use "
                                       f"{' or '.join(f'-M {k}=...' for k in MODEL_ARGS)}")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.device = str(model_args.get("device") or "cpu")
        self.path = resolve_organism(model_name, cache_dir=model_args.get("cache_dir"), device=self.device)
        """The organism folder served (its world: ``World.from_organism(path)``)."""
        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(self.path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._pending: list[_Pending] = []
        self._running = False
        self._draws: Counter[tuple[str, _Settings]] = Counter()

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS

    def max_connections(self) -> int:
        """Largest batch, as ``organism eval``'s (``--max-connections`` sets another). Under
        Inspect's default adaptive concurrency a batch holds the requests in flight (20 to 100)."""
        return 128

    async def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the organism's own vocabulary (Inspect's default, tiktoken,
        would download an encoding and count another model's tokens)."""
        return len(await self.tokenize(text))

    async def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def collapse_user_messages(self) -> bool:
        return True

    def collapse_assistant_messages(self) -> bool:
        return True

    def prompt(self, messages: list[ChatMessage]) -> str:
        """The organism's chat template over ``messages`` (system text leads the first user turn)."""
        system = " ".join(m.text for m in messages if isinstance(m, ChatMessageSystem) and m.text)
        turns: list[dict[str, str]] = []
        for m in messages:
            if isinstance(m, ChatMessageSystem):
                continue
            if isinstance(m, ChatMessageTool):
                raise ValueError(f"{PROVIDER}/{self.model_name}: organisms have no tools, but the "
                                 f"conversation holds a tool result; evaluate them without tools")
            text = m.text
            if m.role == "user" and system and not any(t["role"] == "user" for t in turns):
                text = f"{system} {text}"
            turns.append({"role": m.role, "content": text})
        if not any(t["role"] == "user" for t in turns):
            turns.insert(0, {"role": "user", "content": system})
        return str(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        if tools:
            raise ValueError(f"{PROVIDER}/{self.model_name}: organisms cannot call tools; "
                             f"evaluate them with a plain generate() solver")
        settings = _Settings.from_config(config)
        prompt = self.prompt(input)
        draw = 0
        if settings.sampling and settings.seed is not None:  # only seeded draws need counting
            draw = self._draws[(prompt, settings)]
            self._draws[(prompt, settings)] += 1
        limit = config.max_connections or self.max_connections()
        reply = await self._complete(_Pending(prompt, settings, draw, limit))
        text, stop_reason = reply.text, "max_tokens" if reply.hit_limit else "stop"
        cut = [text.find(s) for s in settings.stop if s and s in text]
        if cut:
            text, stop_reason = text[: min(cut)], "stop"
        output = ModelOutput.from_content(model=self.model_name, content=text, stop_reason=stop_reason)
        output.usage = ModelUsage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                                  total_tokens=reply.input_tokens + reply.output_tokens)
        return output

    async def _complete(self, item: _Pending) -> _Reply:
        """Generate ``item`` together with the other requests pending now.

        One request at a time runs a batch in a worker thread (the model is not shared between
        threads); the others wait on an event that is set when their reply is ready or when
        the batch before them is done and one of them should run the next.
        """
        self._pending.append(item)
        try:
            await anyio.sleep(0)  # requests started together join one batch
            while not item.finished:
                if self._running:
                    item.wake = anyio.Event()
                    await item.wake.wait()
                    continue
                await self._run_batch(item)
        except BaseException:
            if item in self._pending:
                self._pending.remove(item)
            raise
        if item.error is not None:
            raise item.error
        assert item.reply is not None
        return item.reply

    async def _run_batch(self, item: _Pending) -> None:
        self._running = True
        limit = 1 if item.settings.sampling else item.batch_limit
        batch = [p for p in self._pending if p.settings == item.settings and not p.finished]
        batch = [item] + [p for p in batch if p is not item][: limit - 1]
        try:
            replies = await anyio.to_thread.run_sync(self._generate_batch, batch)
            for p, r in zip(batch, replies):
                p.reply = r
        except Exception as exc:
            for p in batch:
                p.error = exc
        finally:
            self._running = False
            for p in batch:
                if p.finished and p in self._pending:
                    self._pending.remove(p)
            waiting = [p for p in self._pending if p is not item]
            for p in [*batch, *waiting[:1]]:  # finished ones return; the next one runs a batch
                if p is not item and p.wake is not None:
                    p.wake.set()

    def _generate_batch(self, batch: list[_Pending]) -> list[_Reply]:
        """Left-padded batched generation, as ``safetylab.organisms.evaluate.generate`` does."""
        import torch

        tok, model, s = self.tokenizer, self.model, batch[0].settings
        enc = tok([p.prompt for p in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        kwargs: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
        with torch.no_grad():
            if not s.sampling:
                gen = model.generate(**enc, do_sample=False, **kwargs)
            else:
                (p,) = batch
                # top_k 0 and top_p 1 switch those filters off: plain temperature sampling unless
                # asked for (transformers 4 would otherwise apply its default top_k of 50).
                kwargs.update(do_sample=True, temperature=s.temperature,
                              top_p=1.0 if s.top_p is None else s.top_p, top_k=s.top_k or 0)
                devices = [model.device] if model.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):  # leaves the caller's RNG as it was
                    torch.manual_seed(self._draw_seed(p))
                    gen = model.generate(**enc, **kwargs)
        new = gen[:, enc["input_ids"].shape[1]:].cpu()  # (batch, new tokens)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        replies = []
        for i, text in enumerate(texts):
            ids = new[i].tolist()
            n_out = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
            replies.append(_Reply(text=text, input_tokens=int(enc["attention_mask"][i].sum()),
                                  output_tokens=n_out, hit_limit=tok.eos_token_id not in ids))
        return replies

    @staticmethod
    def _draw_seed(p: _Pending) -> int:
        """Seed of one sampled reply: fixed by (config seed, prompt, draw) when a seed is given."""
        if p.settings.seed is None:
            import secrets

            return secrets.randbits(63)
        h = hashlib.sha256(f"{p.settings.seed}\0{p.draw}\0{p.prompt}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@modelapi(name=PROVIDER)
def safetylab_organism() -> type[ModelAPI]:
    return OrganismAPI
