"""The pipeline's report: one row per stage, every number read from the runs' own logs.

    python -m medllm.report --pipeline_dir outputs/demo

Reads each stage's ``trainer_state.json`` (losses, perplexity, DPO rewards), its TensorBoard event files
(the loss-curve PNG), the OpenCompass summary csv (CMB accuracy) and ``timings.tsv`` (wall time), and
writes ``report.md`` and ``loss_curves.png`` into the pipeline folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

STAGES = [("base", None), ("pt", "PT (LoRA)"), ("sft", "SFT (LoRA)"), ("dpo", "DPO (LoRA)")]


def training_figures(stage_dir: Path) -> dict:
    """Loss first -> last, last eval loss / perplexity and DPO reward figures from trainer_state.json."""
    states = sorted(stage_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    state_path = stage_dir / "trainer_state.json"
    if not state_path.is_file() and states:
        state_path = states[-1]
    if not state_path.is_file():
        return {}
    history = json.loads(state_path.read_text())["log_history"]
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    figures: dict = {}
    if train:
        figures["loss_first"], figures["loss_last"] = train[0]["loss"], train[-1]["loss"]
        figures["steps"] = train[-1].get("step")
    if evals:
        figures["eval_loss"] = evals[-1]["eval_loss"]
        if "eval_rewards/accuracies" not in evals[-1]:  # a language-model loss (PT/SFT), not DPO's
            figures["perplexity"] = evals[-1].get("eval_perplexity", math.exp(evals[-1]["eval_loss"]))
        for key in ("eval_rewards/accuracies", "eval_rewards/margins"):
            if key in evals[-1]:
                figures[key.replace("eval_", "")] = evals[-1][key]
    for key in ("rewards/accuracies", "rewards/margins"):
        if key not in figures and train and key in train[-1]:
            figures[key] = train[-1][key]
    return figures


def read_timings(pipeline_dir: Path) -> dict[str, float]:
    """Seconds per stage from timings.tsv (``stage<TAB>seconds``; the last line for a stage wins)."""
    path = pipeline_dir / "timings.tsv"
    timings: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, seconds = line.partition("\t")
            if seconds:
                timings[name] = float(seconds)
    return timings


def read_cmb(pipeline_dir: Path) -> dict[str, dict]:
    """{model abbreviation: {"cmb": val accuracy, "cmb_test": held-out accuracy}} from the latest summary."""
    from medllm.evaluation import latest_summary, read_summary

    work_dir = pipeline_dir / "eval"
    try:
        return read_summary(latest_summary(str(work_dir)))
    except Exception as error:  # noqa: BLE001 - a report without CMB numbers is still a report
        logger.warning("No CMB summary under %s (%s)", work_dir, error)
        return {}


def read_cloze(pipeline_dir: Path) -> dict[str, dict]:
    """{model abbreviation: {"cmb": {"accuracy": ...}, "cmb_test": {...}}} from ``cloze.json`` (medllm.cloze)."""
    path = pipeline_dir / "cloze.json"
    if not path.is_file():
        logger.warning("No cloze results at %s", path)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def build_report(pipeline_dir: Path) -> str:
    """The report as Markdown."""
    timings, cmb, cloze = read_timings(pipeline_dir), read_cmb(pipeline_dir), read_cloze(pipeline_dir)
    header = ("| stage | train loss first → last | eval loss | perplexity | DPO reward acc | DPO margin "
              "| CMB val acc | CMB held-out acc | cloze val acc | cloze held-out acc | wall time |")
    rows = [header, "|" + "---|" * 11]
    for name, label in STAGES:
        figures = training_figures(pipeline_dir / name) if label else {}
        scores = cmb.get(name, {})
        knowledge = {split: (cloze.get(name, {}).get(split) or {}).get("accuracy") for split in ("cmb", "cmb_test")}
        loss = (f"{figures['loss_first']:.3f} → {figures['loss_last']:.3f}" if "loss_first" in figures else "—")
        seconds = timings.get(name, 0) + timings.get(f"merge-{name}", 0)
        rows.append(" | ".join([
            f"| {label or 'base (random init)'}", loss, _fmt(figures.get("eval_loss")),
            _fmt(figures.get("perplexity"), 1), _fmt(figures.get("rewards/accuracies"), 2),
            _fmt(figures.get("rewards/margins"), 2), _fmt(scores.get("cmb"), 1), _fmt(scores.get("cmb_test"), 1),
            _fmt(knowledge["cmb"], 1), _fmt(knowledge["cmb_test"], 1), f"{seconds:.0f} s |" if seconds else "— |",
        ]))
    total = sum(timings.values())
    lines = ["# Pipeline report", "", *rows, "",
             f"Total wall time: {total:.0f} s. Accuracy in percent (5 options: chance ≈ 20%; held-out = questions "
             "phrased as in no training file). CMB: OpenCompass, the model answers with the option letter(s). "
             "Cloze: the same single-answer questions, the option whose text the model finds most likely after "
             "the question (`medllm/cloze.py`; knowledge without the letter skill, meaningful for the base "
             "model too).", "",
             "Loss curves: `loss_curves.png`. Numbers come from each stage's `trainer_state.json`, the "
             "OpenCompass summary csv under `eval/`, `cloze.json` and `timings.tsv`."]
    return "\n".join(lines) + "\n"


def plot_loss_curves(pipeline_dir: Path, output: Path) -> bool:
    """Plot train (and eval) loss of every stage from its TensorBoard event files; False if none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for name, label in STAGES:
        runs = pipeline_dir / name / "runs"
        if not label or not runs.is_dir():
            continue
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            events = EventAccumulator(str(run))
            events.Reload()
            for tag in ("train/loss", "eval/loss"):
                if tag in events.Tags().get("scalars", []):
                    points = events.Scalars(tag)
                    curves[f"{label} {tag.split('/')[0]}"] = ([p.step for p in points], [p.value for p in points])
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [label for _, label in STAGES if label and any(k.startswith(label) for k in curves)]
    figure, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.5), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        for key, (steps, values) in curves.items():
            if key.startswith(stage):
                axis.plot(steps, values, marker="." if "eval" in key else None, label=key.split()[-1])
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return True


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--pipeline_dir", default="outputs/demo", help="The folder run_pipeline.sh wrote.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    pipeline_dir = Path(args.pipeline_dir)
    report = build_report(pipeline_dir)
    if plot_loss_curves(pipeline_dir, pipeline_dir / "loss_curves.png"):
        report += "\n![loss curves](loss_curves.png)\n"
    (pipeline_dir / "report.md").write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
