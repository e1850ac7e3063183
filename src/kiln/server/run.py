"""Run the app under uvicorn: SIGTERM/SIGINT stop accepting, finish in-flight requests, exit 0."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after shutting down, so the process dies by it (-15). A graceful
        # drain is a clean exit: a second SIGINT still forces an immediate stop.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def run(app: Any, *, host: str, port: int, grace_s: float) -> None:
    """Serve until a signal; in-flight requests get `grace_s` seconds to finish."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(grace_s)), lifespan="on")
    _Server(config).run()
