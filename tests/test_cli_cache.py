"""--help and bad flags from the saved parser: the same output as the full parser, without torch."""

from __future__ import annotations

import pytest

from conftest import run_script

SCRIPTS = ["pretraining.py", "supervised_finetuning.py", "dpo_training.py", "merge_peft_adapter.py", "inference.py"]
BAD_ARGUMENTS = [
    ["--no_such_flag", "1"],                  # unknown
    ["--lora_ran", "4"],                      # a prefix argparse would otherwise accept
    ["--learning_rate", "abc"],               # wrong type
    ["--lora_rank"],                          # missing value
    ["--torch_dtype", "float8"],              # outside the choices
    ["--evaluation_strategy", "weird"],       # through an alias, into an enum
    ["--do_train", "maybe"],                  # not a boolean
]


def _run(script: str, cache_dir, *args: str):
    # A fixed width: argparse wraps help to the terminal, and both runs must see the same one.
    return run_script(script, *args, env={"MEDLLM_CACHE_DIR": str(cache_dir), "COLUMNS": "100"})


def _imports_torch(script: str, cache_dir, *args: str) -> bool:
    result = run_script("-X", "importtime", script, *args, env={"MEDLLM_CACHE_DIR": str(cache_dir), "COLUMNS": "100"})
    return any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_from_the_saved_parser_is_the_full_parsers_help(script, tmp_path):
    cold = _run(script, tmp_path, "--help")  # full parser; saves it
    assert cold.returncode == 0 and "--model_name_or_path" in cold.stdout
    assert len(list((tmp_path / "cli").glob(f"{script[:-3]}-*.json"))) == 1
    warm = _run(script, tmp_path, "--help")
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert not _imports_torch(script, tmp_path, "--help")


def test_bad_arguments_get_the_full_parsers_message_without_torch(tmp_path):
    script = "supervised_finetuning.py"
    _run(script, tmp_path, "--help")  # save the parser
    for bad in BAD_ARGUMENTS:
        warm = _run(script, tmp_path, "--output_dir", "x", *bad)
        assert warm.returncode == 2, bad
        assert "error: argument" in warm.stderr or "unrecognized arguments" in warm.stderr, warm.stderr
        assert not _imports_torch(script, tmp_path, "--output_dir", "x", *bad)
        (tmp_path / "empty").mkdir(exist_ok=True)
        for saved in (tmp_path / "empty").glob("cli/*"):
            saved.unlink()  # no cache: the full parser answers
        cold = _run(script, tmp_path / "empty", "--output_dir", "x", *bad)
        assert (warm.returncode, warm.stderr) == (cold.returncode, cold.stderr), bad


def test_a_broken_cache_falls_back_to_the_full_parser(tmp_path):
    script = "dpo_training.py"
    cold = _run(script, tmp_path, "--help")
    saved = next((tmp_path / "cli").glob("dpo_training-*.json"))
    saved.write_text('{"groups": [', encoding="utf-8")  # e.g. a disk that filled up
    result = _run(script, tmp_path, "--help")
    assert result.returncode == 0 and result.stdout == cold.stdout


def test_good_arguments_pass_the_check(tmp_path):
    from medllm import cli_cache

    parser = cli_cache._rebuild({"formatter_class": "HelpFormatter", "description": None, "groups": [
        {"title": "options", "description": None, "actions": [
            {"kind": "_StoreAction", "option_strings": ["--lr"], "dest": "lr", "nargs": None, "const": None,
             "default": 1.0, "type": "float", "choices": None, "required": False, "help": "", "metavar": None},
            {"kind": "_StoreAction", "option_strings": ["--bf16"], "dest": "bf16", "nargs": "?", "const": True,
             "default": False, "type": "string_to_bool", "choices": None, "required": False, "help": "",
             "metavar": None}]}]})
    namespace = parser.parse_args(["--lr", "3e-4", "--bf16"])
    assert (namespace.lr, namespace.bf16) == (3e-4, True)
    assert parser.parse_args(["--bf16", "false"]).bf16 is False


def test_a_bare_boolean_flag_means_true_in_the_saved_parser_too(tmp_path, monkeypatch):
    import json

    from medllm import cli_cache
    from medllm.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_args
    from medllm.preference import DPOArguments

    saved = tmp_path / "dpo_training.json"
    monkeypatch.setattr(cli_cache, "_target", saved)
    stage_arguments = (ModelArguments, DataArguments, LoraArguments, RunArguments, DPOArguments)
    bare = ["--padding_free", "--gradient_checkpointing", "--ddp_find_unused_parameters"]  # Optional[bool] = None
    *_, data_args, _, _, training_args = parse_args(["--output_dir", str(tmp_path), *bare], *stage_arguments)
    assert data_args.padding_free is True and training_args.gradient_checkpointing is True
    assert training_args.ddp_find_unused_parameters is True
    namespace = cli_cache._rebuild(json.loads(saved.read_text())).parse_args(["--output_dir", "x", *bare, "--bf16"])
    assert (namespace.padding_free, namespace.gradient_checkpointing, namespace.bf16) == (True, True, True)
    assert namespace.ddp_find_unused_parameters is True
