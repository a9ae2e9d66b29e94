"""Chat templates: golden glm4 strings, equality with the official jinja templates, and label spans."""

from __future__ import annotations

import pytest

from medllm.templates import TEMPLATES, get_template

SYSTEM = {"role": "system", "content": "你是一名谨慎的医生助手。"}
TURNS = [
    {"role": "user", "content": "小孩发烧怎么办？"},
    {"role": "assistant", "content": "多喝水，体温超过38.5℃可用退烧药。"},
    {"role": "user", "content": "需要去医院吗？"},
    {"role": "assistant", "content": "出现抽搐或精神差请立即就医。"},
]
CONVERSATIONS = {
    "single": TURNS[:2],
    "multi": TURNS,
    "single+system": [SYSTEM] + TURNS[:2],
    "multi+system": [SYSTEM] + TURNS,
}


@pytest.fixture(scope="module")
def tokenizers():
    from medllm.tiny import REPO_DATA_DIR, build_tokenizer

    return {arch: build_tokenizer(arch, 1024, REPO_DATA_DIR) for arch in ("glm", "qwen2", "llama")}


def test_glm4_golden_strings():
    glm4 = TEMPLATES["glm4"]
    assert glm4.render([SYSTEM] + TURNS) == (
        "[gMASK]<sop><|system|>\n你是一名谨慎的医生助手。<|user|>\n小孩发烧怎么办？<|assistant|>\n"
        "多喝水，体温超过38.5℃可用退烧药。<|user|>\n需要去医院吗？<|assistant|>\n出现抽搐或精神差请立即就医。"
    )
    assert glm4.generation_prompt(TURNS[:1]) == "[gMASK]<sop><|user|>\n小孩发烧怎么办？<|assistant|>"
    assert glm4.reply_text("好的") == "\n好的<|user|>"
    assert glm4.stop_strings == ["<|user|>", "<|observation|>", "<|endoftext|>"]


@pytest.mark.parametrize("name,arch", [("glm4", "glm"), ("qwen", "qwen2"), ("llama3", "llama")])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_render_equals_official_jinja(tokenizers, name, arch, case):
    tokenizer = tokenizers[arch]
    template = get_template(name, tokenizer)
    tokenizer.chat_template = template.jinja  # the official template, written independently of the renderer
    messages = CONVERSATIONS[case]
    assert template.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = messages[:-1]
    assert template.generation_prompt(prompt) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    encoded = template.encode(tokenizer, messages)["input_ids"]
    eot = [tokenizer.convert_tokens_to_ids(template.eot)] if template.eot else []
    assert encoded == list(ids) + eot


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generated_jinja_matches_renderer(tokenizers, name):
    """Templates without an official jinja still ship one that renders exactly as the Python template."""
    tokenizer = tokenizers[{"qwen": "qwen2", "llama3": "llama"}.get(name, "glm")]
    template = get_template(name, tokenizer)
    tokenizer.chat_template = template.to_jinja()
    for messages in CONVERSATIONS.values():
        assert template.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert template.generation_prompt(messages[:-1]) == tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True)


def test_glm4_labels_cover_replies_and_end_of_turn(tokenizers):
    tokenizer = tokenizers["glm"]
    glm4 = get_template("glm4", tokenizer)
    encoded = glm4.encode(tokenizer, [SYSTEM] + TURNS)
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert all(labels[i] == ids[i] for i in trained)
    text = tokenizer.decode([ids[i] for i in trained])
    assert text == "\n多喝水，体温超过38.5℃可用退烧药。<|user|>\n出现抽搐或精神差请立即就医。<|user|>"
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == user and labels[-1] == user
    assert labels[: len(tokenizer(glm4.generation_prompt([SYSTEM] + TURNS[:1]), add_special_tokens=False)
                        ["input_ids"])] == [-100] * len(
        tokenizer(glm4.generation_prompt([SYSTEM] + TURNS[:1]), add_special_tokens=False)["input_ids"])


def test_truncation_keeps_whole_turns(tokenizers):
    tokenizer = tokenizers["glm"]
    glm4 = get_template("glm4", tokenizer)
    full = glm4.encode(tokenizer, TURNS)
    first = glm4.encode(tokenizer, TURNS[:2])
    assert glm4.encode(tokenizer, TURNS, max_length=len(full["input_ids"]) - 1) == first
    assert glm4.encode(tokenizer, TURNS, max_length=len(first["input_ids"]) - 1) is None


def test_train_on_inputs_labels_everything(tokenizers):
    tokenizer = tokenizers["glm"]
    encoded = get_template("glm4", tokenizer).encode(tokenizer, TURNS, train_on_inputs=True)
    assert encoded["labels"] == encoded["input_ids"]


def test_unknown_template_is_a_clear_error():
    from medllm.errors import MedLLMError

    with pytest.raises(MedLLMError, match="'nope' does not exist; choose one of: glm4"):
        get_template("nope")


def test_tokenizer_template_fallback_finds_reply_spans(tokenizers):
    tokenizer = tokenizers["qwen2"]
    tokenizer.chat_template = TEMPLATES["qwen"].jinja.replace("You are a helpful assistant.", "Be brief.")
    template = get_template(None, tokenizer)
    assert template.name == "tokenizer"
    encoded = template.encode(tokenizer, TURNS[:2])
    trained = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "多喝水，体温超过38.5℃可用退烧药。<|im_end|>\n"
