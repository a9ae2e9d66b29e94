"""CMB questions as a cloze test: which option does the model find most likely after the question?

    python -m medllm.cloze --data_dir data/cmb --models base=models/tiny-glm4,sft=outputs/demo/sft-merged \
        --output_file outputs/demo/cloze.json

The CMB evaluation (OpenCompass, ``configs/``) asks a chat model for the answer letter, which needs both the
knowledge and the skill of pointing at an option. A cloze test scores the knowledge alone, and works for a base
model too (the pretraining stage): each option's text is scored as the continuation of the question (the mean
log-probability of its tokens, so long options are not penalised), and the most likely option is the answer.
This is how OpenCompass and lm-evaluation-harness score base models on multiple-choice sets ("ppl" / "acc_norm"
variants). Only single-answer questions count; a random model scores about 1 / number of options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medllm.evaluation import read_cmb_split

logger = logging.getLogger(__name__)
SPLITS = {"val": "cmb", "test": "cmb_test"}  # file split -> the name the OpenCompass summary uses


def option_scores(model, tokenizer, question: str, options: dict[str, str]) -> dict[str, float]:
    """Mean log-probability of each option's tokens following ``question``, in one batch."""
    import torch

    context = tokenizer(question, add_special_tokens=False)["input_ids"]
    rows = {letter: tokenizer(text, add_special_tokens=False)["input_ids"] for letter, text in options.items()}
    rows = {letter: ids for letter, ids in rows.items() if ids}
    width = len(context) + max(len(ids) for ids in rows.values())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows.values()):
        input_ids[row, :len(context) + len(ids)] = torch.tensor(context + ids)
        attention_mask[row, :len(context) + len(ids)] = 1
    with torch.no_grad():
        log_probs = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
    scores = {}
    for row, (letter, ids) in enumerate(rows.items()):
        positions = torch.arange(len(context) - 1, len(context) + len(ids) - 1)  # each predicts the next token
        scores[letter] = log_probs[row, positions, torch.tensor(ids)].mean().item()
    return scores


def cloze_accuracy(model_dir: str, data_dir: str) -> dict[str, dict]:
    """{summary name: {"accuracy": percent, "questions": scored, "skipped": multi-answer}} for val and test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medllm.modeling import check_model_folder

    path = check_model_folder(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = {}
    for split, name in SPLITS.items():
        items, _ = read_cmb_split(data_dir, split)
        single = [item for item in items if len(item.get("answer") or "") == 1]
        right = 0
        for item in single:
            options = {letter: text for letter, text in item["option"].items() if len(text) > 1}
            scores = option_scores(model, tokenizer, item["question"], options)
            right += max(scores, key=scores.get) == item["answer"]
        results[name] = {"accuracy": round(100 * right / len(single), 1) if single else None,
                         "questions": len(single), "skipped": len(items) - len(single)}
        logger.info("%s %s: %d of %d single-answer questions right (%d multi-answer skipped)", model_dir, name,
                    right, len(single), len(items) - len(single))
    return results


def main(argv: list[str]) -> None:
    from medllm.evaluation import models_from_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="abbr=folder,abbr=folder,... (or one folder), as "
                        "run_eval.sh's MODEL_PATHS; a relative folder is taken from the repo root")
    parser.add_argument("--data_dir", default="data/cmb", help="Folder with CMB val.json and test.json.")
    parser.add_argument("--output_file", default=None, help="Write {abbr: {cmb: ..., cmb_test: ...}} as JSON.")
    args = parser.parse_args(argv)
    models = models_from_env({"MODEL_PATHS": args.models})
    report = {abbr: cloze_accuracy(folder, args.data_dir) for abbr, folder in models}
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    from medllm.errors import run_cli

    run_cli(main)
