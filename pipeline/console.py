"""What the console shows: a progress bar per stage (on a terminal) and one line per step.

The libraries' own logs (Ray, Ray Data, MLflow, torch.compile's build) show only with
`spin-pipeline --verbose`; without it they go to their log files: MLflow's below WARNING nowhere,
Ray's to RUN/logs/ray.log and to Ray's session directory. The choice travels in the environment
(SPIN_VERBOSE), which the Ray and MLflow set-up read, because those libraries configure their
logging once per process.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

VERBOSE = "SPIN_VERBOSE"


def set_verbose(verbose: bool) -> None:
    """Choose, for this process and its children, whether the libraries' logs reach the console."""
    os.environ[VERBOSE] = "1" if verbose else "0"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")  # read when mlflow loads
    # torch.compile's C++ build warns on a machine without CUDA that it found none, and its
    # lowering of some graphs about its own deprecated internals
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE, "0") == "1"


@contextmanager
def stderr_to(log: Path) -> Iterator[IO[str]]:
    """For the block, whatever this process writes to its standard error (file descriptor 2, where
    Ray's C++ core logs and no Python setting reaches) is appended to `log`. Yields a stream to
    the console's standard error, for progress bars."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    console = os.dup(2)
    with open(log, "ab") as target:
        os.dup2(target.fileno(), 2)
    try:
        with os.fdopen(os.dup(console), "w") as stream:
            yield stream
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)
        os.close(console)
