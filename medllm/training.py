"""Helpers every training stage shares: output folder safety, resuming, cached tokenization, a
non-finite-loss guard and a parameter count taken once for the trainers, and atomic final saves."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from medllm.errors import MedLLMError

logger = logging.getLogger(__name__)

MODEL_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(training_args, run_args) -> None:
    """Refuse to train into a folder that already holds a trained model, unless asked to overwrite or resume."""
    output = Path(training_args.output_dir)
    if not output.is_dir():
        return
    has_model = any((output / marker).exists() for marker in MODEL_MARKERS)
    has_checkpoints = any(CHECKPOINT_RE.match(p.name) for p in output.iterdir())
    if training_args.resume_from_checkpoint or not (has_model or has_checkpoints):
        return
    if not run_args.overwrite_output_dir:
        raise MedLLMError(f"output_dir {output} already holds a trained model or checkpoints; pass "
                          "--overwrite_output_dir to replace it or --resume_from_checkpoint True to continue.")
    if is_main_process():
        for child in output.iterdir():
            if CHECKPOINT_RE.match(child.name):
                shutil.rmtree(child)
        logger.warning("--overwrite_output_dir: removed old checkpoints in %s", output)


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """Newest ``checkpoint-N`` that finished writing (trainer_state.json is written last), or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    complete = [p for p in folder.iterdir()
                if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    incomplete = [p.name for p in folder.iterdir()
                  if CHECKPOINT_RE.match(p.name) and not (p / "trainer_state.json").is_file()]
    if incomplete:
        logger.warning("Ignoring unfinished checkpoint(s) in %s: %s", output_dir, ", ".join(sorted(incomplete)))
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1))))


def resolve_resume_checkpoint(training_args) -> Optional[str]:
    """``--resume_from_checkpoint``: a path, or True/last for the newest complete checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "False", "false"):
        return None
    if str(value).lower() in ("true", "last", "1"):
        checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise MedLLMError(f"--resume_from_checkpoint True: no complete checkpoint in {training_args.output_dir}.")
        logger.info("Resuming from %s", checkpoint)
        return checkpoint
    if not Path(value, "trainer_state.json").is_file():
        raise MedLLMError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no trainer_state.json).")
    return str(value)


def default_cache_dir(model_args, training_args) -> str:
    return model_args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(training_args.output_dir)), "cache")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (datasets are hashed record by record)."""
    digest = hashlib.sha256()
    for part in parts:
        if hasattr(part, "to_list") and hasattr(part, "column_names"):  # a datasets.Dataset
            for record in part:
                digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode())
        else:
            digest.update(json.dumps(part, ensure_ascii=False, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint(text, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None))


def cached_map(dataset, function: Callable, cache_dir: str, key: list, training_args, desc: str,
               num_proc: Optional[int] = None, overwrite: bool = False, batched: bool = True):
    """``dataset.map(function)`` saved under ``cache_dir`` by a key of the data, tokenizer and settings.

    The main process computes and saves it; the other ranks wait and load it, so it is done once per run
    and skipped entirely by a second run with the same inputs.
    """
    from datasets import load_from_disk

    path = Path(cache_dir) / f"{desc.replace(' ', '_')}-{fingerprint(dataset, *key)}"
    with training_args.main_process_first(desc=desc):
        if path.is_dir() and not overwrite:
            logger.info("%s: using the cached result in %s", desc, path)
            return load_from_disk(str(path))
        workers = min(num_proc or 1, os.cpu_count() or 1, max(1, len(dataset) // 256))
        result = dataset.map(function, batched=batched, num_proc=workers if workers > 1 else None,
                             remove_columns=dataset.column_names, desc=desc)
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            result.save_to_disk(str(staging))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(staging, path)
            logger.info("%s: cached in %s", desc, path)
        return result


def peak_memory_mb() -> dict[str, float]:
    """Peak memory of this process so far: ``peak_rss_mb`` (Linux ru_maxrss is in KiB) and, where there is a
    GPU, ``peak_cuda_mb`` (torch.cuda.max_memory_allocated)."""
    import resource

    import torch

    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


class NonFiniteLossGuard:
    """Trainer mixin: stop at once when the loss is NaN or inf, naming the step, keeping the last checkpoint."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        value = float(loss.detach().float().mean())
        if not math.isfinite(value):
            step = self.state.global_step + 1
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
            hint = ("fp16 overflowed: use --bf16 instead of --fp16, or" if self.args.fp16 else "try --bf16 or")
            raise MedLLMError(f"loss became {value} at step {step}; stopped training ({kept}). "
                              f"{hint} a lower --learning_rate (now {self.args.learning_rate}).")
        return loss


class ParameterCountOnce:
    """Trainer mixin: Trainer adds ``6 x tokens x non-embedding parameters`` to its FLOP total every step, and counts
    the parameters by walking the model each time (about 0.5 ms a step on the ``tiny`` model); they are counted
    once."""

    def floating_point_ops(self, inputs) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        counted = getattr(self, "_parameter_count", None)
        if counted is None or counted[0] is not self.model:
            counted = self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * counted[1]


def save_final(trainer, tokenizer, output_dir: str, chat_template: Optional[str] = None) -> None:
    """Save the trained model (adapter or full weights) and tokenizer atomically into ``output_dir``.

    Everything is written to a temporary folder first; only complete files are renamed into place.
    The tokenizer carries the chat template that was trained.
    """
    output = Path(output_dir)
    staging = output / ".final.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # on every rank: ZeRO-3 / FSDP gather the weights here
    if trainer.is_world_process_zero():
        try:
            if chat_template:
                tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(staging)
            from medllm.modeling import make_portable

            make_portable(staging)
            for item in staging.iterdir():
                target = output / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("Saved the trained model to %s", output)
    trainer.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- benchmark hook (benchmarks/bench.py)

BENCH_FILE_ENV = "MEDLLM_BENCH_FILE"  # when set, the trainers record timing, tokens and peak memory into this JSON file


def default_callbacks() -> list:
    """Callbacks every stage's trainer gets: the benchmark recorder when ``$MEDLLM_BENCH_FILE`` is set, else none."""
    path = os.environ.get(BENCH_FILE_ENV)
    return [_benchmark_callback_class()(path)] if path else []


def _process_age_s() -> Optional[float]:
    """Seconds since this process started (Linux /proc, 10 ms resolution), or None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _benchmark_callback_class():
    import time

    import torch
    from transformers import TrainerCallback

    class BenchmarkCallback(TrainerCallback):
        """Records what benchmarks/bench.py reports: when the process started and the first step began, what
        the training forward passes were fed by the end of each optimizer step (rows, tokens with padding, and
        documents: a packed row holds several), torch's thread count, and peak memory (RSS; CUDA
        max_memory_allocated). Written at the end of training by the main process. Real (non-padding) token
        counts come from the stage's own metrics."""

        def __init__(self, path: str):
            self.path = path
            self.record: dict[str, Any] = {"steps": []}
            self.counts = [0, 0, 0]  # rows, fed tokens, documents of the training forward passes so far
            self.hook = None

        def count(self, module, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not (module.training and torch.is_grad_enabled() and ids is not None and ids.dim() == 2):
                return  # a reference model's no-grad pass is not counted
            positions = kwargs.get("position_ids")
            self.counts[0] += ids.shape[0]
            self.counts[1] += ids.numel()
            if positions is None:  # one document per row
                self.counts[2] += ids.shape[0]
            else:  # a document starts where positions restart; a padding run (pad token at position 0) is none
                pad = getattr(getattr(module, "config", None), "pad_token_id", None)
                self.counts[2] += int(((positions == 0) & (ids != (-1 if pad is None else pad))).sum())

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            age = _process_age_s()
            self.record.update(process_start_time=None if age is None else time.time() - age,
                               train_begin_time=time.time(), torch_threads=torch.get_num_threads())
            if model is not None:
                self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kwargs):
            self.record.setdefault("first_step_begin_time", time.time())

        def on_step_end(self, args, state, control, **kwargs):
            self.record["steps"].append([time.time(), *self.counts])  # [time, rows, fed tokens, documents]

        def on_train_end(self, args, state, control, **kwargs):
            if self.hook is not None:
                self.hook.remove()
            self.record.update(peak_memory_mb())
            if state.is_world_process_zero:
                target = Path(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                staging.write_text(json.dumps(self.record, indent=1) + "\n", encoding="utf-8")
                os.replace(staging, target)

    return BenchmarkCallback
