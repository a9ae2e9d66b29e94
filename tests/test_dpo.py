"""Stage 3, DPO (dpo_training.py): both data layouts, cutting in tokens, the first-step loss, learning the
preferences, the issue's command line on one and two processes, and real MedicalGPT pairs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script

LN2 = math.log(2)
SAMPLE_PAIRS = str(REPO / "data" / "reward")

# (system, history [[question, answer]], question, chosen, rejected)
PAIRS = [
    ("你是一名耐心的全科医生。", [["头痛两天了怎么办？", "先注意休息，观察有无加重。"]], "还需要做检查吗？",
     "如果头痛持续或伴呕吐，建议做头颅CT检查。", "不用管，过几天就好。"),
    (None, [], "小孩发烧怎么办？", "多喝水，体温超过38.5℃可以服用退烧药。", "自己吃点抗生素就行。"),
]


def write_pairs(folder: Path, layout: str) -> Path:
    """PAIRS in the current (conversations/chosen/rejected) or legacy (question/response_*) layout."""
    folder.mkdir(parents=True)
    lines = []
    for system, history, question, chosen, rejected in PAIRS:
        if layout == "current":
            turns = [{"from": "system", "value": system}] if system else []
            for q, a in history:
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            turns.append({"from": "human", "value": question})
            record = {"conversations": turns, "chosen": chosen, "rejected": rejected}
        else:
            record = {"system": system or "", "history": history, "question": question,
                      "response_chosen": chosen, "response_rejected": rejected}
        lines.append(json.dumps(record, ensure_ascii=False))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer_and_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from medllm.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer, get_template("glm4", tokenizer)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models: one thread is faster than two when other work shares the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(argv: list[str]) -> dict:
    """Run dpo_training.main in this process (imports are paid once); returns its metrics."""
    sys.path.insert(0, str(REPO))
    import dpo_training

    return dpo_training.main([*argv, "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no"])


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


# --------------------------------------------------------------------------- tokenization

def test_both_layouts_give_identical_token_ids(tmp_path, tokenizer_and_template):
    from medllm.arguments import DataArguments
    from medllm.data import load_preference_pairs
    from medllm.preference import tokenize_pairs

    tokenizer, template = tokenizer_and_template
    tokenized = {}
    for layout in ("current", "legacy"):
        folder = write_pairs(tmp_path / layout, layout)
        pairs = load_preference_pairs(DataArguments(train_file_dir=str(folder)), need_eval=False)["train"]
        tokenized[layout] = tokenize_pairs(pairs.to_dict(), tokenizer, template)
    assert tokenized["current"] == tokenized["legacy"]

    first = tokenized["current"]
    assert tokenizer.decode(first["prompt_ids"][0]) == (
        "[gMASK]<sop><|system|>\n你是一名耐心的全科医生。<|user|>\n头痛两天了怎么办？<|assistant|>\n"
        "先注意休息，观察有无加重。<|user|>\n还需要做检查吗？<|assistant|>")
    assert tokenizer.decode(first["prompt_ids"][1]) == "[gMASK]<sop><|user|>\n小孩发烧怎么办？<|assistant|>"
    eot = tokenizer.convert_tokens_to_ids("<|user|>")
    for i, (_, _, _, chosen, rejected) in enumerate(PAIRS):  # replies end with the end-of-turn token
        assert first["chosen_ids"][i] == ids(tokenizer, "\n" + chosen) + [eot]
        assert first["rejected_ids"][i] == ids(tokenizer, "\n" + rejected) + [eot]
    assert first["truncated"] == [False, False]


def test_long_prompt_is_cut_from_the_left_and_replies_from_the_right(tokenizer_and_template):
    from medllm.preference import tokenize_pairs

    tokenizer, template = tokenizer_and_template
    question = "我最近反复胸痛，活动后加重，休息后缓解，" * 8 + "需要做什么检查？"
    batch = {"prompt": [[{"role": "user", "content": question}]],
             "chosen": ["建议尽快到心内科就诊，首选检查是心电图和心肌酶，必要时做冠脉造影。"], "rejected": ["不用管。"]}
    prompt = ids(tokenizer, template.generation_prompt(batch["prompt"][0]))
    chosen = ids(tokenizer, template.reply_text(batch["chosen"][0]))
    rejected = ids(tokenizer, template.reply_text(batch["rejected"][0]))
    assert len(prompt) > 40 and len(chosen) > 10 and len(rejected) <= 8

    out = tokenize_pairs(batch, tokenizer, template, max_source_length=24, max_target_length=8)
    assert out["prompt_ids"] == [prompt[-24:]]  # the end of the question and <|assistant|> stay
    assert out["prompt_ids"][0][-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert out["chosen_ids"] == [chosen[:8]]  # cut: it no longer ends with the end-of-turn token
    assert out["rejected_ids"] == [rejected]  # short enough: whole, end-of-turn included
    assert out["length"] == [24 + 8] and out["truncated"] == [True]

    # --max_length then cuts prompt + reply from the right (as trl does) ...
    out = tokenize_pairs(batch, tokenizer, template, max_source_length=24, max_target_length=8, max_length=28)
    assert out["prompt_ids"] == [prompt[-24:]]
    assert out["chosen_ids"] == [chosen[:4]] and out["rejected_ids"] == [rejected[:4]]
    # ... and a pair whose prompt alone fills it is dropped
    out = tokenize_pairs(batch, tokenizer, template, max_length=len(prompt))
    assert out["prompt_ids"] == []


def test_defaults_depend_on_lora_and_unknown_flags_are_errors():
    from unittest import mock

    import torch

    from medllm.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_args
    from medllm.preference import DPOArguments, apply_dpo_defaults

    def parsed(*flags: str, data: bool = False):
        argv = ["--output_dir", "/tmp/unused", *flags]
        model_args, data_args, lora_args, _, training_args = parse_args(
            argv, ModelArguments, DataArguments, LoraArguments, RunArguments, DPOArguments)
        apply_dpo_defaults(argv, training_args, data_args, lora_args, model_args)
        return data_args if data else training_args

    assert parsed().learning_rate == 5e-5  # LoRA
    assert parsed("--use_peft", "False").learning_rate == 5e-6
    assert parsed("--use_peft", "False", "--learning_rate", "1e-4").learning_rate == 1e-4
    assert parsed("--max_source_length", "1024", "--max_target_length", "512").max_length == 1536
    assert parsed("--max_source_length", "1024", "--max_target_length", "512", "--max_length", "600").max_length == 600
    assert parsed("--beta", "0.5", "--loss_type", "ipo").loss_type == ["ipo"]
    assert parsed("--trust_remote_code", "True").trust_remote_code is True
    assert parsed().bf16 is False  # trl's bf16 default is kept off a CPU
    with mock.patch.object(torch.accelerator, "is_available", return_value=False):
        assert parsed().gradient_checkpointing is False  # trl's default (on) is kept off a CPU too
    assert parsed("--gradient_checkpointing").gradient_checkpointing is True  # bare: on, as for any boolean flag
    assert parsed("--gradient_checkpointing", "False").gradient_checkpointing is False
    assert parsed("--activation_checkpointing", "True").gradient_checkpointing is True  # transformers' new name
    assert parsed("--padding_free", data=True).padding_free is True
    assert parsed("--padding_free", "false", data=True).padding_free is False
    assert parsed(data=True).padding_free is None  # worked out when the model is known
    for bad in (["--bogus", "1"], ["--max_len", "10"]):  # misspelt or abbreviated
        with pytest.raises(SystemExit) as error:
            parsed(*bad)
        assert error.value.code == 2


def test_gradient_checkpointing_defaults_on_only_where_an_accelerator_trains():
    from unittest import mock

    import torch

    from medllm.preference import DPOArguments

    def checkpointing(**kwargs) -> bool:
        args = DPOArguments(output_dir="/tmp/unused", report_to="none", **kwargs)
        assert args.activation_checkpointing == args.gradient_checkpointing  # what the Trainer reads
        return args.gradient_checkpointing

    with mock.patch.object(torch.accelerator, "is_available", return_value=False):
        assert checkpointing() is False
    with mock.patch.object(torch.accelerator, "is_available", return_value=True):
        assert checkpointing() is True  # trl's default, where it saves accelerator memory
        assert checkpointing(use_cpu=True) is False
        with mock.patch.dict(os.environ, {"ACCELERATE_USE_CPU": "true"}):
            assert checkpointing() is False
        assert checkpointing(gradient_checkpointing=False) is False
        assert checkpointing(activation_checkpointing=False) is False
    assert checkpointing(gradient_checkpointing=True) is True


# --------------------------------------------------------------------------- training

def test_lora_reference_is_the_base_with_the_adapter_off(tmp_path, tiny_model_dir):
    from medllm.arguments import LoraArguments, ModelArguments
    from medllm.modeling import build_peft_model, load_model, load_tokenizer
    from medllm.preference import DPOArguments, build_dpo_trainer
    from datasets import Dataset, DatasetDict

    model_args = ModelArguments(model_name_or_path=tiny_model_dir)
    model = build_peft_model(load_model(model_args), LoraArguments())
    pairs = Dataset.from_dict({"prompt_ids": [[2, 4, 7]], "chosen_ids": [[8, 9]], "rejected_ids": [[8]],
                               "length": [5], "truncated": [False]})
    args = DPOArguments(output_dir=str(tmp_path), report_to="none")
    trainer = build_dpo_trainer(model, None, load_tokenizer(model_args), args, DatasetDict(train=pairs),
                                fresh_adapter=True)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]


def test_cheap_reference_switch_runs_the_base_and_restores_the_policy(tiny_model_dir):
    import torch
    import trl.trainer.dpo_trainer as trl_dpo

    from medllm import logprobs
    from medllm.arguments import LoraArguments, ModelArguments
    from medllm.modeling import build_peft_model, load_model
    from medllm.preference import switch_to_the_reference_cheaply

    base = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    ids = torch.tensor([[2, 4, 7, 8, 9, 11]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = build_peft_model(base, LoraArguments(target_modules="all")).eval()
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a trained adapter: the policy is not the base
    model.get_base_model().gradient_checkpointing_enable()
    switch_to_the_reference_cheaply()
    switch_to_the_reference_cheaply()  # once is enough; a second call changes nothing
    assert trl_dpo.use_adapter.medllm_cheap
    assert trl_dpo.is_peft_model(model) and trl_dpo.is_peft_model(model) and not trl_dpo.is_peft_model(base)
    with torch.no_grad():
        policy_logits = model(input_ids=ids).logits
        with trl_dpo.disable_gradient_checkpointing(model), trl_dpo.use_adapter(model, adapter_name=None):
            assert not model.get_base_model().model.layers[0].gradient_checkpointing
            assert logprobs._scope.log_probs_only  # a reference pass scores the log-probs alone
            reference_logits = model(input_ids=ids).logits
        assert not logprobs._scope.log_probs_only
        with model.disable_adapter():  # peft's own switch
            peft_reference_logits = model(input_ids=ids).logits
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)
    assert torch.equal(reference_logits, peft_reference_logits)
    torch.testing.assert_close(reference_logits, base_logits)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and not any(layer.disable_adapters for layer in layers)  # the policy is back
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)
    with torch.no_grad(), trl_dpo.use_adapter(model, adapter_name="default"):  # a named adapter: trl's own path
        torch.testing.assert_close(model(input_ids=ids).logits, policy_logits)


@pytest.mark.parametrize("mode", ["lora", "full", "full_precomputed_reference"])
def test_first_step_loss_is_ln2(tmp_path, tiny_model_dir, mode):
    flags = {"lora": [], "full": ["--use_peft", "False"],
             "full_precomputed_reference": ["--use_peft", "False", "--precompute_ref_log_probs", "True"]}[mode]
    train(["--model_name_or_path", tiny_model_dir, "--template_name", "glm4", "--train_file_dir", SAMPLE_PAIRS,
           "--max_train_samples", "8", "--do_train", "--per_device_train_batch_size", "4", "--max_steps", "1",
           "--logging_steps", "1", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
           *flags])
    first = log_history(tmp_path / "out")[0]
    assert abs(first["loss"] - LN2) < 1e-3
    # the policy is the reference at the first step: no reward yet
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-4)


def test_short_run_learns_the_training_preferences(tmp_path, tiny_model_dir):
    metrics = train(["--model_name_or_path", tiny_model_dir, "--template_name", "glm4",
                     "--train_file_dir", SAMPLE_PAIRS, "--validation_file_dir", SAMPLE_PAIRS,
                     "--max_train_samples", "8", "--max_eval_samples", "8", "--do_train", "--do_eval",
                     "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_steps", "10",
                     "--learning_rate", "3e-3", "--logging_steps", "1", "--output_dir", str(tmp_path / "out"),
                     "--cache_dir", str(tmp_path / "cache")])
    # The validation pairs are the 8 training pairs (same files, same order, no shuffling).
    assert metrics["eval_rewards/accuracies"] > 0.8
    assert metrics["eval_rewards/margins"] > 0
    assert metrics["eval_loss"] < LN2 - 0.05
    history = [entry for entry in log_history(tmp_path / "out") if "loss" in entry]
    assert len(history) == 10 and history[-1]["rewards/margins"] > 0


def test_shared_prompt_backbone_gives_the_padded_log_probs_and_gradients(tiny_model_dir):
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from medllm.packing import VARLEN_ATTENTION, register_varlen_attention
    from medllm.preference import _pair_layout, _pair_layout_and_plan, share_common_prefixes

    torch.manual_seed(0)
    padded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    shared = copy.deepcopy(padded)
    register_varlen_attention()
    shared.set_attn_implementation(VARLEN_ATTENTION)
    share_common_prefixes(shared)
    for model in (padded, shared):
        add_fused_lm_head(model)
    # (prompt, chosen, rejected) lengths; the last pair's replies also share their first token, the third is equal
    shapes = [(30, 10, 15), (50, 20, 3), (7, 4, 4), (12, 5, 9)]
    rows, width = len(shapes), max(p + max(c, r) for p, c, r in shapes)
    input_ids = torch.zeros(2 * rows, width, dtype=torch.long)
    attention_mask, completion_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for pair, (p, c, r) in enumerate(shapes):
        prompt, chosen = torch.randint(5, 500, (p,)), torch.randint(5, 500, (c,))
        rejected = chosen[:r] if pair == 2 else torch.randint(5, 500, (r,))
        for row, reply in ((pair, chosen), (rows + pair, rejected)):
            input_ids[row, :p + len(reply)] = torch.cat([prompt, reply])
            attention_mask[row, :p + len(reply)] = 1
            completion_mask[row, p:p + len(reply)] = 1
    input_ids[rows + 3, 12] = input_ids[3, 12]
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    outputs = [model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                     use_cache=False) for model in (padded, shared)]
    assert (outputs[0].log_probs - outputs[1].log_probs).abs().max() < 1e-5
    for output in outputs:
        output.loss.backward()
    assert max((a.grad - b.grad).abs().max().item() for a, b in zip(padded.parameters(), shared.parameters())) < 1e-6
    flat_ids = _pair_layout(input_ids, attention_mask)[0]
    assert flat_ids.shape[1] == sum(p + c + r for p, c, r in shapes) - 4 - 1  # the equal pair's reply once, + 1 token
    assert _pair_layout(input_ids.flip(1), attention_mask.flip(1)) is None  # left padding: not this layout
    layout = _pair_layout_and_plan(input_ids, attention_mask)
    assert _pair_layout_and_plan(input_ids, attention_mask) is layout  # the policy pass reuses the reference's
    input_ids[0, 0] = input_ids[0, 0]  # written in place: worked out again
    assert _pair_layout_and_plan(input_ids, attention_mask) is not layout
    assert torch.equal(_pair_layout_and_plan(input_ids.clone(), attention_mask)[3], layout[3])


@pytest.mark.parametrize("budget", [None, 7 * 50])  # all logits kept / chunks of 7 tokens, recomputed backwards
def test_cpu_head_gives_trls_outputs_and_gradients(monkeypatch, budget):
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from medllm import logprobs
    from medllm.logprobs import CpuLogProbs

    if budget:
        monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(23, 16), torch.randn(50, 16), torch.randn(50)
    targets = torch.randint(0, 50, (23,))
    targets[3] = torch.argmax(hidden[3] @ weight.t() + bias)  # one target that is the top-1 token
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results, gradients = [], []
    for function in (ChunkedLogProbFunction, CpuLogProbs):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        per_token = function.apply(*leaves, targets, 0.7, 32768, None, 1.5, outputs)
        (per_token[0].sum() + 0.3 * per_token[1].sum()).backward()
        results.append(per_token)
        gradients.append([leaf.grad for leaf in leaves])
    for trl_output, ours in zip(*results):
        torch.testing.assert_close(ours, trl_output, rtol=1e-5, atol=1e-5)
    assert results[1][4][3] and results[1][4].sum() < 5  # is_top1 is not all true
    for trl_gradient, ours in zip(*gradients):
        torch.testing.assert_close(ours, trl_gradient, rtol=1e-5, atol=1e-5)


def test_trls_fused_head_runs_the_cpu_head_only_where_it_applies():
    import torch
    import trl.trainer.utils as trl_utils

    from medllm.logprobs import log_probs_only, use_fast_cpu_head

    use_fast_cpu_head()
    use_fast_cpu_head()  # once is enough
    assert trl_utils._use_triton(torch.device("cpu"))  # only labelled positions are scored
    hidden, weight, targets = torch.randn(5, 8, requires_grad=True), torch.randn(12, 8), torch.randint(0, 12, (5,))
    head = trl_utils._ChunkedLogProbFunction
    fast = head.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0]
    half = head.apply(hidden.bfloat16(), weight.bfloat16(), None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0]
    capped = head.apply(hidden, weight, None, targets, 1.0, 32768, 30.0, 1.0, ("log_probs",))[0]
    assert type(fast.grad_fn).__name__ == "CpuLogProbsBackward"
    assert {type(half.grad_fn).__name__, type(capped.grad_fn).__name__} == {"ChunkedLogProbFunctionBackward"}
    every_output = ("log_probs", "entropy", "mean_logits", "is_top1")
    for h, w in ((hidden, weight), (hidden.bfloat16(), weight.bfloat16())):  # ours and trl's function
        full = head.apply(h, w, None, targets, 1.0, 32768, None, 1.0, every_output)
        with log_probs_only():
            alone = head.apply(h, w, None, targets, 1.0, 32768, None, 1.0, every_output)
        assert all(x is not None for i, x in enumerate(full) if i != 2)  # [2] is log_sum_sq_probs, not asked for
        assert all(x is None for x in alone[1:])
        torch.testing.assert_close(alone[0], full[0])


def three_steps(model_dir: str, tmp_path: Path, samples: int = 12) -> list[str]:
    """Flags of a 3-step LoRA run on the sample pairs that logs every step's loss."""
    return ["--model_name_or_path", model_dir, "--template_name", "glm4", "--train_file_dir", SAMPLE_PAIRS,
            "--max_train_samples", str(samples), "--do_train", "--per_device_train_batch_size", "4", "--max_steps", "3",
            "--learning_rate", "3e-3", "--logging_steps", "1", "--cache_dir", str(tmp_path / "cache")]


def test_padding_free_dpo_trains_as_the_padded_one(tmp_path, tiny_model_dir):
    common = three_steps(tiny_model_dir, tmp_path)
    runs = {}
    for padding_free in ("False", "True"):
        metrics = train([*common, "--padding_free", padding_free, "--output_dir", str(tmp_path / padding_free)])
        runs[padding_free] = ([entry["loss"] for entry in log_history(tmp_path / padding_free) if "loss" in entry],
                              metrics)
    assert runs["False"][0] == pytest.approx(runs["True"][0], abs=1e-4)
    assert runs["False"][1]["train_pad_fraction"] > 0.05 and runs["True"][1]["train_pad_fraction"] == 0
    assert runs["True"][1]["train_computed_per_real_token"] < 0.8  # each sample prompt computed once


def test_torch_compile_compiles_each_layer_once_and_trains_as_eager(tmp_path, tiny_model_dir, caplog,
                                                                    count_compiled_graphs):
    """--torch_compile (dynamo's "eager" backend: the tracing without a C++ toolchain) compiles the decoder layers in
    place, with their shared-prompt attention left out: the number of graphs stops growing after the first steps
    (the whole model compiled by the Trainer was traced again at every batch), and the losses are eager's."""
    import medllm.preference

    common = three_steps(tiny_model_dir, tmp_path, samples=24)
    train([*common, "--output_dir", str(tmp_path / "eager")])
    graphs_per_step = count_compiled_graphs(medllm.preference)
    with caplog.at_level("INFO", logger="medllm.modeling"):
        train([*common, "--output_dir", str(tmp_path / "compiled"), "--torch_compile", "True",
               "--torch_compile_backend", "eager"])
    assert "--torch_compile: 2 decoder layers compiled" in caplog.text  # the micro model's two layers
    assert len(graphs_per_step) == 3 and graphs_per_step[0] > 0, graphs_per_step
    assert graphs_per_step[-1] == graphs_per_step[1], graphs_per_step
    losses = {run: [entry["loss"] for entry in log_history(tmp_path / run) if "loss" in entry]
              for run in ("eager", "compiled")}
    assert len(losses["compiled"]) == 3 and losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)


def test_command_line_of_the_issue_runs_as_written(tmp_path, tiny_model_dir):
    output = tmp_path / "glm4-dpo-v1"
    result = run_script(
        "dpo_training.py", "--model_type", "chatglm", "--model_name_or_path", tiny_model_dir, "--template_name",
        "glm4", "--train_file_dir", SAMPLE_PAIRS, "--validation_file_dir", SAMPLE_PAIRS,
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "1", "--do_train", "--do_eval",
        "--use_peft", "True", "--max_train_samples", "1000", "--max_eval_samples", "10", "--max_steps", "100",
        "--eval_steps", "20", "--save_steps", "50", "--max_source_length", "1024", "--max_target_length", "512",
        "--output_dir", str(output), "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.05", "--torch_dtype", "float16", "--fp16", "--report_to", "tensorboard",
        "--remove_unused_columns", "False", "--gradient_checkpointing", "True", "--evaluation_strategy", "steps",
        "--cache_dir", str(tmp_path / "cache"), env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for key in ("'loss'", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in console
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "checkpoint-50", "checkpoint-100", "eval_results.json"):
        assert (output / name).exists(), name
    assert not (output / "model.safetensors").exists()  # an adapter, not a second copy of the weights
    events = b"".join(p.read_bytes() for p in (output / "runs").rglob("events.out.tfevents.*"))
    for tag in (b"train/loss", b"train/rewards/accuracies", b"train/rewards/margins", b"eval/rewards/accuracies"):
        assert tag in events
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 100
    assert len([e for e in state["log_history"] if "eval_loss" in e]) == 5  # every 20 steps


def test_two_processes_share_the_data(tmp_path, tiny_model_dir):
    import subprocess

    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dpo_training.py",
         "--model_name_or_path", tiny_model_dir, "--template_name", "glm4", "--train_file_dir", SAMPLE_PAIRS,
         "--max_train_samples", "16", "--do_train", "--per_device_train_batch_size", "2", "--max_steps", "2",
         "--logging_steps", "1", "--output_dir", str(output), "--cache_dir", str(tmp_path / "cache"),
         "--report_to", "none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["log_history"][-1]["epoch"] == pytest.approx(0.5)  # 2 steps x 2 pairs x 2 processes of 16
    assert (output / "adapter_model.safetensors").is_file()


def test_real_medicalgpt_pairs_train(tmp_path, tiny_model_dir, shared_data):
    real = shared_data / "reward" / "dpo_zh_500.jsonl"
    if not real.is_file():
        pytest.skip(f"{real} is absent")
    metrics = train(["--model_name_or_path", tiny_model_dir, "--template_name", "glm4", "--train_file_dir", str(real),
                     "--max_train_samples", "16", "--do_train", "--per_device_train_batch_size", "4",
                     "--max_steps", "3", "--logging_steps", "1", "--max_source_length", "256",
                     "--max_target_length", "256", "--output_dir", str(tmp_path / "out"),
                     "--cache_dir", str(tmp_path / "cache")])
    losses = [entry["loss"] for entry in log_history(tmp_path / "out") if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - LN2) < 1e-3
    assert 0 <= metrics["train_pad_fraction"] < 1
