"""Reliability: random record shapes, unfinished checkpoints, non-finite losses, output-folder safety,
weights loading without pickle execution, and bad input end to end through the stage scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medllm.data import parse_conversation_record, parse_preference_record, parse_text_record
from medllm.errors import DataError, MedLLMError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
turn = st.fixed_dictionaries({}, optional={
    "from": st.sampled_from(["human", "gpt", "system", "user", "robot", 3]),
    "role": st.sampled_from(["user", "assistant", "system", None]),
    "value": st.one_of(st.text(max_size=5), st.integers()),
    "content": st.one_of(st.text(max_size=5), st.none()),
})
record_shapes = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "conversations": st.one_of(st.lists(turn, max_size=5), json_values),
        "messages": st.one_of(st.lists(turn, max_size=5), json_values),
        "chosen": json_values, "rejected": json_values, "question": json_values, "history": json_values,
        "system": json_values, "response_chosen": json_values, "response_rejected": json_values,
        "text": json_values, "instruction": json_values, "output": json_values, "input": json_values,
    }),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=record_shapes)
def test_loaders_accept_or_raise_only_data_error(record):
    for parse in (parse_text_record, parse_conversation_record, parse_preference_record):
        try:
            parsed = parse(record, Path("f.jsonl"), 7)
        except DataError as error:
            assert error.line == 7 and str(error).startswith("f.jsonl:7: ")
        else:
            assert isinstance(parsed, dict)


def test_unfinished_checkpoint_is_never_resumed(tmp_path):
    from types import SimpleNamespace

    from medllm.training import last_complete_checkpoint, resolve_resume_checkpoint

    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (5, 10):  # trainer_state.json is the last file a checkpoint gets
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    args = SimpleNamespace(resume_from_checkpoint="True", output_dir=str(tmp_path))
    assert resolve_resume_checkpoint(args) == str(tmp_path / "checkpoint-10")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-15")
    with pytest.raises(MedLLMError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(args)


def test_non_finite_loss_stops_at_once_naming_the_step(tmp_path):
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from medllm.training import NonFiniteLossGuard

    class BlowsUp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, x, labels=None):
            self.calls += 1
            scale = float("nan") if self.calls == 4 else 1.0
            return {"loss": (self.weight * x).sum() * scale}

    class Ones(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"x": torch.ones(1), "labels": torch.zeros(1)}

    class GuardedTrainer(NonFiniteLossGuard, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=10, save_steps=2,
                             report_to=[], use_cpu=True, logging_steps=1)
    trainer = GuardedTrainer(model=BlowsUp(), args=args, train_dataset=Ones())
    with pytest.raises(MedLLMError) as error:
        trainer.train()
    message = str(error.value)
    assert "loss became nan at step 4" in message and "--bf16" in message and "--learning_rate" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-2'}" in message
    assert not (tmp_path / "checkpoint-4").exists()


def test_pickled_weights_are_never_executed(tmp_path, tiny_model_dir):
    """A .bin whose pickle would run code is refused, and the code does not run (weights_only=True)."""
    import shutil

    import torch

    from medllm.arguments import ModelArguments
    from medllm.modeling import load_model

    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception):
        load_model(ModelArguments(model_name_or_path=str(folder)))
    assert not marker.exists()


def test_remote_code_needs_trust_remote_code(tmp_path, tiny_model_dir):
    import shutil

    from medllm.arguments import ModelArguments
    from medllm.modeling import load_model

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["model_type"] = "evil-remote"
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(MedLLMError):
        load_model(ModelArguments(model_name_or_path=str(folder)))
    assert not marker.exists()
