# The two commands of the README: `make demo` (set up + the whole chain on the tiny default)
# and `make test` (set up + the test suite). Both create .venv on first use; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test tiny eval bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

models/tiny-glm4/config.json: | $(STAMP)
	$(PY) -m medllm.tiny --output_dir models/tiny-glm4

tiny: models/tiny-glm4/config.json

demo: $(STAMP) tiny
	$(PY) inference.py --base_model models/tiny-glm4 --max_new_tokens 32

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs cache models
