"""merge_peft_adapter.py: merged logits equal base + adapter; bad adapters, interruptions and occupied
output folders leave nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_script

import merge_peft_adapter
from medllm.errors import MedLLMError

PROBE_IDS = [[2, 4, 7, 100, 200, 300, 8, 9, 10, 11], [2, 4, 6, 500, 600, 7, 400, 8, 3, 1]]


def make_adapter(base: str, out: Path, *, modules_to_save=None, new_tokens=(), seed: int = 0) -> str:
    """A LoRA adapter on every linear layer of ``base`` with random non-zero B weights (so merging changes logits).

    ``new_tokens`` are added to the tokenizer and embeddings (saved with the adapter, as training does).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if new_tokens:
        tokenizer.add_tokens(list(new_tokens))
        model.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                        modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    if new_tokens:
        tokenizer.save_pretrained(out)
    return str(out)


def variant_model(base: str, out: Path, seed: int, **config_changes) -> str:
    """A random model like ``base`` (same tokenizer) with ``config_changes``, e.g. tied embeddings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def base_plus_adapter_logits(base: str, adapter: str, ids):
    """Logits of the unmerged base + adapter (peft), the reference a merge must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = len(AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer.json").exists() else base))
    if rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def model_logits(folder: str, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.glob(f".{output.name}.*"))


@pytest.fixture(scope="module")
def adapter_all(tiny_model_dir, tmp_path_factory) -> str:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "all-linear")


def test_book_command_merges_exactly_and_reloads(tiny_model_dir, adapter_all, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medllm.templates import GLM4_JINJA

    output = tmp_path / "glm4-sft-merged"
    result = run_script("merge_peft_adapter.py", "--model_type", "bloom", "--base_model", tiny_model_dir,
                        "--lora_model", adapter_all, "--output_dir", str(output), "--verify",
                        env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "--model_type bloom does not match config.json model_type 'glm'" in result.stderr
    assert "Verify: largest |merged - (base + adapter)| logit difference" in result.stderr
    assert leftovers(output) == []

    reference = base_plus_adapter_logits(tiny_model_dir, adapter_all, PROBE_IDS)
    merged = model_logits(str(output), PROBE_IDS)
    assert (merged - reference).abs().max().item() < 1e-5
    base = model_logits(tiny_model_dir, PROBE_IDS)
    assert (merged - base).abs().max().item() > 1e-2  # the adapter really changed the model

    config = json.loads((output / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert "<|user|>" in config["additional_special_tokens"] and "extra_special_tokens" not in config  # 4.x reads it
    model_config = json.loads((output / "config.json").read_text())
    assert model_config["rope_theta"] == model_config["rope_parameters"]["rope_theta"]  # 4.x reads rope_theta
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == GLM4_JINJA
    eos = json.loads((output / "generation_config.json").read_text())["eos_token_id"]
    stops = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert set(stops) <= set(eos)
    assert list(output.glob("*.safetensors")) and not list(output.glob("*.bin"))
    assert oct((output / "model.safetensors").stat().st_mode & 0o777) == "0o644"

    model = AutoModelForCausalLM.from_pretrained(output)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "小孩发烧怎么办"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    assert model.dtype == torch.float32


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_modules_to_save_with_extended_vocabulary(tiny_model_dir, tmp_path, tied):
    base = tiny_model_dir
    if tied:
        base = variant_model(tiny_model_dir, tmp_path / "tied-base", seed=3, tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"],
                           new_tokens=["<症状>", "<诊断>"], seed=1)
    output = tmp_path / "merged"
    merge_peft_adapter.main(["--model_type", "chatglm", "--base_model", base, "--lora_model", adapter,
                             "--output_dir", str(output)])

    ids = PROBE_IDS + [[2, 4, 1024, 1025, 7, 8, 9, 10, 11, 12]]  # 1024, 1025: the new tokens
    reference = base_plus_adapter_logits(base, adapter, ids)
    merged = model_logits(str(output), ids)
    assert merged.shape[-1] == 1026
    assert (merged - reference).abs().max().item() < 1e-5
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(output)) == 1026


def test_adapter_of_another_base_is_refused(tiny_model_dir, tmp_path):
    narrow = variant_model(tiny_model_dir, tmp_path / "narrow-base", seed=1, hidden_size=32, head_dim=8)
    adapter = make_adapter(narrow, tmp_path / "narrow-adapter")
    output = tmp_path / "merged"
    with pytest.raises(MedLLMError) as error:
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", adapter, "--output_dir", str(output)])
    message = str(error.value)
    assert "does not fit base model" in message
    assert "model.layers.0.mlp.down_proj.lora_B.weight is [32, 4] but the base's model.layers.0.mlp.down_proj " \
           "needs [64, 4]" in message
    assert "narrow-base" in message  # the base the adapter records
    assert not output.exists() and leftovers(output) == []


def test_adapter_recording_a_different_base_is_refused(tiny_model_dir, tmp_path):
    other = variant_model(tiny_model_dir, tmp_path / "other-base", seed=7)  # same shapes, other weights
    adapter = make_adapter(other, tmp_path / "other-adapter")
    output = tmp_path / "merged"
    with pytest.raises(MedLLMError, match="trained on .*other-base, whose weights differ"):
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", adapter, "--output_dir", str(output)])
    assert not output.exists() and leftovers(output) == []


def _start_paused_merge(base: str, adapter: str, output: Path) -> subprocess.Popen:
    env = dict(os.environ, MEDLLM_MERGE_TEST_PAUSE_S="120", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "merge_peft_adapter.py", "--base_model", base, "--lora_model", adapter,
                             "--output_dir", str(output)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_pause(process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    for line in process.stderr:
        if "pausing before the rename" in line:
            return
        assert time.time() < deadline, "the merge never reached the test pause"
    raise AssertionError(f"the merge ended before the pause (exit code {process.wait()})")


def test_killed_merge_leaves_no_output_and_next_run_cleans_up(tiny_model_dir, adapter_all, tmp_path):
    output = tmp_path / "merged"
    process = _start_paused_merge(tiny_model_dir, adapter_all, output)
    _wait_for_pause(process)
    staging = [p for p in output.parent.glob(".merged.tmp-*")]
    assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()  # killed while fully written
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not output.exists()

    # The next run removes the stale staging folder of the dead process and completes.
    merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", adapter_all, "--output_dir", str(output)])
    assert (output / "model.safetensors").is_file() and leftovers(output) == []


def test_ctrl_c_during_merge_removes_its_staging_folder(tiny_model_dir, adapter_all, tmp_path):
    output = tmp_path / "merged"
    process = _start_paused_merge(tiny_model_dir, adapter_all, output)
    _wait_for_pause(process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert not output.exists() and leftovers(output) == []


def test_overwrite_is_required_to_replace_an_output(tiny_model_dir, adapter_all, tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("earlier work")
    argv = ["--base_model", tiny_model_dir, "--lora_model", adapter_all, "--output_dir", str(output)]
    with pytest.raises(MedLLMError, match="exists and is not empty; pass --overwrite"):
        merge_peft_adapter.main(argv)
    assert (output / "keep.txt").read_text() == "earlier work"

    merge_peft_adapter.main(argv + ["--overwrite"])
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert leftovers(output) == []


def test_missing_or_unsafe_inputs_give_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(MedLLMError, match="adapter folder not found"):
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", str(tmp_path / "nope"),
                                 "--output_dir", str(tmp_path / "out")])
    with pytest.raises(MedLLMError, match="not a peft adapter. It looks like a full model"):
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", tiny_model_dir,
                                 "--output_dir", str(tmp_path / "out")])
    with pytest.raises(MedLLMError, match="--base_model .* and --model_name_or_path .* disagree"):
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--model_name_or_path", str(tmp_path),
                                 "--lora_model", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(MedLLMError, match="--torch_dtype float8"):
        merge_peft_adapter.main(["--base_model", tiny_model_dir, "--torch_dtype", "float8"])


def test_adapter_bin_is_read_with_weights_only(tiny_model_dir, adapter_all, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy-adapter"
    shutil.copytree(adapter_all, legacy)
    torch.save(load_file(str(legacy / "adapter_model.safetensors")), legacy / "adapter_model.bin")
    (legacy / "adapter_model.safetensors").unlink()
    output = tmp_path / "merged"
    merge_peft_adapter.main(["--base_model", tiny_model_dir, "--lora_model", str(legacy), "--output_dir", str(output),
                             "--torch_dtype", "bfloat16"])
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"  # kept on a CPU-only machine
    reference = base_plus_adapter_logits(tiny_model_dir, adapter_all, PROBE_IDS)
    assert (model_logits(str(output), PROBE_IDS) - reference).abs().max().item() < 0.1
