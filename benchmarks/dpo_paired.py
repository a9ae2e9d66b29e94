"""Paired timing of DPO's padding-free (shared prompt) and padded modes: every batch through both, in one process.

    python benchmarks/dpo_paired.py --model_name_or_path outputs/bench/models/glm4-tiny --steps 30

bench.py times each mode in its own process, minutes apart, and a machine whose speed drifts by 10-20% over minutes
moves the ratio of two such runs as much. Here each optimizer step runs trl's ``training_step`` once per mode on the
same batch, in alternating order (the gradients of both are summed; only the time is of interest), and the median
of the per-step ratios is printed. The model switches between ``sdpa_varlen`` (prompts computed once, no padding)
and ``sdpa`` (trl's padded rows, the ``--padding_free False`` path); the reference is the LoRA base, as in the default
run. Extra arguments go to dpo_training.py.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"shared prompt": "sdpa_varlen", "padded": "sdpa"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps; the first 3 are not timed.")
    parser.add_argument("--work_dir", default="outputs/dpo_paired")
    args, extra = parser.parse_known_args()
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import transformers

    from benchmarks import bench

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    training_step = transformers.Trainer.training_step

    def both_modes(trainer, model, inputs, *rest, **kwargs):
        causal_lm = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        order = list(MODES) if len(times["padded"]) % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            causal_lm.set_attn_implementation(MODES[mode])
            start = time.perf_counter()
            loss = training_step(trainer, model, dict(inputs), *rest, **kwargs)
            times[mode].append(time.perf_counter() - start)
        return loss

    transformers.Trainer.training_step = both_modes
    settings = bench.Settings(steps=args.steps, repeats=1, batch_size=None, max_length=512, new_tokens=0,
                              work_dir=Path(args.work_dir), threads=None, cuda=False, timeout=0)
    run = next(r for r in bench.RUNS if r.name == "dpo shared prompt")  # the bench's flags; both modes are timed
    sys.argv = ["dpo_training.py", *bench.stage_flags(run, Path(args.model_name_or_path), settings.work_dir / "out",
                                                      settings), *extra]
    runpy.run_path(str(REPO / "dpo_training.py"), run_name="__main__")
    shared, padded = (times[mode][3:] for mode in MODES)
    ratios = sorted(p / s for p, s in zip(padded, shared))
    print(f"{len(ratios)} steps timed. training_step median: shared prompt {statistics.median(shared) * 1e3:.1f} ms, "
          f"padded {statistics.median(padded) * 1e3:.1f} ms; padded / shared per step: median "
          f"{statistics.median(ratios):.3f} (10th-90th percentile {ratios[len(ratios) // 10]:.3f}-"
          f"{ratios[(9 * len(ratios)) // 10]:.3f})")


if __name__ == "__main__":
    main()
