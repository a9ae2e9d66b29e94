"""The cloze reading of CMB questions (medllm/cloze.py): the scores are the model's own log-probabilities, and a
model that has read the answers beats a random one."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_script

DATA = REPO / "data" / "cmb"


def single_answer_items(split: str) -> list[dict]:
    return [item for item in json.loads((DATA / f"{split}.json").read_text(encoding="utf-8"))
            if len(item["answer"]) == 1]


def test_option_scores_are_mean_log_probabilities_of_each_option(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medllm.cloze import option_scores

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    item = single_answer_items("test")[0]
    scores = option_scores(model, tokenizer, item["question"], item["option"])  # one padded batch
    context = tokenizer(item["question"], add_special_tokens=False)["input_ids"]
    for letter, text in item["option"].items():  # each option alone, no padding
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = model(torch.tensor([context + ids])).logits[0].log_softmax(-1)
        expected = sum(log_probs[len(context) - 1 + i, token].item() for i, token in enumerate(ids)) / len(ids)
        assert scores[letter] == pytest.approx(expected, abs=1e-4)


def test_a_model_that_read_the_answers_beats_a_random_one(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medllm.cloze import cloze_accuracy

    # Teach the micro model "question + its right option" for the held-out split, as plain text.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [item["question"] + item["option"][item["answer"]] for item in single_answer_items("test")]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)], labels[i, :len(row)] = torch.tensor(row), torch.tensor(row)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(120):
        loss = model(input_ids=ids, attention_mask=labels.ne(-100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "read")
    tokenizer.save_pretrained(tmp_path / "read")

    trained, random = cloze_accuracy(str(tmp_path / "read"), str(DATA)), cloze_accuracy(tiny_model_dir, str(DATA))
    assert trained["cmb_test"]["questions"] == len(texts) and trained["cmb_test"]["skipped"] == 100 - len(texts)
    assert trained["cmb_test"]["accuracy"] >= 80, trained
    assert random["cmb_test"]["accuracy"] <= 40, random


def test_command_line_writes_json_and_names_a_missing_folder(tiny_model_dir, tmp_path):
    output = tmp_path / "cloze.json"
    result = run_script("-m", "medllm.cloze", "--models", f"random={tiny_model_dir}", "--data_dir", str(DATA),
                        "--output_file", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert set(report["random"]) == {"cmb", "cmb_test"} and report["random"]["cmb"]["questions"] > 0
    missing = run_script("-m", "medllm.cloze", "--models", f"x={tmp_path / 'nowhere'}", "--data_dir", str(DATA))
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
