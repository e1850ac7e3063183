"""Progress for long jobs: a rich bar on a terminal, plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from typing import IO, Protocol


class Reporter(Protocol):
    def start(self, total: int) -> None: ...
    def eta(self, seconds: float | None) -> None: ...
    def step(self, variant: str, what: str) -> None: ...
    def outcome(self, variant: str, text: str) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


class Silent:
    def start(self, total: int) -> None:
        pass

    def eta(self, seconds: float | None) -> None:
        pass

    def step(self, variant: str, what: str) -> None:
        pass

    def outcome(self, variant: str, text: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class Lines:
    """One line per variant outcome, `[ 8/20  12.4s, ~41s left] aoti/fp32: accepted`, for logs and pipes: steps
    advance the count silently, so a log holds what happened, not every step of it."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self.left: float | None = None

    def start(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def eta(self, seconds: float | None) -> None:
        """The job's own estimate of the time left (cost-weighted); without one, the count extrapolates."""
        self.left = seconds

    def step(self, variant: str, what: str) -> None:
        self.done = min(self.total, self.done + 1)

    def outcome(self, variant: str, text: str) -> None:
        elapsed = time.perf_counter() - self.t0
        guess = self.left if self.left is not None else (elapsed / self.done * (self.total - self.done) if self.done else None)
        left = f", ~{guess:.0f}s left" if guess is not None and self.total > self.done else ""
        print(f"  [{self.done:>2}/{self.total} {elapsed:5.1f}s{left}] {variant}: {text}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        print(f"  {message}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class Bar:
    """A rich progress bar: current variant and step, elapsed time, estimated time left."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[left]}"),
                                 console=Console(file=stream or sys.stderr), transient=True,
                                 # never swap the process's sys.stdout/sys.stderr for proxies: output printed after
                                 # the bar (the variants table) must reach the real terminal
                                 redirect_stdout=False, redirect_stderr=False)
        self.task = self.progress.add_task("starting", total=1, left="")

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total, completed=0)
        self.progress.start()

    def eta(self, seconds: float | None) -> None:
        self.progress.update(self.task, left=f"~{seconds:.0f}s left" if seconds is not None else "")

    def step(self, variant: str, what: str) -> None:
        self.progress.update(self.task, description=f"{variant}: {what}", advance=1)

    def outcome(self, variant: str, text: str) -> None:
        self.progress.console.print(f"  {variant}: {text}", highlight=False, markup=False)

    def note(self, message: str) -> None:
        self.progress.console.print(f"  {message}", highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def reporter(*, quiet: bool = False, stream: IO[str] | None = None) -> Reporter:
    """The right reporter for where output goes: a bar on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return Silent()
    return Bar(stream) if stream.isatty() else Lines(stream)
