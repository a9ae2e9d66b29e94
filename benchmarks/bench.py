"""Speed, memory and model FLOPs utilisation (MFU) of every stage, and of the modes a user chooses between.

    python benchmarks/bench.py                    # tiny + small model (+ base on a GPU), every mode (make bench)
    python benchmarks/bench.py --smoke            # micro model, 3 steps, 1 round, one run per stage (the tests')
    python benchmarks/bench.py --sizes small --runs "sft packed,sft padded" --threads 1

Each training stage runs as its own process for ``--steps`` optimizer steps with $MEDLLM_BENCH_FILE set, so
its trainer records when the first step began, every step's fed rows and tokens, and peak memory
(medllm/training.py: default_callbacks). Real (non-padding) tokens come from the stage's train_results.json.
Every run goes ``--repeats`` rounds, the order of the runs reversed each round, and reports its median round
(the machine's speed drifts over minutes). Throughput is timed from the end of the first step to the end of the
last (the first step pays one-off set-up costs, reported apart). MFU = real tokens/s x model FLOPs per token
(medllm/flops.py) / the peak of a large matrix product measured in this same run (float32 on a CPU, bfloat16 on a
GPU). Merge is timed as a whole process; inference loads the merged model in a worker process and times generation
at batch 1 and 8.
Writes <work_dir>/bench.json and bench.md (the tables); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench")

SCRIPTS = {"pt": "pretraining.py", "sft": "supervised_finetuning.py", "dpo": "dpo_training.py"}
DATA = {"pt": "data/pretrain", "sft": "data/finetune", "dpo": "data/reward"}
QUESTIONS = REPO / "data" / "inference" / "questions.txt"
CLI_SCRIPTS = ("pretraining.py", "supervised_finetuning.py", "dpo_training.py", "merge_peft_adapter.py", "inference.py")


@dataclass(frozen=True)
class Run:
    """One training process: a stage, and the flags that set its mode (added to the common ones)."""

    name: str
    stage: str
    mode: str
    flags: tuple[str, ...] = ()


# Each run names the flag it is about, so a change of a stage's defaults does not change what is compared. Runs
# that are compared follow each other, so they see the machine in the same state. The first run of each stage
# tokenizes (the cache is emptied at start); the others start from the cache.
PADDED = ("--padding_free", "False")  # the plain baseline: one document (or pair) per row, padded per batch
RUNS = (
    Run("pt packed", "pt", "LoRA, documents packed into rows, attention per document", ("--packing", "True")),
    Run("pt padded", "pt", "LoRA, one document per row, padded", ("--packing", "False", *PADDED)),
    Run("sft packed", "sft", "LoRA, dialogues packed into rows, attention per dialogue", ("--packing", "True")),
    Run("sft padded", "sft", "LoRA, one dialogue per row, padded", ("--packing", "False", *PADDED)),
    Run("sft padding-free", "sft", "LoRA, the batch's dialogues in one row, no padding (default)",
        ("--packing", "False", "--padding_free", "True")),
    Run("sft full", "sft", "all parameters, packed", ("--packing", "True", "--use_peft", "False")),
    Run("sft checkpointing", "sft", "LoRA, packed, gradient checkpointing",
        ("--packing", "True", "--gradient_checkpointing", "True")),
    Run("dpo shared prompt", "dpo", "LoRA, reference = adapter off; padding-free, each prompt computed once",
        ("--group_by_length", "False", "--padding_free", "True")),
    Run("dpo padded", "dpo", "LoRA, reference = adapter off; random batches, padded", ("--group_by_length", "False",
                                                                                         *PADDED)),
    Run("dpo grouped", "dpo", "LoRA; batches of similar length, padded", ("--group_by_length", "True", *PADDED)),
    Run("dpo reference copy", "dpo", "all parameters, frozen reference copy; shared prompt",
        ("--group_by_length", "False", "--padding_free", "True", "--use_peft", "False")),
)
SMOKE_RUNS = ("pt packed", "sft packed", "dpo shared prompt")
STAGE_BATCH_SIZE = {"pt": 4, "sft": 2, "dpo": 4}  # rows (DPO: pairs) per step, as in the run_*.sh scripts

# (label, run, baseline run, target ratio of real tokens/s or None): read as "run vs baseline".
COMPARISONS = (
    ("PT packed vs padded", "pt packed", "pt padded", None),
    ("SFT packed vs padded", "sft packed", "sft padded", 1.5),
    ("SFT padding-free vs padded", "sft padding-free", "sft padded", None),
    ("SFT LoRA vs full", "sft packed", "sft full", None),
    ("SFT checkpointing off vs on", "sft packed", "sft checkpointing", None),
    ("DPO shared prompt vs padded", "dpo shared prompt", "dpo padded", 1.5),
    ("DPO grouped vs padded", "dpo grouped", "dpo padded", None),
    ("DPO LoRA reference vs reference copy", "dpo shared prompt", "dpo reference copy", None),
)
PT_MFU_TARGET = ("small", 0.30)  # PT MFU on the small model, as a share of the measured matmul peak


@dataclass
class Settings:
    """What every run of one benchmark shares."""

    steps: int
    repeats: int  # rounds of every run, in alternating order; each figure is the median round's
    batch_size: Optional[int]  # None: STAGE_BATCH_SIZE
    max_length: int  # PT --block_size, SFT --model_max_length, DPO --max_length
    new_tokens: int  # generated per reply in the inference benchmark
    work_dir: Path
    threads: Optional[int]
    cuda: bool
    timeout: float  # seconds one training run may take


# --------------------------------------------------------------------------- processes

def launch(args: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run ``python *args`` in the repo root; returns {launch_time, wall_s, max_rss_mb, returncode}.

    The child's own peak RSS comes from wait4 (the kernel's count for that process alone).
    """
    launch_time, start = time.time(), time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if process.returncode != 0:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n[bench] killed after the {timeout:.0f} s timeout\n" if timed_out.is_set()
                      else f"\n[bench] exit code {process.returncode}\n")
    return {"launch_time": launch_time, "wall_s": time.perf_counter() - start,
            "max_rss_mb": usage.ru_maxrss / 1024, "returncode": process.returncode}


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def child_env(settings: Settings, **extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    return env


# --------------------------------------------------------------------------- training stages

def stage_flags(run: Run, model_dir: Path, output_dir: Path, settings: Settings) -> list[str]:
    length_flag = {"pt": "--block_size", "sft": "--model_max_length", "dpo": "--max_length"}[run.stage]
    flags = ["--model_name_or_path", str(model_dir), "--train_file_dir", DATA[run.stage], "--do_train",
             "--max_steps", str(settings.steps),
             "--per_device_train_batch_size", str(settings.batch_size or STAGE_BATCH_SIZE[run.stage]),
             length_flag, str(settings.max_length), "--output_dir", str(output_dir),
             "--cache_dir", str(settings.work_dir / "cache"), "--overwrite_output_dir", "--save_strategy", "no",
             "--logging_steps", str(settings.steps), "--report_to", "none", "--disable_tqdm", "True", "--seed", "42"]
    if run.stage != "pt":
        flags += ["--template_name", "glm4"]
    if settings.cuda:
        flags += ["--bf16", "True"]
    return flags + list(run.flags)


def train_real_tokens(metrics: dict) -> float:
    """Real (non-padding) tokens trained, from a stage's train_results.json."""
    if "train_real_tokens" in metrics:  # pretraining / SFT
        return float(metrics["train_real_tokens"])
    return float(metrics["train_real_tokens_per_second"]) * float(metrics["train_runtime"])  # DPO


def training_figures(record: dict, metrics: dict, launch_time: float, shape, passes: int) -> dict:
    """The reported figures of one training run from its benchmark record and train metrics (MFU is added
    once the run's matmul peak is known)."""
    steps = record["steps"]  # [time, rows, fed tokens, documents] so far, at the end of each optimizer step
    if len(steps) < 2:
        raise ValueError("at least 2 steps are needed (the first one is not timed)")
    fed, documents = steps[-1][2], steps[-1][3]
    real = train_real_tokens(metrics)
    window_s = steps[-1][0] - steps[0][0]
    real_per_s = (fed - steps[0][2]) * (real / fed) / window_s  # real share of the tokens fed after step 1
    context = real / documents  # mean document length: what a token attends over in the FLOPs count
    # Work the run needs (medllm/flops.py): the head where the next token is a target; shared prompts once.
    head_tokens = metrics.get("train_label_tokens", metrics.get("train_completion_tokens", real))
    head_share, body_share = head_tokens / real, min(1.0, metrics.get("train_computed_per_real_token", 1.0))
    flops_per_token = shape.flops_per_token(context, passes, head_share=head_share, body_share=body_share)
    memory = record.get("peak_cuda_mb", record["peak_rss_mb"])
    return {
        "real_tokens_per_second": round(real_per_s, 1),
        "fed_tokens_per_second": round((fed - steps[0][2]) / window_s, 1),
        # The stage's own count where it computes fewer tokens than it is fed (DPO's shared prompts).
        "pad_fraction": round(metrics.get("train_pad_fraction", 1 - real / fed), 4),
        "computed_per_real_token": round(metrics.get("train_computed_per_real_token", fed / real), 3),
        "head_share": round(head_share, 3),
        "startup_s": round(record["first_step_begin_time"] - launch_time, 2),
        "first_step_s": round(steps[0][0] - record["first_step_begin_time"], 3),
        "peak_memory_mb": round(memory, 1),
        "flops_per_token": round(flops_per_token),
        "model_flops_per_second": round(real_per_s * flops_per_token),
        "mean_document_tokens": round(context, 1),
        "steps": len(steps),
        "torch_threads": record["torch_threads"],
    }


def run_training(run: Run, size: str, model_dir: Path, settings: Settings) -> dict:
    from medllm.flops import DPO_PASSES, TRAIN_PASSES, ModelShape

    folder = settings.work_dir / size / run.name.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    record_path, output_dir = folder / "bench-record.json", folder / "out"
    record_path.unlink(missing_ok=True)
    args = [SCRIPTS[run.stage], *stage_flags(run, model_dir, output_dir, settings)]
    logger.info("%s / %s: %s", size, run.name, " ".join(args))
    process = launch(args, child_env(settings, MEDLLM_BENCH_FILE=str(record_path)), folder / "log.txt",
                     timeout=settings.timeout)
    result = {"size": size, "run": run.name, "stage": run.stage, "mode": run.mode, "flags": list(run.flags),
              "wall_s": round(process["wall_s"], 2), "output_dir": str(output_dir)}
    if process["returncode"] != 0:
        return {**result, "error": f"exit {process['returncode']}: {log_tail(folder / 'log.txt')}"}
    if not record_path.is_file():
        return {**result, "error": f"{SCRIPTS[run.stage]} wrote no benchmark record: its trainer needs "
                "callbacks=default_callbacks() (medllm/training.py)."}
    log = (folder / "log.txt").read_text(encoding="utf-8", errors="replace")
    result["tokenization"] = "cached" if "using the cached result" in log else "computed"  # medllm.training.cached_map
    record = json.loads(record_path.read_text(encoding="utf-8"))
    metrics = json.loads((output_dir / "train_results.json").read_text(encoding="utf-8"))
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    passes = DPO_PASSES if run.stage == "dpo" else TRAIN_PASSES
    return {**result, **training_figures(record, metrics, process["launch_time"], shape, passes)}


# --------------------------------------------------------------------------- merge and inference

def run_merge(size: str, model_dir: Path, adapter_dir: Path, settings: Settings) -> dict:
    folder = settings.work_dir / size / "merge"
    folder.mkdir(parents=True, exist_ok=True)
    merged = folder / "merged"
    args = ["merge_peft_adapter.py", "--base_model", str(model_dir), "--lora_model", str(adapter_dir),
            "--output_dir", str(merged), "--overwrite"]
    logger.info("%s / merge: %s", size, " ".join(args))
    process = launch(args, child_env(settings), folder / "log.txt", timeout=600)
    result = {"size": size, "run": "merge", "merged_dir": str(merged)}
    if process["returncode"] != 0:
        return {**result, "error": f"exit {process['returncode']}: {log_tail(folder / 'log.txt')}"}
    return {**result, "wall_s": round(process["wall_s"], 2), "peak_memory_mb": round(process["max_rss_mb"], 1)}


def run_inference(size: str, model_dir: Path, settings: Settings) -> dict:
    folder = settings.work_dir / size / "inference"
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "inference.json"
    output.unlink(missing_ok=True)
    args = [str(Path(__file__).relative_to(REPO)), "--inference_worker", str(model_dir), "--worker_output",
            str(output), "--new_tokens", str(settings.new_tokens)]
    logger.info("%s / inference: generation from %s", size, model_dir)
    process = launch(args, child_env(settings), folder / "log.txt", timeout=600)
    result = {"size": size, "run": "inference", "model_dir": str(model_dir)}
    if process["returncode"] != 0 or not output.is_file():
        return {**result, "error": f"exit {process['returncode']}: {log_tail(folder / 'log.txt')}"}
    return {**result, **json.loads(output.read_text(encoding="utf-8"))}


class FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.puts, self.first_token_time = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def inference_worker(model_dir: str, output: str, new_tokens: int) -> None:
    """Load ``model_dir`` as inference.py does and time generate_replies (KV cache on, greedy): tokens/s at
    batch 1 and batch 8 and time to first token at batch 1. Every reply is exactly ``new_tokens`` long
    (min_new_tokens), so the rates do not depend on where a random model happens to stop."""
    from medllm.arguments import InferenceArguments, ModelArguments
    from medllm.generation import generate_replies, load_for_inference, read_questions, resolve_template
    from medllm.training import peak_memory_mb

    model, tokenizer = load_for_inference(InferenceArguments(base_model=model_dir), ModelArguments())
    template = resolve_template(tokenizer, None)
    _, conversations = read_questions(str(QUESTIONS))
    conversations = (conversations * 8)[:8]
    model.generation_config.min_new_tokens = new_tokens
    generated = [0]
    original_generate = model.generate

    def counting_generate(*args, **kwargs):  # count new tokens up to and including each row's stop token
        out = original_generate(*args, **kwargs)
        stops = set(kwargs["generation_config"].eos_token_id)
        for row in out[:, kwargs["input_ids"].shape[1]:].tolist():
            generated[0] += next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        return out

    model.generate = counting_generate
    options = dict(max_new_tokens=new_tokens, temperature=0.0)
    generate_replies(model, tokenizer, template, conversations[:2], batch_size=2, **options)  # warm-up
    use_cache = model.generation_config.use_cache  # None (transformers 5's default): the model config decides
    use_cache = getattr(model.config, "use_cache", True) if use_cache is None else use_cache
    result: dict[str, Any] = {"new_tokens": new_tokens, "use_cache": bool(use_cache)}
    for batch_size in (1, 8):
        generated[0], first_token_s = 0, []
        start = time.perf_counter()
        if batch_size == 1:
            for conversation in conversations:
                clock, began = FirstTokenClock(), time.perf_counter()
                generate_replies(model, tokenizer, template, [conversation], batch_size=1, streamer=clock, **options)
                first_token_s.append(clock.first_token_time - began)
            result["time_to_first_token_s"] = round(sorted(first_token_s)[len(first_token_s) // 2], 4)  # median
        else:
            generate_replies(model, tokenizer, template, conversations, batch_size=batch_size, **options)
        result[f"tokens_per_second_batch{batch_size}"] = round(generated[0] / (time.perf_counter() - start), 1)
    peaks = peak_memory_mb()
    result["peak_memory_mb"] = round(peaks.get("peak_cuda_mb", peaks["peak_rss_mb"]), 1)
    Path(output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- command line speed

def time_cli(settings: Settings) -> dict:
    """Seconds until ``--help`` answers and until a misspelt flag is refused, per script.

    The first ``--help`` runs with an empty parser cache (``medllm/cli_cache.py``): the full parser
    answers and is saved. The second ``--help`` and the misspelt flag answer from the saved parser,
    as every run after the first does (``make setup`` saves them).
    """
    figures = {}
    folder = settings.work_dir / "cli"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**child_env(settings), "MEDLLM_CACHE_DIR": str(folder / "cache")}
    for script in CLI_SCRIPTS:
        for case, flags in (("help first", ["--help"]), ("help", ["--help"]), ("bad_flag", ["--no_such_flag", "1"])):
            process = launch([script, *flags], env, folder / f"{script}-{case.replace(' ', '_')}.txt", timeout=120)
            figures[f"{script} {case}"] = round(process["wall_s"], 2)
    return figures


# --------------------------------------------------------------------------- report

def machine(settings: Settings) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    if settings.cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compare(results: list[dict]) -> list[dict]:
    """Side-by-side ratios of the modes (real tokens/s and peak memory) and the targets."""
    by_key = {(r["size"], r["run"]): r for r in results if "error" not in r}
    rows = []
    for size in dict.fromkeys(r["size"] for r in results):
        for label, run, baseline, target in COMPARISONS:
            a, b = by_key.get((size, run)), by_key.get((size, baseline))
            if not a or not b or "real_tokens_per_second" not in a:
                continue
            ratio = a["real_tokens_per_second"] / b["real_tokens_per_second"]
            row = {"size": size, "comparison": label}
            if "rounds_real_tokens_per_second" in a and "rounds_real_tokens_per_second" in b:
                # each round's two runs ran minutes apart at most: the median of their ratios is the paired estimate
                round_ratios = [x / y for x, y in zip(a["rounds_real_tokens_per_second"],
                                                      b["rounds_real_tokens_per_second"])]
                ratio = statistics.median(round_ratios)
                row["round_ratios"] = [round(x, 2) for x in round_ratios]
            row.update(speed_ratio=round(ratio, 2), memory_ratio=round(a["peak_memory_mb"] / b["peak_memory_mb"], 2),
                       target=target, met=None if target is None else ratio >= target)
            rows.append(row)
        pt = by_key.get((size, "pt packed"))
        if pt and size == PT_MFU_TARGET[0]:
            rows.append({"size": size, "comparison": "PT MFU (share of matmul peak)", "mfu": pt["mfu"],
                         "target": PT_MFU_TARGET[1], "met": pt["mfu"] >= PT_MFU_TARGET[1]})
    return rows


def markdown(header: list[str], rows: list[list[str]], text_columns: int = 2) -> list[str]:
    """A Markdown table; the columns after the first ``text_columns`` are right-aligned (numbers)."""
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return ["", *("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])]


def cell(result: dict, key: str, fmt: str, scale: float = 1) -> str:
    """One figure of ``result`` formatted, 'failed' for a failed run, '-' when absent."""
    if "error" in result:
        return "failed"
    return format(result[key] * scale, fmt) if key in result else "-"


def tables(report: dict) -> str:
    """The report as Markdown: the machine, then training runs, merge and inference, comparisons, CLI speed."""
    m, peak, results = report["machine"], report["peak"], report["results"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    settings = report["settings"]
    lines = [f"{settings['steps']} steps per run ({settings['timed_steps']} timed), {settings.get('repeats', 1)} "
             "round(s): a run's figures are those of its median round (by real tok/s), a comparison's ratio is the "
             "median of its round-by-round ratios.\n",
             f"Machine: {m['processor']}, {m['cpu_count']} CPUs{gpu}; torch {m['torch']} ({m['torch_threads']} "
             f"threads); load average {m['load_average_start']} at start, {m['load_average_end']} at end. "
             f"Matmul peak ({peak['dtype']}, {peak['size']}x{peak['size']}): "
             f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s (best of {peak['measured_gflops']})."]
    if m.get("warning"):
        lines.append(f"\n**Warning**: {m['warning']}.")
    lines += markdown(
        ["size", "run", "mode", "tokenization", "real tok/s", "pad %", "computed / real", "start→step 1 s",
         "step 1 s", "peak MB", "MFU %"],
        [[r["size"], r["run"], r["mode"], r.get("tokenization", "-"), cell(r, "real_tokens_per_second", ".0f"),
          cell(r, "pad_fraction", ".1f", 100), cell(r, "computed_per_real_token", ".2f"), cell(r, "startup_s", ".1f"),
          cell(r, "first_step_s", ".2f"),
          cell(r, "peak_memory_mb", ".0f"), cell(r, "mfu", ".1f", 100)] for r in results if r.get("stage")],
        text_columns=4)
    rows = []
    for size in dict.fromkeys(r["size"] for r in results):
        merge = next((r for r in results if r["size"] == size and r["run"] == "merge"), {})
        infer = next((r for r in results if r["size"] == size and r["run"] == "inference"), {})
        rows.append([size, cell(merge, "wall_s", ".1f"), cell(merge, "peak_memory_mb", ".0f"),
                     cell(infer, "tokens_per_second_batch1", ".0f"), cell(infer, "tokens_per_second_batch8", ".0f"),
                     cell(infer, "time_to_first_token_s", ".1f", 1000), cell(infer, "peak_memory_mb", ".0f")])
    lines += markdown(["size", "merge s", "merge peak MB", "gen tok/s batch 1", "gen tok/s batch 8",
                       "first token ms", "inference peak MB"], rows, text_columns=1)
    if report["comparisons"]:
        rows = []
        for c in report["comparisons"]:
            mfu = "mfu" in c
            value = f"MFU {100 * c['mfu']:.1f} %" if mfu else f"{c['speed_ratio']:.2f}"
            target = "" if c["target"] is None else (f"{100 * c['target']:.0f} %" if mfu else f"≥ {c['target']}")
            met = "" if c["met"] is None else ("yes" if c["met"] else "no")
            each = ", ".join(f"{x:.2f}" for x in c.get("round_ratios", [])) or "-"
            rows.append([c["size"], c["comparison"], value, each, cell(c, "memory_ratio", ".2f"), target, met])
        lines += markdown(["size", "comparison", "real tok/s ratio", "round by round", "peak memory ratio", "target",
                           "met"], rows)
    if report.get("cli_seconds"):
        seconds = report["cli_seconds"]
        lines += markdown(["script", "first --help s (no cache)", "--help s", "misspelt flag s"],
                          [[script, f"{seconds[f'{script} help first']:.2f}", f"{seconds[f'{script} help']:.2f}",
                            f"{seconds[f'{script} bad_flag']:.2f}"] for script in CLI_SCRIPTS], text_columns=1)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--smoke", action="store_true",
                        help="Smallest setting: micro model, 3 steps, one run per stage, no CLI timing.")
    parser.add_argument("--sizes", default=None, help="Model sizes of medllm/tiny.py, comma-separated "
                        "(default: tiny,small, and base on a GPU; --smoke: micro).")
    parser.add_argument("--runs", default=None, help="Comma-separated run names (default: all; --smoke: "
                        f"{','.join(SMOKE_RUNS)}). Names: {', '.join(r.name for r in RUNS)}.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per run; the first is not timed (default 20; --smoke 3).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Rounds of every run, the order reversed each round; a run reports its median round "
                        "(default 3; --smoke 1).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Rows per step (default: PT 4, SFT 2, DPO 4 pairs as in run_*.sh; --smoke 2).")
    parser.add_argument("--max_length", type=int, default=None,
                        help="Tokens per row: PT block size, SFT/DPO max length (default 512; --smoke 128).")
    parser.add_argument("--new_tokens", type=int, default=None, help="Tokens per generated reply (default 64; "
                        "--smoke 8).")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every process (default: torch's own choice).")
    parser.add_argument("--work_dir", default="outputs/bench", help="Models, runs, logs and bench.json/bench.md.")
    parser.add_argument("--no_cli", action="store_true", help="Skip timing --help and flag errors.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds one training run may take.")
    parser.add_argument("--inference_worker", default=None, help=argparse.SUPPRESS)  # internal: model folder
    parser.add_argument("--worker_output", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_models(sizes: list[str], work_dir: Path) -> dict[str, Path]:
    """One random GLM-4 model folder per size (medllm/tiny.py), built once and kept in the work folder."""
    from medllm.tiny import build

    folders = {}
    for size in sizes:
        folder = work_dir / "models" / f"glm4-{size}"
        if not (folder / "config.json").is_file():
            build(str(folder), arch="glm", size=size, seed=42)
        folders[size] = folder
    return folders


def resolve(args: argparse.Namespace, cuda: bool) -> tuple[list[str], list[Run], Settings]:
    """Model sizes, runs and shared settings from the command line (--smoke sets the smallest of each)."""
    from medllm.tiny import SIZES

    default_sizes = "micro" if args.smoke else ("tiny,small,base" if cuda else "tiny,small")
    sizes = [s.strip() for s in (args.sizes or default_sizes).split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"error: --sizes {','.join(unknown)}: choose from {', '.join(SIZES)}")
    names = [r.strip() for r in args.runs.split(",")] if args.runs else (
        SMOKE_RUNS if args.smoke else [r.name for r in RUNS])
    runs = [r for r in RUNS if r.name in names]
    if len(runs) != len(set(names)):
        raise SystemExit(f"error: --runs: unknown name(s); choose from {', '.join(r.name for r in RUNS)}")
    settings = Settings(steps=args.steps or (3 if args.smoke else 20), repeats=args.repeats or (1 if args.smoke else 3),
                        batch_size=args.batch_size or (2 if args.smoke else None),
                        max_length=args.max_length or (128 if args.smoke else 512),
                        new_tokens=args.new_tokens or (8 if args.smoke else 64),
                        work_dir=Path(args.work_dir).absolute(), threads=args.threads, cuda=cuda, timeout=args.timeout)
    return sizes, runs, settings


def median_round(rounds: list[dict]) -> dict:
    """One run's result from its rounds: the round of median real tokens/s (every figure from that one process),
    with each round's rate; a failed round fails the run."""
    failed = next((r for r in rounds if "error" in r), None)
    if failed or len(rounds) == 1:
        return failed or rounds[0]
    ranked = sorted(rounds, key=lambda r: r["real_tokens_per_second"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_real_tokens_per_second": [r["real_tokens_per_second"]
                                                                                 for r in rounds]}


def benchmark_size(size: str, model_dir: Path, runs: list[Run], settings: Settings) -> list[dict]:
    """Every training run on one model size (``settings.repeats`` rounds, the order reversed each round, so a
    machine that slows down or speeds up over the minutes of a round weighs on every run alike), then merge the SFT
    adapter and generate with the merged model."""
    rounds: dict[str, list[dict]] = {run.name: [] for run in runs}
    for index in range(settings.repeats):
        for run in (runs if index % 2 == 0 else runs[::-1]):
            rounds[run.name].append(run_training(run, size, model_dir, settings))
    results = [median_round(rounds[run.name]) for run in runs]
    sft = next((r for r in results if r["stage"] == "sft" and "--use_peft" not in r["flags"] and "error" not in r),
               None)  # a LoRA adapter to merge
    infer_model = model_dir
    if sft:
        results.append(run_merge(size, model_dir, Path(sft["output_dir"]), settings))
        infer_model = Path(results[-1]["merged_dir"]) if "error" not in results[-1] else model_dir
    results.append(run_inference(size, infer_model, settings))
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if args.inference_worker:
        inference_worker(args.inference_worker, args.worker_output, args.new_tokens)
        return {}
    import torch

    from medllm.flops import matmul_peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul peak is measured with the threads the runs get
    sizes, runs, settings = resolve(args, torch.cuda.is_available())
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(settings.work_dir / "cache", ignore_errors=True)  # the first run of each stage tokenizes
    report: dict[str, Any] = {"machine": machine(settings), "settings": {
        "steps": settings.steps, "timed_steps": settings.steps - 1, "repeats": settings.repeats,
        "batch_size": settings.batch_size or STAGE_BATCH_SIZE, "max_length": settings.max_length,
        "new_tokens": settings.new_tokens, "sizes": sizes, "runs": [r.name for r in runs]}}
    busy = report["machine"]["load_average_start"][0]
    if torch.get_num_threads() > 1 and busy > 0.5:  # other processes hold cores: parallel regions stall
        report["machine"]["warning"] = (f"load average {busy:.1f} at start with {torch.get_num_threads()} threads: "
                                        "other jobs share the cores, figures can be several times too low; "
                                        "re-run on a quiet machine or with --threads 1")
        logger.warning("%s.", report["machine"]["warning"])
    models = build_models(sizes, settings.work_dir)

    # Run: the matmul peak is measured before and after each size; the machine's best is the roof
    results, peaks = [], [matmul_peak_flops()]
    for size in sizes:
        results += benchmark_size(size, models[size], runs, settings)
        peaks.append(matmul_peak_flops())
    if not (args.smoke or args.no_cli):
        report["cli_seconds"] = time_cli(settings)

    # Report
    report["peak"] = dict(max(peaks, key=lambda p: p["flops_per_second"]),
                          measured_gflops=[round(p["flops_per_second"] / 1e9, 1) for p in peaks])
    for r in results:
        if "model_flops_per_second" in r:
            r["mfu"] = round(r["model_flops_per_second"] / report["peak"]["flops_per_second"], 4)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["results"], report["comparisons"] = results, compare(results)
    text = tables(report)
    (settings.work_dir / "bench.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    (settings.work_dir / "bench.md").write_text(text, encoding="utf-8")
    logger.info("Results (%s):\n%s", settings.work_dir / "bench.json", text)
    failed = [f"{r['size']}/{r['run']}" for r in results if "error" in r]
    if failed:
        logger.error("Failed runs: %s (their logs are under %s)", ", ".join(failed), settings.work_dir)
        sys.exit(1)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a file: make the medllm package importable
    main()
