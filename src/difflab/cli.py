"""What every entry point does around its work: the project's errors as one line and exit 2, signals as
128 + signal number, everything else as the usual traceback (HYDRA_FULL_ERROR=1 shows one for all)."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, TypeVar

from difflab.errors import DifflabError

T = TypeVar("T")


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_error(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for errors a user can fix from the command line, else None (a bug: keep the trace)."""
    from hydra.errors import InstantiationException

    # only if Lightning is loaded already (sample.py never imports it: no 7 s import just to print an error)
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    if isinstance(err, DifflabError):
        return one_line(str(err)), err.exit_code
    if isinstance(err, InstantiationException):
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, DifflabError):
            return one_line(str(cause)), cause.exit_code
        found = re.search(r"full_key: (\S+)", str(err))
        target = re.search(r"target '([^']+)'", str(err))
        where = f"{found.group(1) if found else 'config'}" + (f" ({target.group(1)})" if target else "")
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        return one_line(f"in {where}: {detail} (HYDRA_FULL_ERROR=1 shows the trace)"), 2
    if lightning_errors is not None and isinstance(err, lightning_errors.MisconfigurationException):
        return one_line(f"Lightning: {err} (HYDRA_FULL_ERROR=1 shows the trace)"), 2
    return None


def run(work: Callable[[], T]) -> T:
    try:
        return work()
    except Stopped as stop:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # every DDP rank stops; one says so
            print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl+C)", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        found = user_error(err)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message, code = found
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
