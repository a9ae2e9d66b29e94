"""The project's own error type and the wrapper that turns it into a one-line message."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

logger = logging.getLogger("medllm")


class MedLLMError(Exception):
    """A problem the user can act on: bad input, a missing file, an impossible setting.

    The message says what is wrong and where (file, line, field); stage scripts print it as one
    line and exit non-zero instead of showing a traceback (``--debug`` shows it).
    """


class DataError(MedLLMError):
    """A record or file that cannot be used."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = path if line is None else f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr in one format; only the main process logs at INFO under torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=level if rank == 0 else logging.WARNING,
    )


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a stage's ``main(argv)``; a MedLLMError becomes one line on stderr and exit code 1.

    ``--debug`` anywhere in argv shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    from medllm import cli_cache

    cli_cache.check(argv)  # --help and bad flags answered from the saved parser, before heavy imports
    setup_logging()
    try:
        main(argv)
        close_process_group()
    except MedLLMError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def close_process_group() -> None:
    """Tear torch.distributed down once a stage has finished. A gloo group left to the interpreter's exit
    sometimes aborts a rank there ("terminate called without an active exception", SIGABRT), which fails a
    torchrun job whose work was done and saved (1 run in 8 to 30 of run_sft.sh with 2 CPU processes)."""
    if "torch" not in sys.modules:  # --help, or a stage that never imported torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
