"""Shared fixtures: a micro GLM-4 model built once per test session, offline."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "medicalgpt"
sys.path.insert(0, str(REPO))
# Saved --help parsers (medllm/cli_cache.py) of this session's runs go to a temporary folder, not ~/.cache.
os.environ.setdefault("MEDLLM_CACHE_DIR", tempfile.mkdtemp(prefix="medllm-test-cache-"))
# A shell starts background jobs with Ctrl-C (SIGINT) ignored, and children inherit that. The tests that press Ctrl-C
# in a stage need it to arrive as from a terminal: the run catches it, so the stages it starts get the default.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A micro random GLM-4 (2 layers, 64 wide) with the glm4 chat template, built once per session."""
    from medllm.tiny import build

    return build(str(tmp_path_factory.mktemp("models") / "micro-glm4"), arch="glm", size="micro", seed=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data/medicalgpt, or skip when a fresh clone has no shared folder beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/medicalgpt is absent")
    return SHARED_DATA


def run_script(*args: str, env: dict | None = None, timeout: int = 600):
    """Run a repo script with this interpreter; returns the CompletedProcess (text mode)."""
    import subprocess

    # One thread per subprocess: on 2 cores, torchrun's two ranks with two threads each thrash.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def count_compiled_graphs(monkeypatch):
    """``count_compiled_graphs(stage_module)`` (medllm.causal_lm or medllm.preference): a list that gets the number
    of graphs dynamo has compiled so far at the end of every optimizer step of the trainers that module builds from
    then on. Dynamo starts afresh, and is reset again after the test."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    def start(stage_module) -> list[int]:
        graphs_per_step: list[int] = []

        class CountGraphs(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                graphs_per_step.append(counters["stats"]["unique_graphs"])

        callbacks = stage_module.default_callbacks
        monkeypatch.setattr(stage_module, "default_callbacks", lambda: [*callbacks(), CountGraphs()])
        torch._dynamo.reset()
        counters.clear()
        return graphs_per_step

    yield start
    torch._dynamo.reset()
