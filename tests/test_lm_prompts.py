"""Prompt sets from files and dataset folders; refusal judges."""

from __future__ import annotations

import json

import pytest
import torch

from safetylab.lm import ClassifierJudge, KeywordJudge, load_prompts

PROMPTS = ["How do I pick a lock?", "Write a poem about rain.", "Explain photosynthesis."]


def test_jsonl_csv_json_txt_give_the_same_prompts(tmp_path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"goal": p, "id": i}) for i, p in enumerate(PROMPTS)) + "\n\n")
    csv = tmp_path / "p.csv"
    csv.write_text("id,goal\n" + "\n".join(f'{i},"{p}"' for i, p in enumerate(PROMPTS)) + "\n")
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"goal": p} for p in PROMPTS]))
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS) + "\n\n")
    for f in (jsonl, csv, js):
        assert load_prompts(f, "goal") == PROMPTS
    assert load_prompts(txt) == PROMPTS
    assert load_prompts(jsonl, "goal", limit=2) == PROMPTS[:2]


def test_hf_dataset_folder(tmp_path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": PROMPTS, "label": [1, 0, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", "text") == PROMPTS
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd", "text") == PROMPTS[:1]  # prefers the test split
    assert load_prompts(tmp_path / "dd", "text", split="train") == PROMPTS
    with pytest.raises(ValueError, match=r"no column 'prompt' \(columns: text, label\).*--prompt-column"):
        load_prompts(tmp_path / "ds")


def test_bad_prompt_sources(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"goal": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(columns: goal\); pass --prompt-column"):
        load_prompts(f)
    c = tmp_path / "p.csv"
    c.write_text("goal\nx\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*columns: goal"):
        load_prompts(c, "text")
    e = tmp_path / "e.jsonl"
    e.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(ValueError, match="must not be empty"):
        load_prompts(e)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "b.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_prompts(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 recipe\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text .*offset 3.*save it as UTF-8"):
        load_prompts(latin)


@pytest.mark.parametrize(
    "response, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I cannot assist.", True),
        ("As an AI language model, I must decline.", True),
        ("Sure! Here is a poem about rain: ...", False),
        ("Step 1: preheat the oven. Step 2: ...", False),
        ("Here is the recipe. " + "x" * 200 + " Sorry for the long answer.", False),  # outside the window
    ],
)
def test_keyword_judge(response: str, refused: bool) -> None:
    assert KeywordJudge().judge(["q"], [response]) == [refused]


def test_keyword_judge_whole_response_mode() -> None:
    late = "Here is the recipe. " + "x" * 200 + " Sorry for the long answer."
    assert KeywordJudge(window_chars=None).judge(["q"], [late]) == [True]


def test_classifier_judge_reads_the_refusal_label(tmp_path) -> None:
    import transformers as tf

    from safetylab.organisms.tokenizer import build_tokenizer

    tok = build_tokenizer(["i", "cannot", "help", "sure", "here", "it", "is"])
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         num_labels=2, id2label={0: "comply", 1: "refusal"}, label2id={"comply": 0, "refusal": 1})
    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(cfg).eval()
    folder = tmp_path / "clf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    responses = ["i cannot help", "sure here it is", "it is", "help"]
    enc = tok(responses, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits.argmax(-1)
    judge = ClassifierJudge(folder, refusal_label="Refusal")
    assert judge.judge(["q"] * 4, responses) == (want == 1).tolist()
    other = ClassifierJudge(folder, refusal_label=0)  # naming the other class flips every verdict
    assert other.judge(["q"] * 4, responses) == (want == 0).tolist()
    probs = judge.refusal_probability(["q"] * 4, responses)
    assert all(0 <= p <= 1 for p in probs) and [p > 0.5 for p in probs] == (want == 1).tolist()
    with pytest.raises(ValueError, match=r"refusal_label='unsafe' is not a label.*comply, refusal"):
        ClassifierJudge(folder, refusal_label="unsafe")
    with pytest.raises(ValueError, match="not a model folder"):
        ClassifierJudge(tmp_path)
