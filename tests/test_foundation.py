"""The tiny-model builder, model loading and the argument parser."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_script
from medllm.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_args
from medllm.errors import MedLLMError


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path, tiny_model_dir):
    from medllm.tiny import build

    again = build(str(tmp_path / "again"), arch="glm", size="micro", seed=0)
    assert _digest(Path(again)) == _digest(Path(tiny_model_dir))
    other = build(str(tmp_path / "other"), arch="glm", size="micro", seed=1)
    assert _digest(Path(other))["model.safetensors"] != _digest(Path(again))["model.safetensors"]


def test_tiny_model_loads_and_generates(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "GlmForCausalLM"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "小孩发烧怎么办"}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    assert list(inputs.keys()) == ["input_ids", "attention_mask"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    generation = json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())
    stops = {tokenizer.convert_ids_to_tokens(i) for i in generation["eos_token_id"]}
    assert stops == {"<|user|>", "<|observation|>", "<|endoftext|>"}


def test_tokenizer_round_trips_chinese_and_special_tokens_are_single(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "患者，男，45岁，反复胸痛3天（活动后加重），心电图示ST段压低。"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    for token in ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    config = json.loads((Path(tiny_model_dir) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x


@pytest.mark.parametrize("arch,model_class", [("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_other_architectures(tmp_path, arch, model_class):
    from transformers import AutoModelForCausalLM

    from medllm.tiny import build

    model = AutoModelForCausalLM.from_pretrained(build(str(tmp_path / arch), arch=arch, size="micro"))
    assert type(model).__name__ == model_class


def _parse(argv):
    from transformers import TrainingArguments

    return parse_args(argv, ModelArguments, DataArguments, LoraArguments, RunArguments, TrainingArguments)


def test_family_flags_and_aliases(tmp_path):
    model, data, lora, run, training = _parse([
        "--model_type", "chatglm", "--model_name_or_path", "m", "--output_dir", str(tmp_path),
        "--evaluation_strategy", "steps", "--eval_steps", "5", "--overwrite_output_dir", "--lora_rank", "4",
        "--lora_alpha", "8", "--lora_dropout", "0.1", "--target_modules", "all", "--use_peft", "True",
        "--peft_path", "p", "--qlora", "False", "--cache_dir", "c", "--device_map", "auto", "--torch_dtype",
        "float32", "--model_max_length", "512", "--max_train_samples", "7", "--max_eval_samples", "3",
        "--preprocessing_num_workers", "2", "--template_name", "glm4", "--group_by_length", "True",
        "--neft_alpha", "5", "--fp16", "--bf16",
    ])
    assert training.eval_strategy == "steps" and training.eval_steps == 5
    assert run.overwrite_output_dir and training.train_sampling_strategy == "group_by_length"
    assert training.neftune_noise_alpha == 5
    assert not training.fp16 and not training.bf16  # set aside: no CUDA here
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.peft_path) == (4, 8, 0.1, "p")
    assert (data.model_max_length, data.max_train_samples, data.template_name) == (512, 7, "glm4")
    assert (model.model_type, model.cache_dir, model.device_map) == ("chatglm", "c", "auto")
    assert training.report_to == ["tensorboard"]


def test_half_dtype_falls_back_to_float32_without_cuda(tmp_path):
    model = _parse(["--torch_dtype", "float16", "--output_dir", str(tmp_path)])[0]
    assert model.torch_dtype == "float32"


def test_load_in_4bit_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(MedLLMError, match="need a CUDA GPU"):
        _parse(["--load_in_4bit", "True", "--output_dir", str(tmp_path)])


def test_unknown_and_abbreviated_flags_are_errors():
    for flag in ("--lora_rnk", "--lora_ran"):  # a typo, and a prefix argparse would otherwise accept
        result = run_script("-c", "import sys; from transformers import TrainingArguments; "
                            "from medllm.arguments import *; parse_args(sys.argv[1:], LoraArguments, "
                            "TrainingArguments)", "--output_dir", "x", flag, "4")
        assert result.returncode == 2
        assert flag in result.stderr


def test_model_type_mismatch_warns_and_loads_the_real_class(tiny_model_dir, caplog):
    from medllm.modeling import load_model

    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir, model_type="bloom"))
    assert type(model).__name__ == "GlmForCausalLM"
    assert "does not match config.json model_type 'glm'" in caplog.text


def test_model_folder_without_weights_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    from medllm.modeling import load_model

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MedLLMError, match="no weights"):
        load_model(ModelArguments(model_name_or_path=str(folder)))
    with pytest.raises(MedLLMError, match="model folder not found"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path / "missing")))


# --------------------------------------------------------------------------- LoRA dropout on a CPU

def test_cpu_dropout_drops_with_probability_p_and_keeps_the_expectation():
    import torch

    from medllm.dropout import RANDOM_BITS, CpuDropout

    torch.manual_seed(0)
    dropout = CpuDropout(0.05).train()
    inputs = torch.ones(1_000_000, requires_grad=True)
    outputs = dropout(inputs)
    dropped = (outputs == 0).double().mean().item()
    assert abs(dropped - 0.05) < 0.0015  # 7 standard deviations of a binomial share at n = 1e6
    kept = outputs[outputs != 0].unique()
    assert kept.tolist() == [pytest.approx(2 ** RANDOM_BITS / (2 ** RANDOM_BITS - round(0.05 * 2 ** RANDOM_BITS)),
                                           rel=1e-6)]
    assert outputs.mean().item() == pytest.approx(1.0, abs=0.002)
    upstream = torch.randn(1_000_000)
    outputs.backward(upstream)
    assert torch.equal(inputs.grad, upstream * (outputs != 0) * kept[0])  # the same mask, the same scale
    torch.manual_seed(0)
    assert torch.equal(dropout(inputs), outputs)  # torch's generator: a seed repeats the mask
    assert torch.equal(dropout.eval()(inputs), inputs)
    assert torch.equal(CpuDropout(0.0).train()(inputs), inputs)


def test_cpu_dropout_draws_every_element_alike():
    """Each 64-bit draw gives four elements: each of the four places must drop at p, the top one too (a draw of
    non-negative numbers only would never drop it)."""
    import torch

    from medllm.dropout import CpuDropout

    torch.manual_seed(1)
    for p in (0.05, 0.5, 0.9):
        outputs = CpuDropout(p).train()(torch.ones(400_000, 3))  # an odd width: places cut across rows
        dropped = (outputs.flatten() == 0).double().view(-1, 4).mean(dim=0)  # per place within a draw
        assert dropped.sub(p).abs().max().item() < 0.005, (p, dropped)  # 5 standard deviations at p = 0.5
    tiny_p = CpuDropout(2 ** -18).train()  # below the draws' resolution: nn.Dropout's own mask
    assert tiny_p(torch.ones(10)).eq(1 / (1 - 2 ** -18)).all()


def test_lora_layers_get_the_cpu_dropout(tiny_model_dir):
    import torch

    from medllm.arguments import LoraArguments, ModelArguments
    from medllm.dropout import CpuDropout
    from medllm.modeling import build_peft_model, load_model

    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    peft_model = build_peft_model(model, LoraArguments(use_peft=True, target_modules="all", lora_dropout=0.1))
    lora_layers = [m for m in peft_model.modules() if hasattr(m, "lora_A")]
    dropouts = [m.lora_dropout["default"] for m in lora_layers]
    assert lora_layers and all(type(d) is CpuDropout and d.p == 0.1 for d in dropouts)
    assert not any(type(m) is torch.nn.Dropout for m in peft_model.modules())
