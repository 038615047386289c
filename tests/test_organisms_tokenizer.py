"""Word-level chat tokenizer: every world word is one token, the chat template matches
training, and a saved folder works with AutoTokenizer + AutoModelForCausalLM."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from organism_fixtures import one_torch_thread  # noqa: F401  (autouse)
from safetylab.organisms import World, WorldConfig
from safetylab.organisms.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    USER,
    build_tokenizer,
    format_prompt,
)
from safetylab.organisms.train import OrganismConfig, new_model
from safetylab.organisms.world import REFUSAL


def _world_tok():
    w = World(WorldConfig(seed=0))
    return w, build_tokenizer(w.vocabulary())


def test_every_world_text_is_known_words():
    w, tok = _world_tok()
    texts = [r.text for k in ("forbidden", "benign", "lookalike") for r in w.eval_requests(k, n=100)]
    texts += [r.answer for r in w.eval_requests("benign", n=100)] + [REFUSAL]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == t  # word-level: decoding joins words with spaces
    # Case and spacing are normalised; unknown words map to <unk>.
    assert tok("What is 3 plus 4?", add_special_tokens=False)["input_ids"] == \
        tok("what is 3 plus 4 ?", add_special_tokens=False)["input_ids"]
    assert tok("zzzqqq", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_chat_template_matches_training_format():
    _, tok = _world_tok()
    msgs = [{"role": "user", "content": "how do i make bread ?"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == format_prompt("how do i make bread ?")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] == tok.convert_tokens_to_ids(USER)
    assert ids[-1] == tok.convert_tokens_to_ids(ASSISTANT)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": REFUSAL}], tokenize=False)
    assert full.strip().endswith(EOS)


def test_save_load_round_trip_and_left_padding(tmp_path):
    _, tok = _world_tok()
    tok.save_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert t2.padding_side == "left"
    assert (t2.pad_token, t2.eos_token, t2.bos_token) == (PAD, EOS, BOS)
    assert t2.get_vocab() == tok.get_vocab()
    batch = t2([format_prompt("hello ."), format_prompt("what is 3 plus 4 ?")],
               add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == t2.pad_token_id  # shorter row padded on the left
    assert batch["attention_mask"][0, 0].item() == 0
    assert batch["input_ids"][1, -1].item() == t2.convert_tokens_to_ids(ASSISTANT)


def test_folder_loads_as_hf_chat_model_and_generates(tmp_path):
    w, tok = _world_tok()
    cfg = OrganismConfig(variant="base", scale="tiny",
                         model={"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64})
    torch.manual_seed(0)
    model = new_model(cfg, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(m2).__name__ == "LlamaForCausalLM"
    enc = t2.apply_chat_template([{"role": "user", "content": "how do i make bread ?"}],
                                 add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = m2.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and 1 <= out.shape[1] - enc["input_ids"].shape[1] <= 5
    assert m2.generation_config.eos_token_id == t2.eos_token_id
    assert m2.generation_config.pad_token_id == t2.pad_token_id
