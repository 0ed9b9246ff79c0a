"""One error hierarchy. The CLI maps each to a one-line message and an exit code."""

from __future__ import annotations


class InfercompError(Exception):
    """Base error: a problem the user can fix. Exit code 2 unless a subclass says otherwise."""

    exit_code = 2


class UsageError(InfercompError):
    """Bad option values or combinations."""


class CheckpointError(InfercompError):
    """A checkpoint that is missing, unreadable, malformed, or would be overwritten."""


class ModelError(InfercompError):
    """A model reference that cannot be resolved, is not trusted, or does not fit the tensors."""


class DataError(InfercompError):
    """A --data file that is missing or does not hold what is needed."""


class OutputKept(KeyboardInterrupt):
    """Ctrl-C / SIGTERM after the output was written completely (while it was read back and
    measured): the output is valid and kept, and the CLI says so (exit 130)."""

    def __init__(self, path: object):
        super().__init__(str(path))
        self.path = path


class GateFailed(InfercompError):
    """A --fail-if gate did not hold (exit 1: the run worked, the result is not good enough)."""

    exit_code = 1
