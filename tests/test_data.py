"""Loaders: every sample format loads, bad records give file:line: field messages, skips are counted."""

from __future__ import annotations

import json
import logging

import pytest

from medllm.arguments import DataArguments
from medllm.data import load_conversations, load_preference_pairs, load_pretrain_texts
from medllm.errors import DataError, MedLLMError

REPO_DATA = "data"


def _write(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                    encoding="utf-8")
    return path


def test_sample_data_of_every_stage_loads():
    pretrain = load_pretrain_texts(DataArguments(train_file_dir="data/pretrain"), need_eval=False)["train"]
    assert len(pretrain) > 500 and all(r["text"].strip() for r in pretrain)
    sft = load_conversations(DataArguments(train_file_dir="data/finetune"), need_eval=False)["train"]
    assert len(sft) > 2000
    assert {m["role"] for r in sft for m in r["messages"]} == {"system", "user", "assistant"}
    dpo = load_preference_pairs(DataArguments(train_file_dir="data/reward"), need_eval=False)["train"]
    assert len(dpo) > 400 and all(r["prompt"][-1]["role"] == "user" for r in dpo)


def test_sharegpt_openai_and_alpaca_map_to_one_form(tmp_path):
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    _write(tmp_path, "a.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                                    {"from": "gpt", "value": "A"}]}])
    _write(tmp_path, "b.jsonl", [{"messages": expected}])
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Q", "input": "", "output": "A"}]))
    records = load_conversations(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)["train"]
    assert [r["messages"] for r in records] == [expected, expected, expected[1:]]


def test_both_dpo_layouts_give_the_same_record(tmp_path):
    _write(tmp_path, "new.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                                      {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}],
                                    "chosen": "good", "rejected": "bad"}])
    _write(tmp_path, "old.jsonl", [{"system": "S", "history": [["Q1", "A1"]], "question": "Q2",
                                    "response_chosen": "good", "response_rejected": "bad"}])
    new, old = load_preference_pairs(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)["train"]
    assert new == old and new["prompt"][-1] == {"role": "user", "content": "Q2"}


GOOD = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
BAD_SFT = [
    ('{"conversations": [', "invalid JSON", None),
    ({"conversations": "hi"}, "must be a non-empty list of turns", "conversations"),
    ({"text": "x"}, "missing", "conversations"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}, "is empty",
     "conversations[1].value"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 3}]}, "must be a string",
     "conversations[1].value"),
    ({"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "unknown role 'robot'",
     "conversations[0].from"),
    ({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, "expected user",
     "conversations"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]}, "expected assistant",
     "conversations"),
    ([1, 2], "must be a JSON object", None),
]


@pytest.mark.parametrize("bad,problem,field", BAD_SFT)
def test_bad_sft_record_names_file_line_and_field(tmp_path, bad, problem, field):
    path = _write(tmp_path, "train.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as error:
        load_conversations(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)
    assert (error.value.path, error.value.line, error.value.field) == (str(path), 3, field)
    assert problem in str(error.value) and str(error.value).startswith(f"{path}:3: ")


BAD_DPO = [
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": "x", "rejected": "x"}, "identical", "rejected"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": "x"}, "missing", "rejected"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "chosen": "x",
      "rejected": "y"}, "must end with a user turn", "conversations"),
    ({"question": "Q", "history": [["only one"]], "response_chosen": "x", "response_rejected": "y"},
     "[question, answer] pair", "history[0]"),
]


@pytest.mark.parametrize("bad,problem,field", BAD_DPO)
def test_bad_dpo_record(tmp_path, bad, problem, field):
    path = _write(tmp_path, "pairs.jsonl", [bad])
    with pytest.raises(DataError) as error:
        load_preference_pairs(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)
    assert (error.value.path, error.value.line, error.value.field) == (str(path), 1, field)
    assert problem in str(error.value)


def test_gbk_file_is_named_with_its_line(tmp_path):
    (tmp_path / "gbk.txt").write_bytes("第一行\n发烧\n".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.txt:1: not valid UTF-8"):
        load_pretrain_texts(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)


def test_empty_folder_and_empty_file(tmp_path):
    with pytest.raises(MedLLMError, match="no .txt, .json or .jsonl files"):
        load_pretrain_texts(DataArguments(train_file_dir=str(tmp_path)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        load_pretrain_texts(DataArguments(train_file_dir=str(tmp_path)))


def test_skip_invalid_records_counts_exactly(tmp_path, caplog):
    bad_value = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}
    path = _write(tmp_path, "mixed.jsonl", [GOOD, "{not json", bad_value, GOOD, bad_value, {"x": 1}, GOOD])
    (tmp_path / "gbk.jsonl").write_bytes(json.dumps(GOOD, ensure_ascii=False).replace("Q", "发烧").encode("gbk"))
    caplog.set_level(logging.WARNING)
    records = load_conversations(DataArguments(train_file_dir=str(tmp_path), skip_invalid_records=True),
                                 need_eval=False)["train"]
    assert len(records) == 3
    assert f"{path}: skipped 4 invalid record(s): 2 x conversations[1].value: is empty.; " in caplog.text
    assert "1 x record: invalid JSON" in caplog.text and "1 x conversations: missing" in caplog.text
    assert "gbk.jsonl: skipped 1 invalid record(s): 1 x whole file: not valid UTF-8" in caplog.text


def test_zero_valid_records_is_an_error(tmp_path):
    _write(tmp_path, "bad.jsonl", [{"x": 1}])
    with pytest.raises(MedLLMError, match="no valid records in 1 file"):
        load_conversations(DataArguments(train_file_dir=str(tmp_path), skip_invalid_records=True))


def test_bom_and_json_array_with_line_numbers(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "ok"}).encode() + b"\n")
    with pytest.raises(DataError, match=r"bom.jsonl:1: starts with a UTF-8 byte-order mark"):
        load_pretrain_texts(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)
    (tmp_path / "bom.jsonl").unlink()
    (tmp_path / "array.json").write_text('[\n  {"text": "a"},\n  {"text": ""}\n]\n')
    with pytest.raises(DataError) as error:
        load_pretrain_texts(DataArguments(train_file_dir=str(tmp_path)), need_eval=False)
    assert (error.value.line, error.value.field) == (3, "text")


def test_validation_split_and_sample_limits(tmp_path):
    _write(tmp_path, "t.txt", [f"document {i}" for i in range(200)])
    args = DataArguments(train_file_dir=str(tmp_path), validation_split_percentage=10, max_train_samples=50)
    splits = load_pretrain_texts(args, seed=1)
    assert len(splits["train"]) == 50 and len(splits["validation"]) == 20
    again = load_pretrain_texts(args, seed=1)
    assert splits["validation"]["text"] == again["validation"]["text"]
    assert not set(splits["validation"]["text"]) & set(load_pretrain_texts(
        DataArguments(train_file_dir=str(tmp_path), validation_split_percentage=10), seed=1)["train"]["text"])


def test_real_medicalgpt_files_load(shared_data, caplog):
    caplog.set_level(logging.WARNING)
    assert len(load_pretrain_texts(DataArguments(train_file_dir=str(shared_data / "pretrain")))["train"]) > 3000
    assert len(load_pretrain_texts(DataArguments(train_file_dir=str(shared_data / "rag")))["train"]) > 50
    sft = load_conversations(DataArguments(train_file_dir=str(shared_data / "sft")), need_eval=False)["train"]
    assert len(sft) == 1999  # 2,000 rows; one has no reply at all and is dropped, and the log says so
    assert "1 x dropped a conversation with no reply to train on" in caplog.text
    dpo = load_preference_pairs(DataArguments(train_file_dir=str(shared_data / "reward")), need_eval=False)["train"]
    assert len(dpo) == 500
