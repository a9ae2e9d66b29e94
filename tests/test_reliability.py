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


def test_trainer_flops_count_the_parameters_once(tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    import torch

    from medllm.arguments import LoraArguments, ModelArguments
    from medllm.modeling import build_peft_model, load_model
    from medllm.training import ParameterCountOnce

    class Counting:
        def floating_point_ops(self, inputs):
            return -1

    class Trainer(ParameterCountOnce, Counting):
        model = build_peft_model(load_model(ModelArguments(model_name_or_path=tiny_model_dir)),
                                 LoraArguments(target_modules="all"))

    model, trainer = Trainer.model, Trainer()
    parameters = model.num_parameters(exclude_embeddings=True)
    embeddings = model.get_input_embeddings().weight.numel()
    assert parameters == sum(p.numel() for p in model.parameters()) - embeddings  # LoRA included, embeddings not
    calls = []
    monkeypatch.setattr(type(model.get_base_model()), "num_parameters",
                        lambda self, **kwargs: calls.append(kwargs) or parameters)
    batch = {"input_ids": torch.zeros(4, 25, dtype=torch.long)}
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [6 * 100 * parameters] * 3
    assert calls == [{"exclude_embeddings": True}]
    trainer.model = SimpleNamespace()  # no num_parameters: the trainer's own answer
    assert trainer.floating_point_ops(batch) == -1


def test_fp16_overflow_names_the_step_and_suggests_bf16(tmp_path):
    """The same guard reports an fp16 overflow (a GPU run) with the bf16 advice first."""
    from types import SimpleNamespace

    import torch

    from medllm.training import NonFiniteLossGuard

    class Overflowing:
        def training_step(self, *args, **kwargs):
            return torch.tensor(float("inf"))

    class Guarded(NonFiniteLossGuard, Overflowing):
        args = SimpleNamespace(fp16=True, output_dir=str(tmp_path), learning_rate=2e-5)
        state = SimpleNamespace(global_step=41)

    with pytest.raises(MedLLMError) as error:
        Guarded().training_step()
    assert str(error.value) == ("loss became inf at step 42; stopped training (no checkpoint was saved yet). "
                                "fp16 overflowed: use --bf16 instead of --fp16, or a lower --learning_rate (now 2e-05).")


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


def test_a_finished_stage_closes_its_process_group(tmp_path):
    """torchrun ranks leave no gloo group to the interpreter's exit, where it sometimes aborted a finished rank."""
    import torch.distributed as dist

    from medllm.errors import run_cli

    def main(argv):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()

    run_cli(main, [])
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- bad input, end to end

def _stage_error(capsys, script: str, argv: list[str]) -> str:
    """Run a stage's main() the way the command line does; return its one-line error (exit code 1)."""
    import importlib

    from medllm.errors import run_cli

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def _sft_argv(tmp_path, model, data, *extra):
    return ["--model_name_or_path", str(model), "--train_file_dir", str(data), "--output_dir",
            str(tmp_path / "out"), "--template_name", "glm4", "--max_steps", "1", "--do_train",
            "--report_to", "none", "--cache_dir", str(tmp_path / "cache"), *extra]


GOOD_LINE = json.dumps({"conversations": [{"from": "human", "value": "发烧怎么办"}, {"from": "gpt", "value": "多喝水"}]},
                       ensure_ascii=False)
BAD_INPUTS = {
    "empty file": (lambda d: (d / "a.jsonl").write_text(""), "a.jsonl: the file is empty"),
    "empty folder": (lambda d: None, "no .txt, .json or .jsonl files"),
    "invalid JSON": (lambda d: (d / "a.jsonl").write_text(GOOD_LINE + "\n{oops\n"), "a.jsonl:2: invalid JSON"),
    "GBK file": (lambda d: (d / "a.jsonl").write_bytes(GOOD_LINE.encode("gbk")), "a.jsonl:1: not valid UTF-8"),
    "wrong type": (lambda d: (d / "a.jsonl").write_text('{"conversations": [{"from": "human", "value": 5}]}\n'),
                   "a.jsonl:1: field 'conversations[0].value': must be a string"),
    "missing field": (lambda d: (d / "a.jsonl").write_text('{"chat": []}\n'),
                      "a.jsonl:1: field 'conversations': missing"),
    "UTF-8 BOM": (lambda d: (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD_LINE.encode()),
                  "a.jsonl:1: starts with a UTF-8 byte-order mark"),
    "10 MB line": (lambda d: (d / "a.jsonl").write_text('{"conversations": "' + "x" * 10_000_000 + '"}\n'),
                   "a.jsonl:1: field 'conversations': must be a non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_through_sft_is_one_line(tmp_path, capsys, tiny_model_dir, case):
    make, expected = BAD_INPUTS[case]
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    assert expected in _stage_error(capsys, "supervised_finetuning", _sft_argv(tmp_path, tiny_model_dir, data))


def test_zero_valid_records_with_skip(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"chat": []}\n')
    message = _stage_error(capsys, "supervised_finetuning",
                           _sft_argv(tmp_path, tiny_model_dir, data, "--skip_invalid_records", "True"))
    assert "no valid records in 1 file" in message


def test_bad_model_and_settings_through_sft(tmp_path, capsys, tiny_model_dir):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(GOOD_LINE + "\n")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "no weights" in _stage_error(capsys, "supervised_finetuning", _sft_argv(tmp_path, no_weights, data))
    argv = _sft_argv(tmp_path, tiny_model_dir, data)
    argv[argv.index("glm4")] = "glm5"
    assert "--template_name 'glm5' does not exist" in _stage_error(capsys, "supervised_finetuning", argv)
    message = _stage_error(capsys, "supervised_finetuning",
                           _sft_argv(tmp_path, tiny_model_dir, data, "--model_max_length", "4"))
    assert "model_max_length" in message


def test_tokenizer_without_pad_token_gets_one(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoTokenizer

    from medllm.arguments import ModelArguments
    from medllm.modeling import load_tokenizer

    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(folder)))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id is not None


def test_debug_flag_shows_the_traceback(tmp_path, tiny_model_dir):
    from conftest import run_script

    data = tmp_path / "data"
    data.mkdir()
    argv = _sft_argv(tmp_path, tiny_model_dir, data)
    plain = run_script("supervised_finetuning.py", *argv)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = run_script("supervised_finetuning.py", *argv, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" not in plain.stderr


def test_trained_output_dir_is_not_overwritten(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(GOOD_LINE + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    message = _stage_error(capsys, "supervised_finetuning", _sft_argv(tmp_path, tiny_model_dir, data))
    assert "already holds a trained model" in message and "--overwrite_output_dir" in message
    assert (out / "adapter_config.json").read_text() == "{}"


# --------------------------------------------------------------------------- kill and resume

def _pt_command(model: str, output: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "pretraining.py", "--model_name_or_path", model, "--train_file_dir", "data/pretrain",
            "--output_dir", str(output), "--cache_dir", str(output.parent / "cache"), "--do_train",
            "--max_steps", "120", "--save_steps", "20", "--logging_steps", "1", "--block_size", "32",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "7", "--report_to", "none",
            "--max_train_samples", "200", "--gradient_checkpointing", "False", *extra]


def _final_state(output: Path):
    from safetensors.torch import load_file

    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h][-1], load_file(output / "adapter_model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import time

    from conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    straight = tmp_path / "straight"
    subprocess.run(_pt_command(tiny_model_dir, straight), cwd=REPO, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_pt_command(tiny_model_dir, killed), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-40" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "trainer_state.json").exists()  # it really died mid-run
    resumed = subprocess.run(_pt_command(tiny_model_dir, killed, "--resume_from_checkpoint", "True"), cwd=REPO,
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stderr

    loss_straight, weights_straight = _final_state(straight)
    loss_resumed, weights_resumed = _final_state(killed)
    assert abs(loss_straight - loss_resumed) < 1e-5
    assert weights_straight.keys() == weights_resumed.keys()
    for name, tensor in weights_straight.items():
        assert (tensor - weights_resumed[name]).abs().max().item() < 1e-5, name


def test_a_stage_writes_only_where_it_was_told(tmp_path, tiny_model_dir):
    """SFT with --output_dir and --cache_dir in tmp: nothing new in the repo, the home folder or /tmp."""
    import subprocess
    import sys

    from conftest import REPO

    def snapshot(folder: Path) -> set:
        return {str(p) for p in folder.rglob("*")} if folder.exists() else set()

    home, scratch = tmp_path / "home", tmp_path / "scratch"
    home.mkdir()
    scratch.mkdir()
    repo_before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                                 text=True).stdout
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(home / ".cache"),
           "HF_HOME": str(home / ".cache" / "huggingface"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text((GOOD_LINE + "\n") * 8)
    argv = _sft_argv(tmp_path, tiny_model_dir, data)
    result = subprocess.run([sys.executable, "supervised_finetuning.py", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and any((tmp_path / "cache").iterdir())
    assert subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                          text=True).stdout == repo_before
    assert snapshot(home) == set() and snapshot(scratch) == set()
