"""Benchmarks: the FLOPs count against a hand count, the figures of a run from its record, the trainer hook's
counting, and benchmarks/bench.py --smoke end to end (every figure a positive number)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_script


def test_flops_per_token_hand_count_tiny():
    from medllm.flops import ModelShape
    from medllm.tiny import SIZES

    shape = ModelShape.from_config(SIZES["tiny"])  # hidden 128, 4 layers, 4 heads of 32, 2 kv heads, MLP 384
    # Per layer: q 128x128 + k 128x64 + v 128x64 + o 128x128 + gate_up 128x768 + down 384x128
    per_layer = 16384 + 8192 + 8192 + 16384 + 98304 + 49152
    assert per_layer == 196608
    head = 128 * 4096  # output head; the embedding lookup costs no product
    assert shape.matmul_params == 4 * per_layer + head == 1310720
    attention = 4 * 4 * 4 * 32 * 256  # QK^T and AV, 2 FLOPs a multiply-add each, per layer and head, T = 256
    assert shape.forward_flops_per_token(256) == 2 * 1310720 + attention == 3145728
    assert shape.flops_per_token(256) == 3 * 3145728 == 9437184
    assert 9437184 == 6 * 1310720 + 12 * 4 * 4 * 32 * 256  # PaLM: 6N + 12 L H Q T
    assert shape.flops_per_token(256, passes=4) == 4 * 3145728  # DPO: + the reference model's forward
    # The head only for 1 token in 4, the layers for 3 tokens in 5 (a shared prompt counted once):
    body = 2 * 4 * per_layer + attention
    assert shape.forward_flops_per_token(256, head_share=0.25, body_share=0.6) == 0.6 * body + 0.25 * 2 * head


def test_matmul_params_equal_the_models_linear_weights(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medllm.flops import ModelShape

    config = AutoConfig.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert ModelShape.from_config(config).matmul_params == linear
    config_json = json.loads(Path(tiny_model_dir, "config.json").read_text())  # as bench.py reads it
    assert ModelShape.from_config(config_json).matmul_params == linear


def test_training_figures_from_a_record():
    from benchmarks.bench import training_figures

    from medllm.flops import ModelShape

    shape = ModelShape(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                       vocab_size=32)
    # [time, rows, fed tokens, documents] at the end of steps 1..3; the first step is not timed
    record = {"first_step_begin_time": 100.5, "steps": [[101.0, 2, 200, 4], [102.0, 4, 400, 8], [103.0, 6, 600, 12]],
              "peak_rss_mb": 321.0, "torch_threads": 2}
    figures = training_figures(record, {"train_real_tokens": 480}, launch_time=98.0, shape=shape, passes=3)
    assert figures["pad_fraction"] == pytest.approx(0.2)  # 480 real of 600 fed
    assert figures["real_tokens_per_second"] == pytest.approx(400 * 0.8 / 2.0)  # steps 2-3: 400 fed in 2 s
    assert figures["fed_tokens_per_second"] == pytest.approx(200.0)
    assert figures["mean_document_tokens"] == pytest.approx(40.0)  # 480 real tokens in 12 documents
    assert figures["startup_s"] == pytest.approx(2.5) and figures["first_step_s"] == pytest.approx(0.5)
    assert figures["flops_per_token"] == round(shape.flops_per_token(40.0))
    assert figures["model_flops_per_second"] == round(160.0 * shape.flops_per_token(40.0))
    assert figures["peak_memory_mb"] == 321.0
    assert figures["computed_per_real_token"] == pytest.approx(1.25) and figures["head_share"] == 1.0
    dpo = training_figures(record, {"train_real_tokens_per_second": 240.0, "train_runtime": 2.0}, 98.0, shape, 4)
    assert dpo["pad_fraction"] == pytest.approx(0.2)  # DPO reports a rate: 240/s x 2 s = 480 real tokens
    # DPO with shared prompts: 300 of the 480 real tokens computed, 120 of them completions (head).
    shared = training_figures(record, {"train_real_tokens_per_second": 240.0, "train_runtime": 2.0,
                                       "train_pad_fraction": 0.0, "train_computed_per_real_token": 0.625,
                                       "train_completion_tokens": 120}, 98.0, shape, 4)
    assert shared["pad_fraction"] == 0.0 and shared["computed_per_real_token"] == 0.625
    assert shared["flops_per_token"] == round(shape.flops_per_token(40.0, 4, head_share=0.25, body_share=0.625))
    # SFT: the head only where the next token is a label.
    sft = training_figures(record, {"train_real_tokens": 480, "train_label_tokens": 96}, 98.0, shape, 3)
    assert sft["head_share"] == pytest.approx(0.2)
    assert sft["flops_per_token"] == round(shape.flops_per_token(40.0, head_share=0.2))


def test_benchmark_callback_counts_rows_tokens_and_documents(tmp_path, monkeypatch):
    import torch

    from medllm.training import BENCH_FILE_ENV, default_callbacks

    monkeypatch.delenv(BENCH_FILE_ENV, raising=False)
    assert default_callbacks() == []  # nothing is recorded unless asked
    monkeypatch.setenv(BENCH_FILE_ENV, str(tmp_path / "record.json"))
    (callback,) = default_callbacks()

    class Model(torch.nn.Module):
        config = type("Config", (), {"pad_token_id": 0})()

        def forward(self, input_ids=None, position_ids=None):
            return input_ids

    model = Model().train()
    state = type("State", (), {"is_world_process_zero": True})()
    callback.on_train_begin(None, state, None, model=model)
    callback.on_step_begin(None, state, None)
    # Row 1: two documents and a padding run (pad id 0 at position 0); row 2: one document filling the row.
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    model(input_ids=ids, position_ids=positions)
    with torch.no_grad():  # a reference model's pass is not training work of the policy
        model(input_ids=ids)
    model(input_ids=ids[:1, :4])  # not packed: one document per row
    callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["steps"][0][1:] == [3, 20, 4]  # rows, fed tokens, documents (3 packed + 1)
    assert record["first_step_begin_time"] >= record["train_begin_time"]
    assert record["peak_rss_mb"] > 0 and record["torch_threads"] >= 1
    model(input_ids=ids)  # after training the hook is gone
    assert callback.counts == [3, 20, 4]


def test_rounds_alternate_their_order_and_a_run_reports_its_median_round(tmp_path, monkeypatch):
    import benchmarks.bench as bench

    rates = {"sft packed": [300.0, 200.0, 260.0], "sft padded": [150.0, 100.0, 200.0]}
    order = []

    def fake_training(run, size, model_dir, settings):
        index = order.count(run.name)
        order.append(run.name)
        return {"size": size, "run": run.name, "stage": run.stage, "flags": list(run.flags), "round": index,
                "real_tokens_per_second": rates[run.name][index], "peak_memory_mb": 100.0 + index,
                "output_dir": str(tmp_path)}

    monkeypatch.setattr(bench, "run_training", fake_training)
    monkeypatch.setattr(bench, "run_merge", lambda size, *args: {"size": size, "run": "merge", "error": "skipped"})
    monkeypatch.setattr(bench, "run_inference", lambda size, *args: {"size": size, "run": "inference"})
    runs = [r for r in bench.RUNS if r.name in rates]
    settings = bench.Settings(steps=3, repeats=3, batch_size=None, max_length=128, new_tokens=8, work_dir=tmp_path,
                              threads=None, cuda=False, timeout=10)
    results = bench.benchmark_size("tiny", tmp_path, runs, settings)
    assert order == ["sft packed", "sft padded", "sft padded", "sft packed", "sft packed", "sft padded"]
    packed, padded = results[0], results[1]
    assert packed["round"] == 2 and packed["real_tokens_per_second"] == 260.0  # the median of 200, 260, 300
    assert packed["peak_memory_mb"] == 102.0  # every figure from that same round
    assert packed["rounds_real_tokens_per_second"] == [300.0, 200.0, 260.0]
    assert padded["round"] == 0 and padded["real_tokens_per_second"] == 150.0
    (row,) = [c for c in bench.compare(results) if c["comparison"] == "SFT packed vs padded"]
    assert row["round_ratios"] == [2.0, 2.0, 1.3]  # each round's runs side by side
    assert row["speed_ratio"] == 2.0 and row["met"] is True  # their median, not 260 / 150 of the median rounds
    failed = bench.median_round([{"real_tokens_per_second": 1.0}, {"error": "exit 1"}])
    assert failed == {"error": "exit 1"}  # a failed round fails the run


def positive_numbers(value, path="") -> list[tuple[str, float]]:
    """Every number in a JSON value with its path."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [pair for key, item in items for pair in positive_numbers(item, f"{path}/{key}")]


def test_bench_smoke_reports_every_figure(tmp_path):
    result = run_script("benchmarks/bench.py", "--smoke", "--threads", "1", "--work_dir", str(tmp_path), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    results = {r["run"]: r for r in report["results"]}
    assert set(results) == {"pt packed", "sft packed", "dpo shared prompt", "merge", "inference"}
    training = ("real_tokens_per_second", "fed_tokens_per_second", "pad_fraction", "startup_s", "first_step_s",
                "peak_memory_mb", "flops_per_token", "model_flops_per_second", "mfu", "mean_document_tokens")
    for name in ("pt packed", "sft packed", "dpo shared prompt"):
        assert set(training) <= set(results[name]), results[name]
    assert {"wall_s", "peak_memory_mb"} <= set(results["merge"])
    assert {"tokens_per_second_batch1", "tokens_per_second_batch8", "time_to_first_token_s",
            "peak_memory_mb"} <= set(results["inference"])
    numbers = positive_numbers(report["results"]) + positive_numbers(report["peak"])
    assert len(numbers) > 40
    for path, value in numbers:
        assert math.isfinite(value), path
        assert value >= 0 if path.endswith("/pad_fraction") else value > 0, (path, value)
    assert 0 < results["pt packed"]["mfu"] < 1 and results["pt packed"]["steps"] == 3
    assert results["sft packed"]["pad_fraction"] == 0 and results["dpo shared prompt"]["pad_fraction"] == 0
    assert results["dpo shared prompt"]["computed_per_real_token"] < 0.9  # the sample prompts are computed once
    assert results["pt packed"]["tokenization"] == "computed"  # the bench starts from an empty cache
    assert "| micro | pt packed |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("comparison, ours, baseline", [("dpo", "shared prompt", "padded"),
                                                      ("loss", "cpu loss", "transformers loss"),
                                                      ("dropout", "CpuDropout", "nn.Dropout")])
def test_paired_timing_prints_both_variants(tmp_path, tiny_model_dir, comparison, ours, baseline):
    result = run_script("benchmarks/paired.py", comparison, "--model_name_or_path", tiny_model_dir, "--steps", "5",
                        "--work_dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "steps timed" in line)
    assert "2 steps timed" in line and f"{ours} " in line and f"{baseline} / {ours} per step: median" in line
