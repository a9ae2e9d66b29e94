"""CMB evaluation with OpenCompass: what to evaluate, checks before the run, and the scores after it.

Stdlib only: ``run_eval.sh`` runs ``check`` with any python3 before the eval environment exists, the
pipeline reads the summary from the main ``.venv``, and the OpenCompass configs (in ``.venv-eval``) take
their model list from :func:`models_from_env`, so the environment contract is defined here once.

    python -m medllm.evaluation check                       # models and data from the environment, or why not
    python -m medllm.evaluation report --work_dir outputs/eval   # one line per model from the latest summary

Environment (a relative path is taken from the repo root):
  MODEL_PATH    model folder (default outputs/demo/dpo-merged, the pipeline's final merged model)
  MODEL_ABBR    its name in the summary (default: the folder's name)
  MODEL_PATHS   several models in one run, "abbr1=path1,abbr2=path2" (replaces MODEL_PATH/MODEL_ABBR)
  CMB_DATA_DIR  folder with val.json and test.json in CMB format (default data/cmb)
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

from medllm.errors import DataError, MedLLMError, run_cli
from medllm.modeling import check_model_folder

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = os.path.join("outputs", "demo", "dpo-merged")  # the last model run_pipeline.sh writes
DEFAULT_DATA_DIR = os.path.join("data", "cmb")
DATASETS = {"cmb": "val", "cmb_test": "test"}  # OpenCompass dataset abbr -> CMB split (file <split>.json)
CMB_FIELDS = ("exam_type", "exam_class", "question_type", "question", "option")


def _from_root(path: str, root: Path) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(path.strip())))


def models_from_env(environ: Mapping[str, str] = os.environ, root: Path = REPO) -> list[tuple[str, str]]:
    """``[(abbr, absolute model folder), ...]`` from MODEL_PATHS, else MODEL_PATH/MODEL_ABBR, else the default."""
    spec = environ.get("MODEL_PATHS", "").strip()
    if spec:
        pairs = [item.partition("=")[::2] if "=" in item else ("", item) for item in spec.split(",") if item.strip()]
    else:
        pairs = [(environ.get("MODEL_ABBR", ""), environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH)]
    models = []
    for abbr, path in pairs:
        if not path.strip():
            raise MedLLMError(f"MODEL_PATHS={spec!r}: entry {abbr!r} has no path (write abbr=path,abbr=path).")
        path = _from_root(path, root)
        models.append((abbr.strip() or os.path.basename(path), path))
    abbrs = [abbr for abbr, _ in models]
    repeated = sorted({abbr for abbr in abbrs if abbrs.count(abbr) > 1})
    if repeated:
        raise MedLLMError(f"model names repeat ({', '.join(repeated)}): give each an abbr in MODEL_PATHS=abbr=path,...")
    return models


def data_dir_from_env(environ: Mapping[str, str] = os.environ, root: Path = REPO) -> str:
    """The absolute CMB data folder: CMB_DATA_DIR or data/cmb."""
    return _from_root(environ.get("CMB_DATA_DIR") or DEFAULT_DATA_DIR, root)


def read_cmb_split(data_dir: str, split: str) -> tuple[list[dict], int]:
    """The questions of ``data_dir/<split>.json`` and how many have no ``answer``; MedLLMError if unusable."""
    path = os.path.join(data_dir, f"{split}.json")
    if not os.path.isdir(data_dir):
        raise MedLLMError(f"CMB data folder not found: {data_dir} (set CMB_DATA_DIR to a folder with val.json and "
                          f"test.json).")
    if not os.path.isfile(path):
        raise MedLLMError(f"CMB data: {path} not found (the folder needs val.json and test.json).")
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(path, error.lineno, None, f"not valid JSON ({error.msg})") from error
    if not isinstance(items, list) or not items:
        raise DataError(path, None, None, "expected a non-empty JSON array of CMB questions")
    for i, item in enumerate(items):
        missing = [field for field in CMB_FIELDS if not isinstance(item, dict) or field not in item]
        if missing:
            raise DataError(path, None, missing[0], f"question {i} has no '{missing[0]}'")
    return items, sum(1 for item in items if not item.get("answer"))


def check_inputs(models: list[tuple[str, str]], data_dir: str) -> list[str]:
    """Raise MedLLMError for a model folder or CMB file that cannot be evaluated; return notes to log."""
    for abbr, path in models:
        if not os.path.isdir(path):
            raise MedLLMError(f"model folder not found: {path} (model '{abbr}'; run the pipeline first, or set "
                              f"MODEL_PATH=folder or MODEL_PATHS=abbr=folder,...).")
        check_model_folder(path)
    notes = []
    for dataset, split in DATASETS.items():
        items, unanswered = read_cmb_split(data_dir, split)
        if unanswered:
            notes.append(f"{data_dir}/{split}.json: {unanswered} of {len(items)} questions have no answer, so "
                         f"'{dataset}' is not scored (shown as '-').")
    return notes


def latest_summary(work_dir: str) -> str:
    """The newest ``<work_dir>/<timestamp>/summary/summary_*.csv`` that OpenCompass wrote (or of a run folder)."""
    found = glob.glob(os.path.join(work_dir, "*", "summary", "summary_*.csv"))
    found += glob.glob(os.path.join(work_dir, "summary", "summary_*.csv"))
    if not found:
        raise MedLLMError(f"no OpenCompass summary under {work_dir} (expected <timestamp>/summary/summary_*.csv).")
    # Folder and file names are timestamps (YYYYMMDD_HHMMSS): the largest name is the latest run.
    return max(found, key=lambda path: (os.path.basename(os.path.dirname(os.path.dirname(path))), path))


def read_summary(csv_path: str) -> dict[str, dict[str, Optional[float]]]:
    """``{model_abbr: {"cmb": accuracy, "cmb_test": accuracy}}`` in percent; None where the table has '-'."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:4] != ["dataset", "version", "metric", "mode"]:
        raise DataError(csv_path, 1, None, "not an OpenCompass summary (header dataset,version,metric,mode,...)")
    abbrs = rows[0][4:]
    scores: dict[str, dict[str, Optional[float]]] = {abbr: dict.fromkeys(DATASETS) for abbr in abbrs}
    for line, row in enumerate(rows[1:], start=2):
        dataset, metric = row[0], row[2]
        if dataset not in DATASETS or metric not in ("accuracy", "-"):
            continue
        for abbr, cell in zip(abbrs, row[4:]):
            try:
                scores[abbr][dataset] = None if cell == "-" else float(cell)
            except ValueError:
                raise DataError(csv_path, line, abbr, f"not a number: {cell!r}") from None
    return scores


def unscored_reason(csv_path: str, abbr: str, dataset: str) -> str:
    """Why ``dataset`` has no score for ``abbr``: the error OpenCompass stored in results/, if any."""
    run_dir = os.path.dirname(os.path.dirname(csv_path))
    path = os.path.join(run_dir, "results", abbr, f"{dataset}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f).get("error") or "no score")
    except (OSError, ValueError):
        return "no result (see the OpenCompass log)"


def summary_lines(csv_path: str) -> list[str]:
    """One line per model for the pipeline's report, e.g. ``sft: CMB val 42.00, test 40.00 (accuracy %)``."""
    lines = []
    for abbr, scores in read_summary(csv_path).items():
        parts = []
        for dataset, split in DATASETS.items():
            score = scores[dataset]
            parts.append(f"{split} {score:.2f}" if score is not None
                         else f"{split} - ({unscored_reason(csv_path, abbr, dataset)})")
        lines.append(f"{abbr}: CMB {', '.join(parts)} (accuracy %)")
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medllm.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="Check the model folder(s) and CMB data named by the environment.")
    report = commands.add_parser("report", help="One line per model from the latest OpenCompass summary.")
    report.add_argument("--work_dir", default=os.path.join("outputs", "eval"),
                        help="OpenCompass's -w folder (relative: from the repo root).")
    args = parser.parse_args(argv)
    if args.command == "check":
        models, data_dir = models_from_env(), data_dir_from_env()
        notes = check_inputs(models, data_dir)
        for abbr, path in models:
            logger.info("model %s: %s", abbr, path)
        logger.info("CMB data: %s", data_dir)
        for note in notes:
            logger.warning(note)
    else:
        csv_path = latest_summary(_from_root(args.work_dir, REPO))
        logger.info("OpenCompass summary: %s", csv_path)
        for line in summary_lines(csv_path):
            logger.info(line)


if __name__ == "__main__":
    run_cli(main)
