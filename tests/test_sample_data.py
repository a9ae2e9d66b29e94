"""Tests for tools/make_sample_data.py, the committed data/ files and medllm/cmb.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from medllm.cmb import CMB_PROMPT_TEMPLATE, option_str, render_cmb_prompt, score_answer  # noqa: E402

TRAIN_FILES = [
    "pretrain/encyclopedia.txt",
    "pretrain/encyclopedia.jsonl",
    "finetune/medical_sharegpt.jsonl",
    "finetune/medical_openai.jsonl",
    "finetune/cmb_style_mcq.jsonl",
    "finetune/option_letter_drills.jsonl",
    "reward/medical_dpo.jsonl",
    "reward/medical_dpo_legacy.jsonl",
]
ALL_FILES = TRAIN_FILES + ["cmb/val.json", "cmb/test.json", "vocab/medical_terms.txt", "README.md"]
CMB_KEYS = {"exam_type", "exam_class", "exam_subject", "question_type", "question", "option", "answer"}


@pytest.fixture(scope="module")
def gen():
    path = os.path.join(REPO, "tools", "make_sample_data.py")
    spec = importlib.util.spec_from_file_location("make_sample_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fresh(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_a")
    gen.generate(str(out), seed=42)
    return out


def _read(rel: str, base: str = DATA) -> str:
    with open(os.path.join(base, rel), encoding="utf-8") as f:
        return f.read()


def _jsonl(rel: str) -> list[dict]:
    return [json.loads(line) for line in _read(rel).splitlines()]


# ------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes(gen, fresh, tmp_path):
    gen.generate(str(tmp_path), seed=42)
    for rel in ALL_FILES:
        with open(fresh / rel, "rb") as a, open(tmp_path / rel, "rb") as b:
            assert a.read() == b.read(), rel


def test_committed_data_equals_fresh_generation(fresh):
    for rel in ALL_FILES:
        with open(fresh / rel, "rb") as a, open(os.path.join(DATA, rel), "rb") as b:
            assert a.read() == b.read(), f"data/{rel} is stale: run python tools/make_sample_data.py"


def test_other_seed_changes_data(gen, fresh, tmp_path):
    gen.generate(str(tmp_path), seed=7)
    assert (tmp_path / "cmb/test.json").read_bytes() != (fresh / "cmb/test.json").read_bytes()


# ------------------------------------------------------------------ schemas
def test_pretrain_files():
    lines = _read("pretrain/encyclopedia.txt").split("\n")
    assert lines[-1] == ""  # file ends with newline
    docs = lines[:-1]
    assert len(docs) == 433
    assert all(80 <= len(d) <= 300 for d in docs)
    rows = _jsonl("pretrain/encyclopedia.jsonl")
    assert len(rows) == 156
    assert all(set(r) == {"text"} and 80 <= len(r["text"]) <= 300 for r in rows)
    assert any("幽门螺杆菌感染" in d and "铋剂四联根除治疗" in d for d in docs)


def _check_sharegpt_sft(conv: list[dict]) -> None:
    assert all(set(t) == {"from", "value"} and isinstance(t["value"], str) and t["value"] for t in conv)
    roles = [t["from"] for t in conv]
    if roles[0] == "system":
        roles = roles[1:]
    assert "system" not in roles
    assert len(roles) % 2 == 0 and roles
    assert roles == ["human", "gpt"] * (len(roles) // 2)


def test_sharegpt_sft():
    rows = _jsonl("finetune/medical_sharegpt.jsonl")
    assert len(rows) == 250
    lengths = set()
    for r in rows:
        assert set(r) == {"conversations"}
        _check_sharegpt_sft(r["conversations"])
        lengths.add(sum(t["from"] != "system" for t in r["conversations"]) // 2)
    assert lengths == {1, 2, 3}
    assert any(r["conversations"][0]["value"] == "你是一名专业、谨慎的医生助手。" for r in rows)


def test_openai_sft():
    rows = _jsonl("finetune/medical_openai.jsonl")
    assert len(rows) == 150
    for r in rows:
        assert set(r) == {"messages"}
        msgs = r["messages"]
        assert all(set(m) == {"role", "content"} and m["content"] for m in msgs)
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def _options(prompt: str) -> dict[str, str]:
    return {k: v.strip() for k, v in re.findall(r"^([A-E])\. (.+)$", prompt, flags=re.M)}


def _mcq_reply_ok(prompt: str, reply: str) -> str:
    """The letter(s) a CMB-prompt reply scores as; a text-then-letter reply must name that letter's option."""
    if re.fullmatch(r"[A-E]+", reply):
        return reply
    text, letter = reply.rsplit("，", 1)
    assert letter in "ABCDE" and len(letter) == 1, reply
    assert _options(prompt)[letter] == text, (prompt, reply)
    assert not any(ch.isupper() for ch in text), reply
    return letter


def test_cmb_style_mcq_sft():
    rows = _jsonl("finetune/cmb_style_mcq.jsonl")
    assert len(rows) == 8000
    singles = []
    for r in rows:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        prompt, reply = conv[0]["value"], conv[1]["value"]
        assert prompt.startswith("以下是中国医师考试中执业医师考试的一道")
        assert prompt.endswith(" \n 答案: ")
        ans = _mcq_reply_ok(prompt, reply)
        assert score_answer(reply, ans)
        assert list(ans) == sorted(set(ans))
        letters = re.findall(r"^([A-E])\. ", prompt, flags=re.M)
        assert letters == list("ABCDE")
        assert len(prompt) < 200
        if "单项选择题" in prompt:
            assert len(ans) == 1
            singles.append(ans)
    assert len(singles) == 7200
    assert {x: singles.count(x) for x in "ABCDE"} == {x: 1440 for x in "ABCDE"}
    assert sum("，" in r["conversations"][1]["value"] for r in rows) > 6000  # most name the option, then its letter


def test_option_letter_drills():
    rows = _jsonl("finetune/option_letter_drills.jsonl")
    assert len(rows) == 4000
    for r in rows:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        options = _options(conv[0]["value"])
        assert list(options) == list("ABCDE")
        pairs = [line.rsplit("，", 1) for line in conv[1]["value"].split("\n")]
        assert sorted(letter for _, letter in pairs) == list("ABCDE")
        assert all(options[letter] == text for text, letter in pairs)


def test_dpo():
    rows = _jsonl("reward/medical_dpo.jsonl")
    assert len(rows) == 400
    n_mcq = 0
    for r in rows:
        assert set(r) == {"conversations", "chosen", "rejected"}
        assert r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
        conv = r["conversations"]
        roles = [t["from"] for t in conv]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["human", "gpt"] * (len(roles) // 2) + ["human"]
        if conv[-1]["value"].startswith("以下是中国医师考试"):
            n_mcq += 1
            assert conv[-1]["value"].endswith(" \n 答案: ")
            prompt = conv[-1]["value"]
            chosen = _mcq_reply_ok(prompt, r["chosen"])
            assert re.fullmatch(r"[A-E]+", r["rejected"].rsplit("，", 1)[-1])
            assert not score_answer(r["rejected"], chosen)
    assert n_mcq == 200
    assert any("自己多吃点抗生素" in r["rejected"] for r in rows)


def test_dpo_legacy():
    rows = _jsonl("reward/medical_dpo_legacy.jsonl")
    assert len(rows) == 80
    for r in rows:
        assert set(r) == {"system", "history", "question", "response_chosen", "response_rejected"}
        assert isinstance(r["system"], str)
        assert all(isinstance(h, list) and len(h) == 2 and all(h) for h in r["history"])
        assert r["question"] and r["response_chosen"] != r["response_rejected"]
    assert any(r["history"] for r in rows) and any(not r["history"] for r in rows)


@pytest.mark.parametrize("rel", ["cmb/val.json", "cmb/test.json"])
def test_cmb_files(rel):
    items = json.loads(_read(rel))
    assert isinstance(items, list) and len(items) == 100
    singles = []
    for it in items:
        assert set(it) == CMB_KEYS
        assert it["exam_type"] == "医师考试" and it["exam_class"] == "执业医师"
        assert list(it["option"]) == list("ABCDE")
        assert all(isinstance(v, str) and 1 < len(v) <= 20 for v in it["option"].values())
        assert len(set(it["option"].values())) == 5
        assert len(it["question"]) <= 60
        assert all(ch in it["option"] for ch in it["answer"])
        assert list(it["answer"]) == sorted(set(it["answer"]))
        if it["question_type"] == "单项选择题":
            assert len(it["answer"]) == 1
            singles.append(it["answer"])
        else:
            assert it["question_type"] == "多项选择题" and len(it["answer"]) >= 2
    assert len(singles) == 85
    assert {x: singles.count(x) for x in "ABCDE"} == {x: 17 for x in "ABCDE"}


def test_cmb_answers_match_knowledge_table(gen):
    table = {c["name"]: c for c in gen.CONDITIONS}
    items = json.loads(_read("cmb/test.json"))
    checked = 0
    for it in items:
        for name, c in table.items():
            if it["question"].startswith("为明确" + name + "，"):
                assert it["option"][it["answer"]] == c["check"]
                checked += 1
    assert checked > 0


# ------------------------------------------------------------------ held-out design
def test_test_questions_are_held_out(gen):
    train_text = "".join(_read(rel) for rel in TRAIN_FILES + ["vocab/medical_terms.txt"])
    test_items = json.loads(_read("cmb/test.json"))
    for it in test_items:
        assert it["question"] not in train_text
    frags = gen.heldout_fragments()
    assert "第一步宜采用哪种方案" in frags and len(frags) >= 8
    for frag in frags:
        assert frag not in train_text, frag
    # each test question comes from a held-out template, each val question from a train template
    def matches(q, templates):
        for ts in templates.values():
            for t in ts:
                pat = re.escape(t)
                pat = re.sub(r"\\\{[a-z0-9_]+\\\}", ".+", pat)
                if re.fullmatch(pat, q):
                    return True
        return False

    assert all(matches(it["question"], gen.HELDOUT_TEMPLATES) for it in test_items)
    assert all(matches(it["question"], gen.TRAIN_TEMPLATES) for it in json.loads(_read("cmb/val.json")))


# ------------------------------------------------------------------ CMB prompt / scoring
def test_render_cmb_prompt_golden():
    item = {
        "exam_type": "医师考试",
        "exam_class": "执业医师",
        "question_type": "单项选择题",
        "question": "痛风的首选检查是？",
        "option": {"A": "血尿酸测定", "B": "胃镜检查", "C": "眼压测量", "D": "耳镜检查", "E": ""},
        "answer": "A",
    }
    golden = (
        "以下是中国医师考试中执业医师考试的一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n"
        "痛风的首选检查是？\n"
        "A. 血尿酸测定\nB. 胃镜检查\nC. 眼压测量\nD. 耳镜检查 \n 答案: "
    )
    assert render_cmb_prompt(item) == golden
    # OpenCompass formula, verbatim
    ostr = "\n".join(f"{k}. {v}" for k, v in item["option"].items() if len(v) > 1)
    oc = (f"以下是中国{item['exam_type']}中{item['exam_class']}考试的一道{item['question_type']}，"
          f"不需要做任何分析和解释，直接输出答案选项。\n{item['question']}\n{ostr} \n 答案: ")
    assert render_cmb_prompt(item) == oc
    assert option_str({"A": "甲状腺", "B": "X"}) == "A. 甲状腺"
    assert CMB_PROMPT_TEMPLATE.format(exam_type="a", exam_class="b", question_type="c",
                                      question="d", option_str="e").endswith("\nd\ne \n 答案: ")


def test_score_answer():
    assert score_answer("C", "C") is True
    assert score_answer("C. ACE抑制剂", "C") is False
    assert score_answer("ABD", "ABD") is True
    assert score_answer(" 答案：B", "B") is True
    assert score_answer("", "A") is False
