"""The project's own errors: problems a user can fix. The entry points print them on one line and exit 2.

Each message names the key (or file), the bad value and a fix. Subclasses also derive from the built-in
type the situation matches, so ``except ValueError`` elsewhere keeps working.
"""

from __future__ import annotations


class DifflabError(Exception):
    """A problem in what the user asked for (config values, files, checkpoints)."""

    exit_code = 2


class ConfigError(DifflabError, ValueError):
    """A config value that cannot work, e.g. ``n=0`` or ``sampler.eta=-1``."""


class DataError(DifflabError, ValueError):
    """A data file that is missing, unreadable, or holds arrays of the wrong kind."""


class DataNotFound(DifflabError, FileNotFoundError):
    """A data file or folder that is not there (says where to get it)."""


class CheckpointError(DifflabError, RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class NonFiniteLossError(DifflabError, FloatingPointError):
    """Training diverged: a loss or gradient norm that is nan or inf (exit 3: not a typo, a diverged run)."""

    exit_code = 3
