"""User-facing errors. Every message says where (file, key), what was expected and what was found.

The CLI maps :class:`QbenchError` to exit code 1; anything else is a bug (traceback, exit 3).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QbenchError(Exception):
    """An error caused by the user's input or environment, with a message fit to print."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.detail = message
        prefix = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(QbenchError):
    """The suite file is malformed or names something that does not exist."""


class SourceError(QbenchError):
    """A model source cannot be resolved to local files."""


class DatasetError(QbenchError):
    """A dataset cannot be found or read."""


class MissingExtraError(QbenchError):
    """An optional dependency (backend, NVML, datasets...) is not installed."""

    def __init__(self, package: str, extra: str, why: str) -> None:
        super().__init__(
            f"{why} needs the Python package '{package}', which is not installed "
            f"(pip install 'qbench-llm[{extra}]')"
        )
        self.package = package
        self.extra = extra


class NotApplicable(QbenchError):
    """The metric does not apply to this cell (e.g. an lm-eval task on a GGUF variant): the
    cell is recorded ``skipped`` with the reason."""


class StoreError(QbenchError):
    """The results directory cannot be written or holds unreadable records."""


class LockedError(StoreError):
    """Another qbench process holds the results directory."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f" (did you mean {lowered[word.lower()]}?)"
    squashed = {c.replace("_", "").lower(): c for c in choices}
    if word.replace("_", "").lower() in squashed:
        return f" (did you mean {squashed[word.replace('_', '').lower()]}?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
