"""The pipeline driver end to end on a reduced setting: every promised artifact exists and parses, and the
report's numbers are the runs' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

FAST = "--max_steps 2 --logging_steps 1 --eval_steps 2 --save_steps 100 --max_eval_samples 4 --gradient_checkpointing False"


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, tmp_path_factory):
    if not (REPO / ".venv-eval" / ".installed").exists():
        pytest.skip(".venv-eval is absent (make eval-setup creates it)")
    out = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, OMP_NUM_THREADS="1", MODEL=tiny_model_dir, BUILD_TINY="", OUT=str(out), PYTHON=sys.executable,
               PT_ARGS=f"{FAST} --block_size 64 --max_train_samples 64",
               SFT_ARGS=f"{FAST} --model_max_length 256 --max_train_samples 64",
               DPO_ARGS=f"{FAST} --max_train_samples 16",
               INFERENCE_ARGS="--max_new_tokens 4 --temperature 0", EVAL_BATCH_SIZE="100")
    result = subprocess.run(["bash", "run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_every_artifact_exists_and_parses(pipeline_run):
    out, result = pipeline_run
    for stage in ("pt", "sft", "dpo"):
        assert (out / stage / "adapter_model.safetensors").is_file()
        assert json.loads((out / f"{stage}-merged" / "config.json").read_text())["model_type"] == "glm"
        assert (out / "logs" / f"{stage}.log").is_file()
    predictions = json.loads((out / "predictions.json").read_text())
    questions = (REPO / "data" / "inference" / "questions.txt").read_text().split("\n")
    assert [p["input"] for p in predictions] == [q for q in questions if q.strip()]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report in result.stdout and "| PT (LoRA) |" in report and "| DPO (LoRA) |" in report


def test_report_numbers_come_from_the_logs(pipeline_run):
    out, _ = pipeline_run
    from medllm.evaluation import latest_summary, read_summary
    from medllm.report import training_figures

    history = json.loads((out / "pt" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    report = (out / "report.md").read_text()
    pt_row = next(line for line in report.splitlines() if line.startswith("| PT (LoRA)"))
    assert f"{losses[0]:.3f} → {losses[-1]:.3f}" in pt_row
    assert training_figures(out / "dpo")["rewards/accuracies"] is not None
    scores = read_summary(latest_summary(str(out / "eval")))
    assert set(scores) == {"base", "pt", "sft", "dpo"}
    dpo_row = next(line for line in report.splitlines() if line.startswith("| DPO (LoRA)"))
    assert f"{scores['dpo']['cmb']:.1f}" in dpo_row
    cloze = json.loads((out / "cloze.json").read_text())
    assert set(cloze) == {"base", "pt", "sft", "dpo"}
    assert f"{cloze['dpo']['cmb_test']['accuracy']:.1f}" in dpo_row.split("|")[10]
    assert cloze["dpo"]["cmb_test"]["questions"] + cloze["dpo"]["cmb_test"]["skipped"] == 100


def test_rerun_reuses_finished_stages(pipeline_run, tiny_model_dir):
    out, _ = pipeline_run
    env = dict(os.environ, OMP_NUM_THREADS="1", MODEL=tiny_model_dir, BUILD_TINY="", OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(["bash", "run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0
    for stage in ("pt", "merge-pt", "sft", "merge-sft", "dpo", "merge-dpo", "inference", "eval", "cloze"):
        assert f"[{stage}] reusing" in result.stdout


def test_failing_stage_names_itself_and_its_log(tmp_path, tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", MODEL=tiny_model_dir, BUILD_TINY="", OUT=str(tmp_path), PYTHON=sys.executable,
               PT_DATA=str(tmp_path / "missing"))
    result = subprocess.run(["bash", "run_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert f"[pt] FAILED; see {tmp_path}/logs/pt.log" in result.stderr
    assert "data folder not found" in result.stderr
