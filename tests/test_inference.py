"""inference.py: interactive chat keeps each turn's answer, batch output is ordered JSON, batching does not
change greedy replies, an unmerged adapter equals its merge, and stop strings never show."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from conftest import REPO, run_script
from test_merge import make_adapter, variant_model

import inference
from medllm.arguments import InferenceArguments, ModelArguments
from medllm.errors import DataError, MedLLMError
from medllm.generation import ReplyStreamer, generate_replies, load_for_inference, read_questions, resolve_template

GREEDY = dict(max_new_tokens=8, temperature=0.0)
QUESTIONS = ["小孩发烧怎么办？", "头痛", "高血压患者平时饮食要注意什么？需要长期吃药吗？", "咳嗽",
             "糖尿病的早期症状有哪些？", "失眠多梦怎么调理？我最近压力很大，晚上总是睡不着。"]


def load(base: str, lora: str | None = None):
    args = InferenceArguments(base_model=base, lora_model=lora, only_cpu=True)
    model, tokenizer = load_for_inference(args, ModelArguments(torch_dtype="float32"))
    return model, tokenizer, resolve_template(tokenizer)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def micro(tiny_model_dir):
    return load(tiny_model_dir)


def test_batched_greedy_equals_one_by_one(micro):
    model, tokenizer, template = micro
    conversations = [ask(q) for q in QUESTIONS]
    alone = [generate_replies(model, tokenizer, template, [c], batch_size=1, **GREEDY)[0] for c in conversations]
    batched = generate_replies(model, tokenizer, template, conversations, batch_size=4, **GREEDY)
    assert batched == alone
    assert all(alone) and len(set(alone)) > 1  # real, different replies, not empty strings


def test_stop_strings_never_show_even_when_split_across_tokens(micro):
    _, tokenizer, _ = micro
    written = []
    streamer = ReplyStreamer(tokenizer, stop_ids=set(), stops=["USER:"], write=written.append)
    ids = tokenizer("\n发热多喝水 USER: 还有", add_special_tokens=False)["input_ids"]
    streamer.put(ids_tensor([1, 2, 3]))  # the prompt, skipped
    for token in ids:
        streamer.put(ids_tensor([token]))
    streamer.end()
    assert "".join(written) == "发热多喝水"
    assert all("U" not in piece for piece in written)

    stop_id = tokenizer.convert_tokens_to_ids("<|user|>")
    written.clear()
    streamer = ReplyStreamer(tokenizer, stop_ids={stop_id}, stops=["<|user|>"], write=written.append)
    streamer.put(ids_tensor([1]))
    for token in tokenizer("多喝水", add_special_tokens=False)["input_ids"] + [stop_id, 5, 6]:
        streamer.put(ids_tensor([token]))
    streamer.end()
    assert "".join(written) == "多喝水"


def ids_tensor(ids):
    import torch

    return torch.tensor([ids])


def test_lora_model_output_equals_the_merged_model(tiny_model_dir, tmp_path):
    import merge_peft_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)
    merged = tmp_path / "merged"
    merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", adapter, "--output_dir", str(merged)])
    conversations = [ask(q) for q in QUESTIONS[:4]]
    with_adapter = generate_replies(*load(tiny_model_dir, adapter), conversations, **GREEDY)
    from_merged = generate_replies(*load(str(merged)), conversations, **GREEDY)
    plain_base = generate_replies(*load(tiny_model_dir), conversations, **GREEDY)
    assert with_adapter == from_merged
    assert with_adapter != plain_base  # the adapter changes the replies


def test_lora_model_of_another_base_is_refused_before_loading(tiny_model_dir, tmp_path):
    narrow = variant_model(tiny_model_dir, tmp_path / "narrow-base", seed=1, hidden_size=32, head_dim=8)
    adapter = make_adapter(narrow, tmp_path / "narrow-adapter")
    with pytest.raises(MedLLMError, match="does not fit base model"):
        load(tiny_model_dir, adapter)


def test_batch_file_gives_ordered_json(micro, tiny_model_dir, tmp_path):
    records = [
        {"question": "小孩发烧怎么办？"},
        {"instruction": "解释下面的症状", "input": "头痛伴呕吐"},
        {"conversations": [{"from": "human", "value": "咳嗽"}, {"from": "gpt", "value": "多久了？"},
                           {"from": "human", "value": "三天了"}, {"from": "gpt", "value": "..."}]},
        {"messages": [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "失眠怎么办？"}]},
        {"query": "高血压吃什么？"},
    ]
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    output = tmp_path / "out" / "replies.json"
    result = run_script("inference.py", "--base_model", tiny_model_dir, "--data_file", str(data), "--output_file",
                        str(output), "--temperature", "0", "--max_new_tokens", "8", "--batch_size", "2", "--only_cpu")
    assert result.returncode == 0, result.stderr
    replies = json.loads(output.read_text(encoding="utf-8"))
    assert [r["input"] for r in replies] == ["小孩发烧怎么办？", "解释下面的症状\n头痛伴呕吐", "三天了", "失眠怎么办？",
                                             "高血压吃什么？"]
    model, tokenizer, template = micro
    _, conversations = read_questions(str(data))
    assert conversations[2][:3] == [{"role": "user", "content": "咳嗽"}, {"role": "assistant", "content": "多久了？"},
                                    {"role": "user", "content": "三天了"}]
    expected = generate_replies(model, tokenizer, template, conversations, batch_size=1, **GREEDY)
    assert [r["output"] for r in replies] == expected
    assert list(output.parent.iterdir()) == [output]  # no temporary file left


def test_txt_questions_and_bad_records(tmp_path):
    text = tmp_path / "q.txt"
    text.write_text("小孩发烧怎么办\n\n头痛\n", encoding="utf-8")
    assert read_questions(str(text))[0] == ["小孩发烧怎么办", "头痛"]
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "咳嗽"}\n{"answer": "no question here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.jsonl:2: no question"):
        read_questions(str(bad))
    answered = tmp_path / "a.jsonl"
    answered.write_text('{"conversations": [{"from": "gpt", "value": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'conversations': has no human/user turn"):
        read_questions(str(answered))


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    result = run_script("inference.py", "--base_model", str(tmp_path / "no-such-model"), "--interactive")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: base model folder not found: {tmp_path / 'no-such-model'} "
                                                  "(build the default with `python -m medllm.tiny`)."]


def test_quantization_without_gpu_is_refused(tiny_model_dir):
    with pytest.raises(MedLLMError, match="CUDA"):
        inference.main(["--base_model", tiny_model_dir, "--load_in_4bit", "--only_cpu"])


def test_demo_command_answers_the_built_in_questions(tiny_model_dir):
    result = run_script("inference.py", "--base_model", tiny_model_dir, "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Question: 小孩发烧怎么办？" in result.stderr and result.stderr.count("Answer: ") == 4


def _spawn_chat(model_dir: str):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["inference.py", "--model_type", "chatglm", "--base_model", model_dir,
                                           "--tokenizer_path", model_dir, "--interactive", "--temperature", "0",
                                           "--max_new_tokens", "8", "--show_prompt"],
                          cwd=str(REPO), encoding="utf-8", timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    child.expect("User: ")
    return pexpect, child


def _turn(child, question: str) -> tuple[str, str]:
    """Send a question; return (the prompt the model saw, the reply shown)."""
    child.sendline(question)
    child.expect(r"Prompt: (\".*\")\r\n")
    prompt = json.loads(child.match.group(1))
    child.expect("Assistant: ")
    child.expect("\r\nUser: ")
    return prompt, child.before.replace("\r\n", "\n").strip()


def test_interactive_chat_keeps_history_clears_and_exits(micro, tiny_model_dir):
    model, tokenizer, template = micro
    pexpect, child = _spawn_chat(tiny_model_dir)
    first_prompt, first_reply = _turn(child, "小孩发烧怎么办")
    assert first_prompt == template.generation_prompt(ask("小孩发烧怎么办"))
    expected_reply = generate_replies(model, tokenizer, template, [ask("小孩发烧怎么办")], **GREEDY)[0]
    assert first_reply == expected_reply and first_reply

    second_prompt, _ = _turn(child, "要吃药吗")
    history = ask("小孩发烧怎么办") + [{"role": "assistant", "content": first_reply}] + ask("要吃药吗")
    assert second_prompt == template.generation_prompt(history)
    assert "小孩发烧怎么办" in second_prompt and first_reply in second_prompt

    child.sendline("clear")
    child.expect("History cleared.")
    child.expect("User: ")
    third_prompt, _ = _turn(child, "头痛")
    assert third_prompt == template.generation_prompt(ask("头痛"))
    assert not re.search("小孩发烧|要吃药", third_prompt)

    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("key", ["ctrl-d", "ctrl-c"])
def test_interactive_chat_ends_cleanly_on_ctrl_d_and_ctrl_c(tiny_model_dir, key):
    pexpect, child = _spawn_chat(tiny_model_dir)
    if key == "ctrl-d":
        child.sendeof()
        child.expect(pexpect.EOF)
    else:
        # CPython acts on a Ctrl-C when it interrupts the terminal read: one that lands between the prompt being
        # written and the read starting waits for the next key (seen once under a loaded CI run), so press it again,
        # as a user would.
        for _ in range(3):
            child.sendintr()
            if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=15) == 0:
                break
        else:
            pytest.fail(f"Ctrl-C pressed 3 times did not end the chat: {child.before[-300:]!r}")
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_each_turn_keeps_its_own_answer(micro, monkeypatch, capsys):
    import medllm.generation as generation

    model, tokenizer, template = micro
    inputs = iter(["问题一", "问题二", "问题三"])
    seen = []

    def fake_generate(model, tokenizer, template, conversations, **kwargs):
        seen.append([dict(m) for m in conversations[0]])
        return [f"回答{len(seen)}"]

    def read(_prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(generation, "generate_replies", fake_generate)
    generation.chat(model, tokenizer, template, system_prompt="你是医生", read=read, **GREEDY)
    assert seen[-1] == [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "问题一"},
                        {"role": "assistant", "content": "回答1"}, {"role": "user", "content": "问题二"},
                        {"role": "assistant", "content": "回答2"}, {"role": "user", "content": "问题三"}]
