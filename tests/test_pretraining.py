"""Continued pretraining: packing rows, packed loss equal to separate documents, and end-to-end runs of
pretraining.py (LoRA, full parameters, torchrun on CPU) on the micro model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from conftest import REPO, run_script

PT_FLAGS = [  # the MedicalGPT-style flag list of run_pt.sh, shrunk to test size
    "--model_type", "auto", "--train_file_dir", "data/pretrain", "--validation_file_dir", "data/pretrain",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--do_train", "--do_eval",
    "--seed", "42", "--max_eval_samples", "10", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
    "--logging_strategy", "steps", "--logging_steps", "1", "--save_strategy", "no", "--block_size", "128",
    "--group_by_length", "True", "--overwrite_output_dir", "--logging_first_step", "True",
    "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
    "--torch_dtype", "bfloat16", "--bf16", "--report_to", "tensorboard", "--gradient_checkpointing", "True",
]


def losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def check_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# --------------------------------------------------------------------------- packing (no model)

def test_pack_documents_golden():
    from medllm.packing import pack_documents, split_documents

    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4)
    assert rows["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert rows["position_ids"] == [[0, 1, 2, 0], [0, 0, 1, 2], [0]]  # restart per document and per row
    assert rows["length"] == [4, 4, 1]  # the short last row is kept: nothing is dropped
    assert split_documents([[1, 2, 3, 4, 5], [6]], 2)["input_ids"] == [[1, 2], [3, 4], [5], [6]]


def test_collator_masks_and_labels():
    import torch

    from medllm.packing import IGNORE_INDEX, CausalLMCollator

    features = [{"input_ids": [11, 12, 13, 21, 22], "position_ids": [0, 1, 2, 0, 1]},
                {"input_ids": [31, 32, 33], "position_ids": [0, 1, 2]}]
    batch = CausalLMCollator(pad_token_id=0, attn_implementation="sdpa")(features)
    assert batch["num_real_tokens"] == 8
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22],
                                        [IGNORE_INDEX, 32, 33, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    allowed = batch["attention_mask"][0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"][1, 0, 3:, :3].sum() == 0  # padding neither sees nor is seen by real tokens
    eager = CausalLMCollator(pad_token_id=0, attn_implementation="eager")(features)["attention_mask"]
    assert eager.dtype == torch.float32 and eager[0, 0, 3, 2] == torch.finfo(torch.float32).min
    flash = CausalLMCollator(pad_token_id=0, attn_implementation="flash_attention_2")(features)
    assert "attention_mask" not in flash and flash["position_ids"].shape == (2, 5)
    padded = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and "position_ids" not in padded
    assert padded["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_lose_as_separate(tiny_model_dir, attn):
    """Two documents in one row give each the loss it has when run alone (float32)."""
    import torch
    from torch.nn.functional import cross_entropy
    from transformers import AutoModelForCausalLM

    from medllm.packing import CausalLMCollator, pack_documents

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    doc_a = torch.randint(10, 1000, (23,), generator=generator).tolist() + [0]
    doc_b = torch.randint(10, 1000, (17,), generator=generator).tolist() + [0]
    rows = pack_documents([doc_a, doc_b], block_size=len(doc_a) + len(doc_b))
    batch = CausalLMCollator(0, attn)([{"input_ids": rows["input_ids"][0], "position_ids": rows["position_ids"][0]}])
    batch.pop("num_real_tokens")
    with torch.no_grad():
        packed = model(**batch)
        logits = packed.logits[0]
        alone = [model(torch.tensor([doc])).logits[0] for doc in (doc_a, doc_b)]
    n_a = len(doc_a)
    for doc, packed_logits, alone_logits in [(doc_a, logits[:n_a], alone[0]), (doc_b, logits[n_a:], alone[1])]:
        target = torch.tensor(doc[1:])
        packed_loss = cross_entropy(packed_logits[:-1], target)
        alone_loss = cross_entropy(alone_logits[:-1], target)
        assert abs(packed_loss.item() - alone_loss.item()) < 1e-4
    summed = (cross_entropy(alone[0][:-1], torch.tensor(doc_a[1:]), reduction="sum")
              + cross_entropy(alone[1][:-1], torch.tensor(doc_b[1:]), reduction="sum"))
    separate_mean = summed / (n_a - 1 + len(doc_b) - 1)
    assert abs(packed.loss.item() - separate_mean.item()) < 1e-4  # no loss across the document boundary


@pytest.mark.parametrize("reduction", [{}, {"num_items_in_batch": 23}, {"num_items_in_batch": "tensor"},
                                       {"shift_labels": True}])
def test_cpu_cross_entropy_equals_transformers_loss(monkeypatch, reduction):
    """The CPU loss gives transformers' ForCausalLMLoss's value and gradients, over several chunks, with ignored
    labels (a whole row of them too), each reduction and precomputed shift_labels."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from medllm import logprobs

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 50)  # 3 tokens a chunk: 24 chunks of 72 tokens
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 36, 16, generator=generator, requires_grad=True)
    head = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (2, 36), generator=generator)
    labels[0, :5] = labels[1, 30:] = -100
    kwargs = dict(reduction)
    if kwargs.get("num_items_in_batch") == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(23)
    if kwargs.pop("shift_labels", False):
        kwargs["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
        labels = torch.full_like(labels, 7)  # ignored when shift_labels are given
    results = []
    for loss_function in (ForCausalLMLoss, logprobs.causal_lm_loss):
        hidden.grad = head.grad = None
        loss = loss_function(hidden @ head.t(), labels, 50, **kwargs)
        (loss * 3.7).backward()  # a loss gradient other than 1, as under gradient accumulation
        results.append((loss.item(), hidden.grad.clone(), head.grad.clone()))
    assert type(loss.grad_fn).__name__ == "CpuCrossEntropyBackward"  # the CPU loss ran, not transformers'
    (stock, stock_hidden, stock_head), (fast, fast_hidden, fast_head) = results
    assert fast == pytest.approx(stock, rel=1e-6)
    assert torch.allclose(fast_hidden, stock_hidden, atol=1e-6) and torch.allclose(fast_head, stock_head, atol=1e-6)
    assert stock_hidden[0, :4].abs().sum() == 0 and fast_hidden[1, 29:].abs().sum() == 0  # ignored: no gradient


def test_cpu_cross_entropy_edge_cases():
    """No label at all gives zero gradients (as transformers' loss does), and a caller's own leaf logits are
    not overwritten by the backward pass."""
    import torch

    from medllm.logprobs import causal_lm_loss

    logits = torch.randn(1, 6, 10, requires_grad=True)
    before = logits.detach().clone()
    loss = causal_lm_loss(logits, torch.full((1, 6), -100), 10)
    loss.backward()
    assert type(loss.grad_fn).__name__ == "CpuCrossEntropyBackward"
    assert logits.grad.abs().sum() == 0 and torch.equal(logits.detach(), before)
    labels = torch.randint(0, 10, (1, 6))
    loss = causal_lm_loss(logits, labels, 10)
    loss.backward()
    assert torch.equal(logits.detach(), before) and logits.grad.abs().sum() > 0


def test_cpu_cross_entropy_is_the_models_loss_on_a_cpu(tiny_model_dir):
    """use_fast_cpu_loss gives a (peft) causal LM the CPU loss, whose forward and backward match the stock one;
    logits other than float32 go to transformers' loss."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    from medllm.arguments import LoraArguments
    from medllm.logprobs import causal_lm_loss, use_fast_cpu_loss
    from medllm.modeling import build_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = build_peft_model(model, LoraArguments(use_peft=True, target_modules="all", lora_dropout=0.0))
    input_ids = torch.randint(10, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    results = []
    for install in (False, True):
        if install:
            assert use_fast_cpu_loss(peft_model) and model.loss_function is causal_lm_loss
        peft_model.zero_grad()
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert (type(loss.grad_fn).__name__ == "CpuCrossEntropyBackward") == install
        results.append((loss.item(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
    logits, labels = torch.randn(1, 5, 1024, dtype=torch.bfloat16), torch.randint(0, 1024, (1, 5))
    assert torch.equal(causal_lm_loss(logits, labels, 1024), ForCausalLMLoss(logits, labels, 1024))  # not float32
    model.loss_function = lambda *args, **kwargs: None  # a model's own loss is kept
    assert not use_fast_cpu_loss(model)


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("pt") / "lora"
    cache = output.parent / "cache"
    result = run_script("pretraining.py", "--model_name_or_path", tiny_model_dir, *PT_FLAGS,
                        # LoRA alone barely moves a random model's logits (frozen small lm_head after a
                        # norm), so the head is trained in full too: this also covers --modules_to_save.
                        "--modules_to_save", "lm_head",
                        "--max_steps", "30", "--learning_rate", "5e-3", "--max_train_samples", "400",
                        "--eval_strategy", "no", "--output_dir", str(output), "--cache_dir", str(cache),)
    check_ok(result)
    return output, cache, result


def test_lora_pretraining_learns_and_saves(lora_run, tiny_model_dir):
    output, _, result = lora_run
    history = losses(output)
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert len(history) == 30
    assert first - last > 0.7, history  # a random micro model starts near ln(1024) = 6.93
    assert "--bf16 set aside" in result.stderr and "--torch_dtype bfloat16 set aside" in result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (output / name).is_file(), name
    assert list((output / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log under output_dir/runs"
    assert not (output / ".final.tmp").exists()
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=1e-9)
    train = json.loads((output / "train_results.json").read_text())
    fed = 30 * 4 * 128  # steps x rows x block_size
    assert 0.95 * fed <= train["train_real_tokens"] <= fed  # packed rows are full (but for one short last row)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(output))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the trained adapter, not a fresh one (B starts at 0)
    from safetensors.torch import load_file

    original_head = load_file(os.path.join(tiny_model_dir, "model.safetensors"))["lm_head.weight"]
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert not torch.equal(trained_head, original_head)  # --modules_to_save lm_head was trained and saved


def test_full_parameters_change_weights_and_reuse_cache(lora_run, tiny_model_dir):
    from safetensors.torch import load_file

    output, cache, _ = lora_run
    full = output.parent / "full"
    result = run_script("pretraining.py", "--model_name_or_path", tiny_model_dir, *PT_FLAGS,
                        "--use_peft", "False", "--max_steps", "3", "--learning_rate", "1e-3",
                        "--max_train_samples", "400", "--eval_strategy", "no", "--output_dir", str(full),
                        "--cache_dir", str(cache))
    check_ok(result)
    assert "pretrain train rows: using the cached result" in result.stderr  # tokenized once, by the LoRA run
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(full / "model.safetensors"))
    changed = [name for name in before if not (before[name] == after[name]).all()]
    assert len(changed) > len(before) // 2, changed
    assert not (full / "adapter_config.json").exists()


def test_torchrun_two_processes_on_cpu(tiny_model_dir, tmp_path):
    """run_pt.sh with NPROC=2: gloo DDP on CPU, a short run that evaluates and saves."""
    output = tmp_path / "ddp"
    env = {"MODEL": tiny_model_dir, "OUTPUT_DIR": str(output), "NPROC": "2", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHON": str(Path(os.sys.executable))}
    import subprocess

    result = subprocess.run(
        ["bash", str(REPO / "run_pt.sh"), "--max_steps", "2", "--block_size", "64", "--max_train_samples", "64",
         "--eval_steps", "2", "--cache_dir", str(tmp_path / "cache"), "--gradient_checkpointing", "False"],
        cwd=REPO, env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    check_ok(result)
    assert (output / "adapter_model.safetensors").is_file()
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert math.isfinite(evaluation["eval_loss"])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    fed = 2 * 2 * 4 * 64  # steps x processes x rows x block_size: both processes trained, on different rows
    assert 0.9 * fed <= json.loads((output / "train_results.json").read_text())["train_real_tokens"] <= fed


def test_torch_compile_compiles_each_layer_once_and_trains_as_eager(tiny_model_dir, tmp_path, count_compiled_graphs):
    """--torch_compile on packed rows of more than 512 tokens (dynamo's "eager" backend, no C++ toolchain needed):
    the per-document attention stays out of the compiled layers, so a new arrangement of documents compiles
    nothing new after the first steps, and the losses are eager's."""
    import medllm.causal_lm
    import pretraining

    common = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(REPO / "data" / "pretrain"),
              "--do_train", "--per_device_train_batch_size", "4", "--block_size", "256", "--packing", "True",
              "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "True", "--cache_dir", str(tmp_path / "cache")]
    pretraining.main([*common, "--output_dir", str(tmp_path / "eager")])
    graphs_per_step = count_compiled_graphs(medllm.causal_lm)
    pretraining.main([*common, "--output_dir", str(tmp_path / "compiled"), "--torch_compile", "True",
                      "--torch_compile_backend", "eager"])
    assert len(graphs_per_step) == 3 and graphs_per_step[0] > 0, graphs_per_step
    assert graphs_per_step[-1] == graphs_per_step[1], graphs_per_step  # after the recompile for dynamic shapes
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)
