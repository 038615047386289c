"""Word-level tokenizer with a chat template, for model organisms.

Built with the ``tokenizers`` library (a ``WordLevel`` model, lower-casing, split on
whitespace and punctuation) and wrapped as a ``PreTrainedTokenizerFast`` so that an
organism folder behaves like any Hugging Face chat model::

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                  add_generation_prompt=True)

The chat format is ``<bos> <user> TEXT <assistant> RESPONSE <eos>``; padding is on the
left so batched greedy generation lines prompts up at the right edge.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, USER, ASSISTANT)

# Jinja chat template (Hugging Face convention). Kept equal to ``format_prompt`` /
# ``format_example`` below, which training uses directly for speed; a test checks this.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<user> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<assistant> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('organisms only know the user and assistant roles') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def format_prompt(text: str) -> str:
    """The chat-template rendering of one user turn plus the generation prompt."""
    return f"{BOS}<user> {text} <assistant>"


def build_tokenizer(vocabulary: Iterable[str], max_length: int = 256) -> PreTrainedTokenizerFast:
    """A word-level chat tokenizer over ``vocabulary`` (plus the special tokens).

    Args:
        vocabulary: the words of the world (see ``World.vocabulary``); duplicates and
            special tokens are ignored.
        max_length: ``model_max_length`` recorded in the tokenizer config.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/eos/bos/unk set, left padding and a chat
        template; ids 0..5 are the special tokens in :data:`SPECIAL_TOKENS` order.
    """
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary:
        if w and w not in vocab:
            if any(ch.isspace() for ch in w):
                raise ValueError(f"vocabulary entry {w!r} contains whitespace; pass single words")
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
