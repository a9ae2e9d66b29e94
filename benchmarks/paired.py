"""Paired timing of two ways to run a stage: every batch through both, in one process.

    python benchmarks/paired.py dpo --model_name_or_path outputs/bench/models/glm4-tiny --steps 30
    python benchmarks/paired.py loss --model_name_or_path outputs/bench/models/glm4-small
    python benchmarks/paired.py dropout --model_name_or_path outputs/bench/models/glm4-small --run "sft packed"

bench.py times each mode in its own process, minutes apart, and a machine whose speed drifts by 10-20% over minutes
moves the ratio of two such runs as much. Here each optimizer step runs the trainer's ``training_step`` once per
variant on the same batch, in alternating order (the gradients of both are summed; only the time is of interest),
and the median of the per-step ratios (baseline / ours) is printed. The comparisons:

- ``dpo``: DPO's shared prompts (``sdpa_varlen``: each prompt computed once, no padding) against trl's padded rows
  (``sdpa``, the ``--padding_free False`` path); the reference is the LoRA base, as in the default run.
- ``loss``: the CPU cross-entropy of PT and SFT (``medllm.logprobs.causal_lm_loss``) against transformers'
  ``ForCausalLMLoss``.
- ``dropout``: LoRA's ``medllm.dropout.CpuDropout`` against ``nn.Dropout`` of the same ``p``.

``loss`` and ``dropout`` apply to PT and SFT runs (trl computes DPO's loss itself and turns dropout off). The stage
runs with bench.py's flags for ``--run`` (default: the comparison's own); extra arguments go to the stage.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"pt": "pretraining.py", "sft": "supervised_finetuning.py", "dpo": "dpo_training.py"}


class Comparison(NamedTuple):
    run: str  # bench.py's run whose flags the stage gets by default
    stages: tuple  # the stages it applies to
    ours: str
    baseline: str
    switch: Callable  # switch(trainer, variant name): make the trainer's model run that variant


def switch_attention(trainer, variant: str) -> None:
    from medllm.modeling import unwrap_peft

    unwrap_peft(trainer.model).set_attn_implementation("sdpa_varlen" if variant == "shared prompt" else "sdpa")


def switch_loss(trainer, variant: str) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from medllm.logprobs import causal_lm_loss
    from medllm.modeling import unwrap_peft

    unwrap_peft(trainer.model).loss_function = causal_lm_loss if variant == "cpu loss" else ForCausalLMLoss


def switch_dropout(trainer, variant: str) -> None:
    import torch

    from medllm.dropout import CpuDropout, use_cpu_dropout

    if not use_cpu_dropout(trainer.model, CpuDropout if variant == "CpuDropout" else torch.nn.Dropout):
        raise SystemExit("paired.py dropout: this run has no LoRA dropout to switch (LoRA with --lora_dropout > 0).")


COMPARISONS = {
    "dpo": Comparison("dpo shared prompt", ("dpo",), "shared prompt", "padded", switch_attention),
    "loss": Comparison("pt packed", ("pt", "sft"), "cpu loss", "transformers loss", switch_loss),
    "dropout": Comparison("pt packed", ("pt", "sft"), "CpuDropout", "nn.Dropout", switch_dropout),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--run", default=None, help="bench.py's run whose flags the stage gets, e.g. 'sft packed'.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps; the first 3 are not timed.")
    parser.add_argument("--work_dir", default="outputs/paired")
    args, extra = parser.parse_known_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import transformers

    from benchmarks import bench

    comparison = COMPARISONS[args.comparison]
    run = next((r for r in bench.RUNS if r.name == (args.run or comparison.run)), None)
    if run is None:
        parser.error(f"--run {args.run!r}: not one of bench.py's runs ({', '.join(r.name for r in bench.RUNS)})")
    if run.stage not in comparison.stages:  # DPO's loss is trl's own, and trl turns dropout off
        stages = " and ".join(stage.upper() for stage in comparison.stages)
        parser.error(f"{args.comparison} applies to {stages} runs, not {run.name!r}")
    variants = (comparison.ours, comparison.baseline)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    training_step = transformers.Trainer.training_step

    def every_variant(trainer, model, inputs, *rest, **kwargs):
        loss = None
        for variant in variants if len(times[variants[0]]) % 2 == 0 else variants[::-1]:
            comparison.switch(trainer, variant)
            start = time.perf_counter()
            loss = training_step(trainer, model, dict(inputs), *rest, **kwargs)
            times[variant].append(time.perf_counter() - start)
        return loss

    transformers.Trainer.training_step = every_variant
    settings = bench.Settings(steps=args.steps, repeats=1, batch_size=None, max_length=512, new_tokens=0,
                              work_dir=Path(args.work_dir), threads=None, cuda=False, timeout=0)
    script = SCRIPTS[run.stage]
    sys.argv = [script, *bench.stage_flags(run, Path(args.model_name_or_path), settings.work_dir / "out", settings),
                *extra]
    runpy.run_path(str(REPO / script), run_name="__main__")
    ours, baseline = (times[variant][3:] for variant in variants)
    ratios = sorted(b / o for b, o in zip(baseline, ours))
    print(f"{run.name}: {len(ratios)} steps timed. training_step median: {comparison.ours} "
          f"{statistics.median(ours) * 1e3:.1f} ms, {comparison.baseline} {statistics.median(baseline) * 1e3:.1f} ms; "
          f"{comparison.baseline} / {comparison.ours} per step: median {statistics.median(ratios):.3f} "
          f"(10th-90th percentile {ratios[len(ratios) // 10]:.3f}-{ratios[(9 * len(ratios)) // 10]:.3f})")


if __name__ == "__main__":
    main()
