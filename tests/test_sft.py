"""Supervised fine-tuning: golden label masks, truncation and dropping, packed loss equal to unpacked, and
end-to-end runs of supervised_finetuning.py / run_sft.sh on the micro model."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_script

IGNORE = -100
# Special-token ids of the tiny GLM-4 tokenizer (medllm/tiny.py: fixed order, independent of the corpus).
GMASK, SOP, SYSTEM, USER, ASSISTANT = 2, 4, 6, 7, 8
CONVERSATION = [
    {"role": "system", "content": "你是医生。"},
    {"role": "user", "content": "发烧怎么办？"},
    {"role": "assistant", "content": "多喝水。"},
    {"role": "user", "content": "要去医院吗？"},
    {"role": "assistant", "content": "高烧请就医。"},
]
SFT_FLAGS = [  # the MedicalGPT-style flag list of run_sft.sh, shrunk to test size
    "--model_type", "chatglm", "--train_file_dir", "data/finetune", "--validation_file_dir", "data/finetune",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--do_train", "--do_eval",
    "--template_name", "glm4", "--use_peft", "True", "--max_eval_samples", "10", "--warmup_ratio", "0.05",
    "--weight_decay", "0.05", "--logging_strategy", "steps", "--logging_steps", "1", "--eval_strategy", "no",
    "--save_strategy", "no", "--overwrite_output_dir", "--logging_first_step", "True", "--target_modules", "all",
    "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--torch_dtype", "float16", "--fp16",
    "--report_to", "tensorboard", "--gradient_checkpointing", "True",
]


def check_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows_for(conversations, tokenizer, tmp_path, **data_flags):
    """tokenize_conversations on an in-memory dataset, as supervised_finetuning.py calls it."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from medllm.arguments import DataArguments, ModelArguments
    from medllm.causal_lm import tokenize_conversations
    from medllm.templates import get_template

    data_args = DataArguments(template_name="glm4", **data_flags)
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    model_args = ModelArguments(cache_dir=str(tmp_path / "cache"))
    dialogues = {"train": Dataset.from_list([{"messages": m} for m in conversations])}
    template = get_template("glm4", tokenizer)
    return tokenize_conversations(dialogues, tokenizer, template, data_args, model_args, training_args)["train"]


# --------------------------------------------------------------------------- labels

def test_golden_label_mask_two_turns_with_system(tokenizer, tmp_path):
    def text(s):
        return tokenizer("\n" + s, add_special_tokens=False)["input_ids"]

    assert tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]) == \
        [GMASK, SOP, SYSTEM, USER, ASSISTANT]
    system, q1, a1, q2, a2 = (text(m["content"]) for m in CONVERSATION)
    expected_ids = [GMASK, SOP, SYSTEM, *system, USER, *q1, ASSISTANT, *a1, USER, *q2, ASSISTANT, *a2, USER]
    expected_labels = ([IGNORE] * (3 + len(system) + 1 + len(q1) + 1) + a1 + [USER]
                       + [IGNORE] * (len(q2) + 1) + a2 + [USER])  # each reply + its end-of-turn <|user|>
    row = rows_for([CONVERSATION], tokenizer, tmp_path, packing=False)[0]
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    everything = rows_for([CONVERSATION], tokenizer, tmp_path, packing=False, train_on_inputs=True)[0]
    assert everything["labels"] == expected_ids


def test_truncation_keeps_whole_turns_and_drops_what_cannot_fit(tokenizer, tmp_path, caplog):
    full = rows_for([CONVERSATION], tokenizer, tmp_path, packing=False)[0]["input_ids"]
    first_turn_end = full.index(USER, full.index(ASSISTANT)) + 1  # just past the first reply's <|user|>
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好。"}]
    with caplog.at_level(logging.INFO):
        rows = rows_for([CONVERSATION, short], tokenizer, tmp_path, packing=False,
                        model_max_length=len(full) - 1)
    assert rows[0]["input_ids"] == full[:first_turn_end]  # the second turn did not fit: cut at a turn boundary
    assert "1 dialogue(s) cut" in caplog.text
    with caplog.at_level(logging.INFO):
        rows = rows_for([CONVERSATION, short], tokenizer, tmp_path, packing=False,
                        model_max_length=first_turn_end - 1)
    assert len(rows) == 1 and rows[0]["input_ids"][-1] == USER  # only the short dialogue is left
    assert "dropped 1 of 2 dialogue(s)" in caplog.text


def test_packed_rows_restart_positions_and_mask_boundaries(tokenizer, tmp_path):
    from medllm.packing import CausalLMCollator

    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好。"}]
    single = rows_for([CONVERSATION, short], tokenizer, tmp_path, packing=False)
    packed = rows_for([CONVERSATION, short], tokenizer, tmp_path, packing=True, model_max_length=512)
    assert len(packed) == 1
    row = packed[0]
    assert row["input_ids"] == single[0]["input_ids"] + single[1]["input_ids"]
    n = len(single[0]["input_ids"])
    assert row["position_ids"] == list(range(n)) + list(range(len(single[1]["input_ids"])))
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)([row])
    assert batch["labels"][0, n] == IGNORE  # the second dialogue's [gMASK] is not predicted from the first
    assert not batch["attention_mask"][0, 0, n:, :n].any()  # and does not see it


# --------------------------------------------------------------------------- packed == unpacked

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_model_dir, tokenizer, tmp_path, attn):
    import torch
    from transformers import AutoModelForCausalLM

    from medllm.data import find_data_files, parse_conversation_record, read_records
    from medllm.packing import CausalLMCollator

    records = read_records(find_data_files(str(REPO / "data" / "finetune")), parse_conversation_record, False)[:6]
    conversations = [r["messages"] for r in records]
    unpacked = rows_for(conversations, tokenizer, tmp_path, packing=False)
    packed = rows_for(conversations, tokenizer, tmp_path, packing=True, model_max_length=4096)
    assert len(packed) == 1 and sum(packed["length"]) == sum(unpacked["length"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    collate = CausalLMCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attn)
    padded_batch, packed_batch = collate(list(unpacked)), collate(list(packed))
    assert padded_batch.pop("num_real_tokens") == packed_batch.pop("num_real_tokens")
    # The Trainer divides the summed loss by the number of target tokens (labels[..., 1:] != -100): equal too.
    assert (padded_batch["labels"][:, 1:] != IGNORE).sum() == (packed_batch["labels"][:, 1:] != IGNORE).sum()
    with torch.no_grad():
        padded_loss = model(**padded_batch).loss.item()
        packed_loss = model(**packed_batch).loss.item()
    assert abs(padded_loss - packed_loss) < 1e-4, (padded_loss, packed_loss)


def test_padding_free_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, tokenizer, tmp_path):
    """One padding-free row (sdpa_varlen, the head only where there is a label) == one dialogue per padded row."""
    import torch
    from transformers import AutoModelForCausalLM

    from medllm.data import find_data_files, parse_conversation_record, read_records
    from medllm.packing import VARLEN_ATTENTION, CausalLMCollator, register_varlen_attention

    records = read_records(find_data_files(str(REPO / "data" / "finetune")), parse_conversation_record, False)
    conversations = [r["messages"] for r in records[-6:]]  # dialogues of several lengths, some multi-turn
    unpacked = rows_for(conversations, tokenizer, tmp_path, packing=False)
    packed = rows_for(conversations, tokenizer, tmp_path, packing=True, model_max_length=300)
    assert len(packed) > 1 and len(set(unpacked["length"])) > 1
    register_varlen_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False

    def loss_and_grads(batch):
        batch.pop("num_real_tokens")
        model.zero_grad()
        outputs = model(**batch)
        outputs.loss.backward()
        return outputs, outputs.loss.item(), [p.grad.clone() for p in model.parameters()]

    _, padded_loss, padded_grads = loss_and_grads(CausalLMCollator(tokenizer.pad_token_id, "sdpa")(list(unpacked)))
    model.set_attn_implementation(VARLEN_ATTENTION)
    targets = sum(sum(label != IGNORE for label in row["labels"][1:]) for row in unpacked)
    for rows in (unpacked, packed):  # a batch of single dialogues, and of packed rows
        batch = CausalLMCollator(tokenizer.pad_token_id, VARLEN_ATTENTION, select_logits=True)(list(rows))
        assert batch["input_ids"].shape == (1, sum(unpacked["length"]))  # no padding at all
        outputs, loss, grads = loss_and_grads(batch)
        assert outputs.logits.shape[1] == targets  # the head ran on the reply tokens only
        assert abs(loss - padded_loss) < 1e-5, (loss, padded_loss)
        assert max((a - b).abs().max().item() for a, b in zip(grads, padded_grads)) < 1e-5


# rows of up to ONE_CALL_TOKENS: one masked call; longer rows: batches of documents of similar sizes
@pytest.mark.parametrize("lengths", [[30, 28, 35, 31], [120, 5, 9, 3, 40], [300, 150, 9, 90]])
def test_varlen_attention_equals_each_document_alone(lengths):
    import types

    import torch
    from transformers import AttentionInterface

    from medllm.packing import ONE_CALL_TOKENS, VARLEN_ATTENTION, AttentionPlan, register_varlen_attention

    register_varlen_attention()
    attend = AttentionInterface()[VARLEN_ATTENTION]
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    torch.manual_seed(0)
    total = sum(lengths)
    query, key, value = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    output, _ = attend(module, query, key, value, None, scaling=0.35, cu_seq_lens_q=bounds)
    assert output.shape == (1, total, 4, 8)
    assert (AttentionPlan.for_documents(bounds).mask is None) == (total > ONE_CALL_TOKENS)  # the path taken
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end].repeat_interleave(2, 1),
            value[:, :, start:end].repeat_interleave(2, 1), is_causal=True, scale=0.35)
        assert torch.allclose(output[0, start:end], alone[0].transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("one_call_tokens", [0, 512])  # per-segment batches; one masked call over the row
def test_attention_plan_equals_each_segment_alone(one_call_tokens):
    """Segments that see a prefix (DPO's rejected replies) and documents of mixed sizes, by either path of the plan:
    outputs equal each segment's attention alone, and gradients equal the other path's."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from medllm.packing import AttentionPlan

    # (prompt, chosen rest, rejected rest) laid out as prompt + chosen, then the rejected rest, one pair after another
    segments, start = [], 0
    for prompt, chosen, rejected in [(30, 10, 15), (50, 20, 3), (7, 4, 0), (12, 5, 9), (3, 60, 1)]:
        first_end = start + prompt + chosen
        segments += [(start, first_end, ((start, first_end),)),
                     (first_end, first_end + rejected, ((start, start + prompt), (first_end, first_end + rejected)))]
        start = first_end + rejected
    plan = AttentionPlan(segments, one_call_tokens=one_call_tokens)
    if one_call_tokens:
        assert plan.mask.shape == (1, 1, start, start) and not plan.batches
        alone = torch.zeros(11, start, dtype=torch.bool)  # the pair (7, 4, 0) at 128..139: causal over itself alone
        alone[:, 128:139] = torch.ones(11, 11, dtype=torch.bool).tril()
        assert torch.equal(plan.mask[0, 0, 128:139], alone)
        assert int(plan.mask.sum()) == sum((e - s) * (sum(b - a for a, b in r) - (e - s) + (e - s + 1) / 2)
                                           for s, e, r in segments)
    else:
        assert plan.mask is None and 2 < len(plan.batches) < len(segments) - 1  # batched, and put back in order
        assert len(plan.take) == len(set(plan.take.tolist())) == start  # one output slot per row position
        in_order = AttentionPlan([(0, 4, ((0, 4),)), (4, 8, ((4, 8),))], one_call_tokens=0)
        assert len(in_order.batches) == 1 and in_order.take is None  # one batch, no padding: nothing to gather
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    torch.manual_seed(0)
    states = [torch.randn(1, heads, start, 8, requires_grad=True) for heads in (4, 2, 2)]
    query, key, value = states
    output = plan.attend(sdpa_attention_forward, module, query, key, value, scaling=0.35)
    assert output.shape == (1, start, 4, 8)
    for query_start, query_end, key_ranges in segments:
        if query_end == query_start:
            continue
        keys = torch.cat([torch.arange(a, b) for a, b in key_ranges])
        q_len, k_len = query_end - query_start, len(keys)
        visible = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, query_start:query_end], key[:, :, keys].repeat_interleave(2, 1),
            value[:, :, keys].repeat_interleave(2, 1), attn_mask=visible, scale=0.35)
        assert torch.allclose(output[0, query_start:query_end], alone[0].transpose(0, 1), atol=1e-5)
    weights = torch.randn(output.shape)
    grads = torch.autograd.grad((output * weights).sum(), states)
    other = AttentionPlan(segments, one_call_tokens=512 - one_call_tokens)
    other_grads = torch.autograd.grad((other.attend(sdpa_attention_forward, module, *states, scaling=0.35)
                                       * weights).sum(), states)
    assert max((a - b).abs().max().item() for a, b in zip(grads, other_grads)) < 1e-5


# --------------------------------------------------------------------------- end to end

def test_sft_learns_and_saves_the_chat_template(tiny_model_dir, tmp_path):
    output = tmp_path / "sft"
    result = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, *SFT_FLAGS,
                        # LoRA alone barely moves a random model's logits; train the head too (--modules_to_save).
                        "--modules_to_save", "lm_head", "--max_train_samples", "400", "--model_max_length", "256",
                        "--max_steps", "30", "--learning_rate", "5e-3", "--output_dir", str(output),
                        "--cache_dir", str(tmp_path / "cache"))
    check_ok(result)
    assert "--fp16 set aside" in result.stderr and "--torch_dtype float16 set aside" in result.stderr
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.7, losses
    assert all(entry["real_tokens_per_second"] > 0 for entry in history if "loss" in entry and entry["step"] > 1)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (output / name).is_file(), name
    assert list((output / "runs").rglob("events.out.tfevents.*"))
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=1e-9)

    from transformers import AutoTokenizer

    from medllm.templates import TEMPLATES

    assert AutoTokenizer.from_pretrained(str(output)).chat_template == TEMPLATES["glm4"].to_jinja()


def test_run_sft_sh_under_torchrun_on_cpu(tiny_model_dir, tmp_path):
    """The issue's command (run_sft.sh), pointed at the micro model, under torchrun with 2 CPU processes."""
    output = tmp_path / "ddp"
    env = dict(os.environ, MODEL=tiny_model_dir, OUTPUT_DIR=str(output), NPROC="2", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(["bash", str(REPO / "run_sft.sh"), "--max_steps", "2", "--eval_steps", "2",
                             "--cache_dir", str(tmp_path / "cache")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    check_ok(result)
    assert (output / "adapter_model.safetensors").is_file()
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    rows = json.loads((output / "train_results.json").read_text())["train_rows"]
    assert state["epoch"] == pytest.approx(2 / math.ceil(rows / (2 * 2)))  # DDP: 2 processes x 2 rows per step
    assert math.isfinite(json.loads((output / "eval_results.json").read_text())["eval_loss"])


def test_real_sharegpt_file_trains(shared_data, tiny_model_dir, tmp_path):
    output = tmp_path / "sharegpt"
    result = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, *SFT_FLAGS,
                        "--train_file_dir", str(shared_data / "sft"), "--do_eval", "False",
                        "--max_train_samples", "60", "--model_max_length", "512", "--max_steps", "3",
                        "--learning_rate", "1e-3", "--output_dir", str(output), "--cache_dir", str(tmp_path / "c"),)
    check_ok(result)
    losses = [e["loss"] for e in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
