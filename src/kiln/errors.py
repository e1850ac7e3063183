"""The one exception type users see: what was wrong, and how to fix it."""

from __future__ import annotations


class KilnError(Exception):
    """A user-facing failure. The CLI prints it without a traceback and exits with code 2.

    >>> raise KilnError("weights file not found: w.pt", hint="check the --weights path")
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  hint: {hint}" if hint else message)


class Skip(Exception):
    """A variant that cannot run here (missing package, no GPU, unsupported source): listed with this reason,
    never faked.

    >>> raise Skip("onnxruntime is not installed (pip install onnxruntime)")
    """
