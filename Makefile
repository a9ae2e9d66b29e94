# The two commands of the README: `make demo` (set up + the whole chain on the tiny default)
# and `make test` (set up + the test suite). Both create their environments on first use; a second
# run installs nothing. OpenCompass lives in .venv-eval (its numpy<2/datasets<4 pins clash with trl).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed

.PHONY: setup eval-setup demo test tiny eval bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt
	@# Save each script's parser once, so --help and flag errors answer without importing torch (medllm/cli_cache.py).
	for script in pretraining supervised_finetuning dpo_training merge_peft_adapter inference; do \
		$(PY) $$script.py --help >/dev/null || exit 1; done
	touch $(STAMP)

# OpenCompass in its own environment (requirements-eval.txt); run_eval.sh is the one place that installs it.
eval-setup: $(EVAL_STAMP)

$(EVAL_STAMP): requirements-eval.txt
	EVAL_SETUP_ONLY=1 ./run_eval.sh

models/tiny-glm4/config.json: | $(STAMP)
	$(PY) -m medllm.tiny --output_dir models/tiny-glm4 --terms_file data/vocab/medical_terms.txt

tiny: models/tiny-glm4/config.json

# The whole chain on the tiny default; FRESH=1 starts over, PIPELINE_CONFIG=... for another recipe.
demo: $(STAMP) $(EVAL_STAMP)
	./run_pipeline.sh

# CMB with OpenCompass: MODEL_PATH or MODEL_PATHS, CMB_DATA_DIR, WORK_DIR from the environment (see run_eval.sh).
eval: $(STAMP) $(EVAL_STAMP)
	./run_eval.sh

test: $(STAMP) $(EVAL_STAMP)
	$(PY) -m pytest -q tests

# Speed, memory and MFU of every stage and mode (benchmarks/README.md); e.g. BENCH_FLAGS=--threads 1
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_FLAGS)

clean:
	rm -rf outputs cache models
