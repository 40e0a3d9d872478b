"""Helpers shared by the commands that run experiments (run, demo, sweep, baseline)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path


def default_runs_dir() -> Path:
    """``./runs``: the one place a default follows the shell's folder (printed before use)."""
    return Path(os.getcwd()) / "runs"


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so `kill` also stops the clients and network we started.

    Every command that starts FEDn processes installs it: its ``finally`` blocks then
    stop them by pid, as they do on Ctrl-C.
    """

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def quiet_fedn() -> None:
    """Keep only fedn's warnings (it logs DEBUG to stdout by itself) unless -v was given."""
    import fedn.common.log_config  # noqa: F401 - it configures the "fedn" logger on import

    if logging.getLogger().level >= logging.WARNING:
        logging.getLogger("fedn").setLevel(logging.WARNING)
