"""CMB evaluation with OpenCompass: configs, the environment contract, the summary reader, and real runs.

The real-OpenCompass tests need .venv-eval (`make eval-setup`, or any `./run_eval.sh` run) and skip without it.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from medllm.cmb import CMB_PROMPT_TEMPLATE, render_cmb_prompt
from medllm.errors import MedLLMError
from medllm.evaluation import (
    check_inputs, data_dir_from_env, latest_summary, models_from_env, read_summary, summary_lines,
)

logger = logging.getLogger(__name__)
EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
DATA = REPO / "data" / "cmb"
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
needs_eval_env = pytest.mark.skipif(not (REPO / ".venv-eval" / "bin" / "opencompass").exists(),
                                    reason=".venv-eval is absent: `make eval-setup` (or ./run_eval.sh) creates it")


def load_split(split: str) -> list[dict]:
    return json.loads((DATA / f"{split}.json").read_text(encoding="utf-8"))


def write_csv(path: Path, rows: list[list[str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(row) for row in rows) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- configs and environment contract (no OpenCompass)


def test_dataset_config_prompt_is_the_cmb_prompt():
    source = (REPO / "configs" / "datasets" / "cmb" / "cmb_gen_dfb5c4.py").read_text(encoding="utf-8")
    prompts = [
        ast.literal_eval(keyword.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"
        and any(k.arg == "role" and ast.literal_eval(k.value) == "HUMAN" for k in node.keywords)
        for keyword in node.keywords if keyword.arg == "prompt"
    ]
    assert prompts == [CMB_PROMPT_TEMPLATE]


def test_config_layout_imports_through_read_base():
    source = (REPO / "configs" / "eval_chat_demo.py").read_text(encoding="utf-8")
    assert "from .datasets.cmb.cmb_gen_dfb5c4 import cmb_datasets" in source
    assert "from .models.chatglm.hf_glm4_9b_chat import models" in source
    assert "with read_base():" in source


def test_models_from_env_defaults_and_overrides(tmp_path):
    default = ("dpo-merged", str(tmp_path / "outputs" / "demo" / "dpo-merged"))
    assert models_from_env({}, tmp_path) == [default]
    assert models_from_env({"MODEL_PATH": "/m/sft", "MODEL_ABBR": "sft"}, tmp_path) == [("sft", "/m/sft")]
    assert models_from_env({"MODEL_PATH": "outputs/merged-sft/"}, tmp_path) == [
        ("merged-sft", str(tmp_path / "outputs" / "merged-sft"))]
    env = {"MODEL_PATHS": "base=models/tiny-glm4, sft=/abs/sft,/abs/dpo", "MODEL_PATH": "ignored"}
    assert models_from_env(env, tmp_path) == [
        ("base", str(tmp_path / "models" / "tiny-glm4")), ("sft", "/abs/sft"), ("dpo", "/abs/dpo")]
    with pytest.raises(MedLLMError, match=r"model names repeat \(dpo\)"):
        models_from_env({"MODEL_PATHS": "/a/dpo,/b/dpo"}, tmp_path)
    with pytest.raises(MedLLMError, match="entry 'x' has no path"):
        models_from_env({"MODEL_PATHS": "x="}, tmp_path)
    assert data_dir_from_env({}, tmp_path) == str(tmp_path / "data" / "cmb")
    assert data_dir_from_env({"CMB_DATA_DIR": "/d/cmb"}, tmp_path) == "/d/cmb"


def test_check_inputs_names_what_is_missing(tmp_path, tiny_model_dir):
    model = [("tiny", tiny_model_dir)]
    assert check_inputs(model, str(DATA)) == []
    with pytest.raises(MedLLMError, match=r"model folder not found: /no/such \(model 'x'"):
        check_inputs([("x", "/no/such")], str(DATA))
    with pytest.raises(MedLLMError, match="no config.json"):
        check_inputs([("x", str(tmp_path))], str(DATA))
    with pytest.raises(MedLLMError, match="CMB data folder not found: /no/data"):
        check_inputs(model, "/no/data")
    data = tmp_path / "cmb"
    data.mkdir()
    shutil.copy(DATA / "val.json", data / "val.json")
    with pytest.raises(MedLLMError, match=r"test.json not found \(the folder needs val.json and test.json\)"):
        check_inputs(model, str(data))
    (data / "test.json").write_text("[{", encoding="utf-8")
    with pytest.raises(MedLLMError, match=r"test.json:1: not valid JSON"):
        check_inputs(model, str(data))
    (data / "test.json").write_text('[{"question": "q"}]', encoding="utf-8")
    with pytest.raises(MedLLMError, match=r"test.json: field 'exam_type': question 0 has no 'exam_type'"):
        check_inputs(model, str(data))
    unanswered = [{k: v for k, v in item.items() if k != "answer"} for item in load_split("test")]
    (data / "test.json").write_text(json.dumps(unanswered, ensure_ascii=False), encoding="utf-8")
    assert check_inputs(model, str(data)) == [
        f"{data}/test.json: 100 of 100 questions have no answer, so 'cmb_test' is not scored (shown as '-')."]


def test_check_cli_is_stdlib_only_and_one_line():
    # -S: no site-packages, as with the bare python3 that run_eval.sh uses before .venv-eval exists.
    env = dict(os.environ, MODEL_PATH="/no/such/model")
    env.pop("MODEL_PATHS", None)
    result = subprocess.run([sys.executable, "-S", "-m", "medllm.evaluation", "check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model folder not found: /no/such/model (model 'model'; run the pipeline first, or set "
        "MODEL_PATH=folder or MODEL_PATHS=abbr=folder,...).")


@pytest.mark.parametrize("env, message", [
    ({"MODEL_PATH": "/no/such/model"}, "error: model folder not found: /no/such/model"),
    ({"CMB_DATA_DIR": "/no/such/cmb"}, "error: CMB data folder not found: /no/such/cmb"),
])
def test_run_eval_sh_stops_before_installing(tmp_path, tiny_model_dir, env, message):
    full_env = {**os.environ, "MODEL_PATH": tiny_model_dir, "EVAL_VENV": str(tmp_path / "venv"), **env}
    full_env.pop("MODEL_PATHS", None)
    result = subprocess.run(["bash", str(REPO / "run_eval.sh")], cwd=tmp_path, env=full_env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "venv").exists()


def test_requirements_eval_pins():
    lines = {line.split("#")[0].strip() for line in (REPO / "requirements-eval.txt").read_text().splitlines()}
    # opencompass 0.5.4 pins numpy<2; pyarrow 26 refuses to import with numpy 1.x (pip check does not notice).
    assert {"opencompass==0.5.4", "numpy<2", "pyarrow<26", "transformers>=5.0,<6"} <= lines


# ---------------------------------------------------------------- summary reader


def test_read_summary_and_report_lines(tmp_path):
    run = tmp_path / "eval" / "20260101_120000"
    old = write_csv(tmp_path / "eval" / "20251231_235959" / "summary" / "summary_20251231_235959.csv",
                    [["dataset", "version", "metric", "mode", "old"], ["cmb", "fb9826", "accuracy", "gen", "1.00"]])
    new = write_csv(run / "summary" / "summary_20260101_120000.csv", [
        ["dataset", "version", "metric", "mode", "base", "merged-sft"],
        ["cmb", "fb9826", "accuracy", "gen", "18.00", "63.50"],
        ["cmb_test", "-", "-", "-", "-", "-"],
    ])
    (run / "results" / "base").mkdir(parents=True)
    (run / "results" / "base" / "cmb_test.json").write_text(json.dumps({"error": "not scored: 100 of 100 ..."}))
    assert latest_summary(str(tmp_path / "eval")) == new != old
    assert latest_summary(str(run)) == new
    assert read_summary(new) == {"base": {"cmb": 18.0, "cmb_test": None},
                                 "merged-sft": {"cmb": 63.5, "cmb_test": None}}
    assert summary_lines(new) == [
        "base: CMB val 18.00, test - (not scored: 100 of 100 ...) (accuracy %)",
        "merged-sft: CMB val 63.50, test - (no result (see the OpenCompass log)) (accuracy %)",
    ]
    with pytest.raises(MedLLMError, match="no OpenCompass summary under"):
        latest_summary(str(tmp_path / "nothing"))
    bad = write_csv(tmp_path / "bad.csv",
                    [["dataset", "version", "metric", "mode", "m"], ["cmb", "v", "accuracy", "gen", "x"]])
    with pytest.raises(MedLLMError, match=r"bad.csv:2: field 'm': not a number: 'x'"):
        read_summary(bad)


# ---------------------------------------------------------------- inside .venv-eval

EVAL_ENV_PROBE = r"""
import json, sys
import numpy, pyarrow, datasets, transformers
from transformers import PreTrainedTokenizerBase
from mmengine.config import Config
from opencompass.datasets import CMBDataset as StockCMBDataset
from medllm.opencompass_compat import ChatModel, CMBDataset

model_dir, data_dir, config = sys.argv[1:4]
cfg = Config.fromfile(config, format_python_code=False)
model = ChatModel(path=model_dir, max_seq_len=512)
texts = ["[gMASK]<sop><|user|>\n你好<|assistant|>", "[gMASK]<sop><|user|>\n发烧怎么办？多喝水<|assistant|>"]
batch = model.tokenizer.batch_encode_plus(texts, padding=True, return_tensors="pt", add_special_tokens=False)
print(json.dumps(dict(
    numpy=numpy.__version__, pyarrow=pyarrow.__version__, datasets=datasets.__version__,
    transformers=transformers.__version__, has_batch_encode_plus=hasattr(PreTrainedTokenizerBase, "batch_encode_plus"),
    ids_equal=batch["input_ids"][1].tolist() == model.tokenizer(texts[1], add_special_tokens=False)["input_ids"],
    dtype=str(model.model.dtype), generated=model.generate(["你好"], max_out_len=3),
    stock_test_answers=sorted(set(StockCMBDataset.load(data_dir)["test"]["answer"])),
    our_test_answers=sorted(set(CMBDataset.load(data_dir)["test"]["answer"])),
    prompt=cfg.datasets[0].infer_cfg.prompt_template.template.round[0].prompt,
    types=[f"{t.__module__}.{t.__qualname__}" for t in (cfg.models[0].type, cfg.datasets[0].type)],
    paths=[cfg.models[0].path, cfg.datasets[0].path],
), ensure_ascii=False))
"""


@needs_eval_env
def test_eval_environment_facts(tiny_model_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), MODEL_PATH=tiny_model_dir, **OFFLINE)
    env.pop("MODEL_PATHS", None)
    env.pop("CMB_DATA_DIR", None)
    result = subprocess.run([str(EVAL_PYTHON), "-c", EVAL_ENV_PROBE, tiny_model_dir, str(DATA),
                             str(REPO / "configs" / "eval_chat_demo.py")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["numpy"].startswith("1.") and int(facts["pyarrow"].split(".")[0]) < 26
    assert int(facts["datasets"].split(".")[0]) < 4 and facts["transformers"].startswith("5.")
    assert facts["has_batch_encode_plus"] is False  # why ChatModel restores it
    assert facts["ids_equal"] is True
    assert facts["dtype"] == "torch.float32"
    assert len(facts["generated"]) == 1 and isinstance(facts["generated"][0], str)
    assert facts["stock_test_answers"] == ["NULL"]  # why CMBDataset is ours
    assert facts["our_test_answers"] == sorted({item["answer"] for item in load_split("test")})
    assert facts["prompt"] == CMB_PROMPT_TEMPLATE
    assert facts["types"] == ["medllm.opencompass_compat.ChatModel", "medllm.opencompass_compat.CMBDataset"]
    assert facts["paths"] == [tiny_model_dir, str(DATA)]


def train_to_answer(base_dir: str, output_dir: Path, items: list[dict], steps: int = 300, batch_size: int = 16,
                    lr: float = 3e-3, seed: int = 0) -> str:
    """Full fine-tuning of the micro model on the CMB prompts of ``items`` -> their answer letter (glm4 labels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medllm.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = get_template("glm4", tokenizer)
    rows = [template.encode(tokenizer, [{"role": "user", "content": render_cmb_prompt(item)},
                                        {"role": "assistant", "content": item["answer"]}]) for item in items]
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a micro model: one thread is faster than two when other work shares the cores
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        picks = torch.Generator().manual_seed(seed)
        for step in range(steps):
            index = torch.randint(0, len(rows), (batch_size,), generator=picks)
            used = int(mask[index].sum(1).max())  # trim the batch to its longest row
            loss = model(input_ids=ids[index, :used], attention_mask=mask[index, :used],
                         labels=labels[index, :used]).loss
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / steps)  # linear decay to 0
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(base_dir, output_dir)  # tokenizer files exactly as the toolkit saves them
    model.save_pretrained(output_dir)
    return str(output_dir)


@needs_eval_env
def test_trained_model_beats_random_in_one_opencompass_run(tmp_path, tiny_model_dir):
    items = load_split("val") + load_split("test")
    trained = train_to_answer(tiny_model_dir, tmp_path / "trained", items)
    work_dir = tmp_path / "eval"
    stamp = REPO / ".venv-eval" / ".installed"
    stamp_before = stamp.stat().st_mtime if stamp.exists() else None
    # One generate() call per split: the micro model is cheap, the calls are not.
    env = dict(os.environ, MODEL_PATHS=f"random={tiny_model_dir},trained={trained}", WORK_DIR=str(work_dir),
               EVAL_BATCH_SIZE="100")
    env.pop("CMB_DATA_DIR", None)
    result = subprocess.run(["bash", str(REPO / "run_eval.sh")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "dataset    version    metric    mode      random    trained" in output  # OpenCompass's printed table
    if stamp_before is not None:
        assert stamp.stat().st_mtime == stamp_before  # a second run installs nothing
    # OpenCompass's scratch folders land in the work dir.
    assert {".cache", "tmp", "icl_inference_output"} <= {p.name for p in work_dir.iterdir()}

    csv_path = latest_summary(str(work_dir))
    scores = read_summary(csv_path)
    logger.info("CMB accuracy: %s", scores)
    assert set(scores) == {"random", "trained"}
    for dataset in ("cmb", "cmb_test"):
        assert scores["random"][dataset] <= 30.0, scores
        assert scores["trained"][dataset] >= 60.0, scores
        assert scores["trained"][dataset] - scores["random"][dataset] >= 40.0, scores
    lines = summary_lines(csv_path)
    trained_scores = scores["trained"]
    assert lines[1] == (f"trained: CMB val {trained_scores['cmb']:.2f}, test {trained_scores['cmb_test']:.2f} "
                        f"(accuracy %)")
    assert all(line in output for line in lines)

    # The model saw exactly the CMB prompt the SFT data is written with (no extra newline), for every question.
    run_dir = Path(csv_path).parent.parent
    predictions = json.loads((run_dir / "predictions" / "trained" / "cmb.json").read_text(encoding="utf-8"))
    sent = [predictions[str(i)]["origin_prompt"] for i in range(len(predictions))]
    assert sent == [[{"role": "HUMAN", "prompt": render_cmb_prompt(item)}] for item in load_split("val")]
    with open(csv_path, encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["dataset", "version", "metric", "mode", "random", "trained"]


@needs_eval_env
def test_source_checkout_run_py_and_unanswered_test_split(tmp_path, tiny_model_dir):
    data = tmp_path / "cmb"
    data.mkdir()
    (data / "val.json").write_text(json.dumps(load_split("val")[:6], ensure_ascii=False), encoding="utf-8")
    hidden = [{k: v for k, v in item.items() if k != "answer"} for item in load_split("test")[:6]]
    (data / "test.json").write_text(json.dumps(hidden, ensure_ascii=False), encoding="utf-8")
    checkout = tmp_path / "opencompass"  # a source checkout's run.py is this entry point
    checkout.mkdir()
    (checkout / "run.py").write_text(
        "from opencompass.cli.main import main\n\nif __name__ == '__main__':\n    main()\n")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, MODEL_PATH=tiny_model_dir, MODEL_ABBR="tiny", CMB_DATA_DIR=str(data), **OFFLINE)
    env.pop("MODEL_PATHS", None)
    env.pop("PYTHONPATH", None)  # the config itself makes medllm importable
    result = subprocess.run([str(EVAL_PYTHON), str(checkout / "run.py"), str(REPO / "configs" / "eval_chat_demo.py"),
                             "-w", "outputs", "--debug"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "6 of 6 questions have no answer" in result.stdout + result.stderr
    csv_path = latest_summary(str(work / "outputs"))
    scores = read_summary(csv_path)
    assert scores["tiny"]["cmb_test"] is None and isinstance(scores["tiny"]["cmb"], float)
    assert summary_lines(csv_path) == [
        f"tiny: CMB val {scores['tiny']['cmb']:.2f}, test - (not scored: 6 of 6 questions have no answer in the "
        f"data file (the official CMB test answers are not public)) (accuracy %)"]
