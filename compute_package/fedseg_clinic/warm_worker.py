"""The package route's warm worker: TensorFlow and the traced model kept across FEDn calls.

FEDn 0.33.0 runs every package entry point as a fresh ``bash -c "python entrypoint.py
train IN OUT"`` (``fedn.utils.dispatcher.Dispatcher.run_cmd``). Measured on a shared
2-core machine: the interpreter starts in 0.1 s, importing TensorFlow takes 5-13 s, then
the model is built and the DP step traced on its first call; so each call paid ~30 s of
which ~1-4 s was training (bench/RESULTS.md). This module keeps that cost to once per
client:

* ``startup`` (run once by FEDn when the client starts) launches one worker process per
  clinic: ``python -m fedseg_clinic.warm_worker --watch PID``. It builds
  :class:`~fedseg_clinic.app.ClinicApp` (TensorFlow, data, model) and then serves jobs on
  a Unix socket ``warm-<key>.sock`` in the package folder (mode 0600, peers of another
  uid refused; never a TCP port). ``startup`` returns once it answers.
* ``train`` / ``validate`` / ``predict`` become thin clients
  (:mod:`fedseg_clinic.warm_client`, run by ``python -S entrypoint.py``: standard
  library only, no site-packages): they send ``{"entry", "args"}`` and wait for the
  worker's answer; the worker reads and writes the same files the in-process entry
  point would.

Lifecycle and failure:

* Isolation: ``<key>`` hashes the clinic's data folder, settings file, state folder, client
  name and code folder, so one worker serves exactly one clinic's data; an flock on
  ``warm-<key>.lock`` keeps a second one from starting.
* Watchdog: the worker watches the FEDn client process (the nearest ancestor of the entry
  point that is not a shell, or ``$FEDSEG_WARM_WATCH_PID``) and exits within a second of
  its end; SIGTERM (the client's process group being stopped) ends it too. It removes its
  socket and pid file on the way out.
* A worker that is not running (never started, died) is started again by the next call,
  which waits for it. If it cannot start, the call works in its own process as before and
  says so on stderr.
* A worker that dies during a job: ``validate`` / ``predict`` are run again in a fresh
  worker; ``train`` fails with one line (its privacy cost may already be in the ledger, so
  it is never run twice) and the next call starts a new worker.
* A job that outlasts ``$FEDSEG_WARM_JOB_TIMEOUT_S`` (default 6 h) stops the worker and
  fails. ``$FEDSEG_WARM_WORKER=0`` turns all of this off (a fresh process per call).

The worker re-reads the clinic settings when the settings file changes (as the fresh
process per call did); it keeps the DP trainer across rounds like the callback route.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg_clinic.warm_client import (
    ENTRIES,
    EXIT_BUDGET,
    EXIT_USER_ERROR,
    POLL_S,
    WorkerFiles,
    WorkerGoneError,
    private_open,
    proc_stat,
    process_alive,
    receive,
    send,
    worker_files,
)

logger = logging.getLogger(__name__)


class Worker:
    """Serves one clinic's jobs on its socket until its client process ends."""

    def __init__(self, files: WorkerFiles, watch: tuple[int, int | None] | None) -> None:
        self.files = files
        self.watch = watch
        self.app: Any = None
        self._settings_stamp: tuple[float, int] | None = None
        self._listener: socket.socket | None = None

    def _settings_file_stamp(self) -> tuple[float, int] | None:
        from fedseg_clinic.settings import default_settings_path

        path = Path(os.environ.get("FEDSEG_SETTINGS") or default_settings_path())
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def load_app(self) -> None:
        """Build the clinic app (TensorFlow import, data, model)."""
        from fedseg_clinic.app import ClinicApp

        tic = time.monotonic()
        self._settings_stamp = self._settings_file_stamp()
        self.app = ClinicApp.from_environment()
        logger.info("clinic app ready in %.1f s", time.monotonic() - tic)

    def hello(self) -> dict[str, Any]:
        """Answer to a ping."""
        return {"ok": True, "pid": os.getpid(), "key": self.files.key,
                "summary": self.app.data_summary()}

    def listen(self) -> None:
        """Bind the socket: 0600 from the start (umask), so no other user can connect."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.socket)  # a dead worker's; we hold the lock (cwd: folder)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.files.socket)
        finally:
            os.umask(old)
        os.chmod(self.files.socket, 0o600)
        sock.listen(8)
        self._listener = sock

    def _peer_is_us(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == os.getuid()

    def run_job(self, message: dict[str, Any]) -> dict[str, Any]:
        """One entry point's work; errors become codes and one-line messages."""
        from fedseg_clinic.errors import FedsegError
        from fedseg_clinic.fedn_package import run_job
        from fedseg_clinic.privacy.ledger import BudgetExceededError

        entry, args = message.get("entry"), message.get("args")
        if message.get("key") != self.files.key:
            return {"code": EXIT_USER_ERROR,
                    "message": "this warm worker serves another clinic's data folder"}
        if entry not in ENTRIES or not isinstance(args, list) or len(args) != 2:
            return {"code": EXIT_USER_ERROR, "message": f"bad job {entry!r} {args!r}"}
        tic = time.monotonic()
        logger.info("%s started", entry)
        try:
            if self._settings_file_stamp() != self._settings_stamp:
                logger.info("settings file changed: reloading the clinic app")
                self.load_app()
            run_job(self.app, entry, Path(args[0]), Path(args[1]))
        except BudgetExceededError as exc:
            return {"code": EXIT_BUDGET, "message": str(exc)}
        except FedsegError as exc:
            return {"code": EXIT_USER_ERROR, "message": str(exc)}
        except Exception as exc:  # a bug: keep serving, as the callback client does
            logger.exception("%s failed", entry)
            text = " ".join(str(exc).split()) or type(exc).__name__
            return {"code": EXIT_USER_ERROR, "message": f"{entry}: {type(exc).__name__}: "
                                                        f"{text} (read {self.files.path('log')})"}
        logger.info("%s done in %.2f s", entry, time.monotonic() - tic)
        return {"code": 0}

    def serve_forever(self) -> None:
        """Accept connections one at a time (jobs of one client are sequential anyway)."""
        assert self._listener is not None
        # accept() wakes every POLL_S: Python runs signal handlers only in the main
        # thread, and a SIGTERM the kernel hands to another thread (the watchdog, a
        # TensorFlow pool) does not interrupt a blocking accept(). Without the timeout
        # the worker slept through its client's stop until SIGKILL, leaving its pid file.
        self._listener.settimeout(POLL_S)
        while True:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            if self.watch is not None and not process_alive(*self.watch):
                # Its client just ended (the watchdog polls once a second): take no
                # more jobs; the caller sees a closed connection and starts a new one.
                conn.close()
                self.cleanup()
                os._exit(0)
            with conn:
                try:
                    if not self._peer_is_us(conn):
                        logger.warning("refused a connection from another user")
                        continue
                    message = receive(conn, 60.0)
                    if message.get("op") == "ping":
                        send(conn, self.hello())
                    elif message.get("op") == "job":
                        send(conn, self.run_job(message))
                    else:
                        send(conn, {"code": EXIT_USER_ERROR, "message": "unknown op"})
                except (OSError, ValueError, WorkerGoneError, TimeoutError) as exc:
                    logger.warning("connection dropped: %s", exc)

    def watchdog(self) -> None:
        """Exit (cleaning up) once the watched client process is gone."""
        assert self.watch is not None
        pid, start = self.watch
        while process_alive(pid, start):
            time.sleep(POLL_S)
        logger.info("client process %d ended: stopping", pid)
        self.cleanup()
        os._exit(0)

    def cleanup(self) -> None:
        """Remove the socket and pid file if they are still ours."""
        # No signal handler may cut this short (it runs in the watchdog thread too).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            try:
                owner = json.loads(Path(self.files.path("pid")).read_text()).get("pid")
            except (OSError, ValueError):
                owner = None
            if owner == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.files.path("sock"))
                with contextlib.suppress(OSError):
                    os.unlink(self.files.path("pid"))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _write_pid_file(files: WorkerFiles) -> None:
    stat = proc_stat(os.getpid())
    tmp = Path(files.path("pid.tmp"))
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": stat[2] if stat else None,
                               "key": files.key}))
    os.replace(tmp, files.path("pid"))


def serve(watch: tuple[int, int | None] | None) -> int:
    """The worker process: lock, build the app, listen, serve until the client ends."""
    from fedseg_clinic.errors import FedsegError

    files = worker_files()
    lock = private_open(files.path("lock"))  # held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"warm worker for {files.key} already runs", file=sys.stderr)
        return 0
    worker = Worker(files, watch)
    if watch is not None:
        if not process_alive(*watch):
            return 0
        threading.Thread(target=worker.watchdog, daemon=True).start()

    def on_term(signum: int, _frame: Any) -> None:
        # Once: stopping the client's process group signals this worker twice (the group,
        # then each member), and a second SystemExit raised inside the first one's
        # cleanup left the socket and pid file of a dead worker behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            worker.load_app()
        except FedsegError as exc:
            print(f"fedseg: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        _write_pid_file(files)
        worker.listen()
        logger.info("warm worker pid %d serving on %s", os.getpid(), files.path("sock"))
        worker.serve_forever()
    finally:
        worker.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedseg_clinic.warm_worker [--watch PID --watch-start TICKS]``."""
    parser = argparse.ArgumentParser(prog="python -m fedseg_clinic.warm_worker",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=int, default=None,
                        help="exit when this process (the FEDn client) ends")
    parser.add_argument("--watch-start", type=int, default=None,
                        help="its start time in clock ticks (guards against pid reuse)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watch = (args.watch, args.watch_start) if args.watch else None
    return serve(watch)


if __name__ == "__main__":
    sys.exit(main())
