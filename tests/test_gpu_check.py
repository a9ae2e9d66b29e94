"""CPU-side checks of the GPU material: DeepSpeed configs and the prepared GPU script."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from conftest import REPO
from medllm.arguments import LoraArguments, parse_args
from medllm.errors import MedLLMError


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_and_reach_the_parser(tmp_path, stage):
    from transformers import TrainingArguments

    path = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in from the training flags
    argv = ["--output_dir", str(tmp_path), "--deepspeed", str(path)]
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(MedLLMError, match=f"--deepspeed {path}: the deepspeed package is not installed"):
            parse_args(argv, LoraArguments, TrainingArguments)
    else:
        training = parse_args(argv, LoraArguments, TrainingArguments)[1]
        assert training.deepspeed == str(path)


def test_a_broken_deepspeed_config_is_named(tmp_path):
    from transformers import TrainingArguments

    broken = tmp_path / "zero.json"
    broken.write_text("{not json")
    with pytest.raises(MedLLMError, match=f"--deepspeed {broken}: cannot read it as JSON"):
        parse_args(["--output_dir", str(tmp_path), "--deepspeed", str(broken)], LoraArguments, TrainingArguments)


def test_gpu_check_dry_run_prints_the_plan():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "GPU check plan:" and len(lines) == 7
    assert "train, 10 steps each, bf16, LoRA: pt packed,sft packed,dpo padded" in result.stdout
