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
* ``train`` / ``validate`` / ``predict`` become thin clients (stdlib only: no numpy, no
  TensorFlow): they send ``{"entry", "args"}`` and wait for the worker's answer; the
  worker reads and writes the same files the in-process entry point would.

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
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WARM_ENV = "FEDSEG_WARM_WORKER"
WATCH_ENV = "FEDSEG_WARM_WATCH_PID"
START_TIMEOUT_ENV = "FEDSEG_WARM_START_TIMEOUT_S"
JOB_TIMEOUT_ENV = "FEDSEG_WARM_JOB_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 600.0
DEFAULT_JOB_TIMEOUT_S = 6 * 3600.0
ENTRIES = ("train", "validate", "predict")
# The environment that decides which clinic a worker serves (see module doc: isolation).
KEY_ENV = ("FEDSEG_DATA_DIR", "FEDSEG_SETTINGS", "FEDSEG_STATE_DIR", "FEDSEG_CLIENT_NAME")
SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh"})
EXIT_USER_ERROR = 1
EXIT_BUDGET = 3
POLL_S = 1.0


class WorkerGone(Exception):
    """The worker closed the connection without an answer (it died)."""


@dataclasses.dataclass(frozen=True)
class WorkerFiles:
    """The files of one clinic's worker, relative to the package folder (the cwd).

    Relative names because a Unix socket path is limited to 107 bytes and package folders
    can be deeper than that; FEDn runs every entry point with the package folder as cwd.
    """

    folder: Path
    key: str

    @property
    def socket(self) -> str:
        """Socket file name (relative)."""
        return f"warm-{self.key}.sock"

    @property
    def pid(self) -> Path:
        """Pid file: JSON pid, start time, key."""
        return self.folder / f"warm-{self.key}.pid"

    @property
    def lock(self) -> Path:
        """Held (flock) by the running worker."""
        return self.folder / f"warm-{self.key}.lock"

    @property
    def log(self) -> Path:
        """The worker's stdout and stderr."""
        return self.folder / f"warm-{self.key}.log"


def worker_key(environ: dict[str, str] | os._Environ[str]) -> str:
    """Hash of what identifies the clinic a worker serves (and the code it runs)."""
    code = str(Path(__file__).resolve().parent)
    parts = [f"{k}={environ.get(k, '')}" for k in KEY_ENV] + [f"code={code}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def worker_files(folder: Path | None = None) -> WorkerFiles:
    """The worker files for this process's clinic, in ``folder`` (default: the cwd)."""
    return WorkerFiles(folder=(folder or Path.cwd()).resolve(), key=worker_key(os.environ))


def warm_enabled() -> bool:
    """False when ``$FEDSEG_WARM_WORKER`` is 0/false/no/off."""
    return os.environ.get(WARM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"fedseg: error: ${name}={raw!r}: not a number of seconds") from None
    if value <= 0:
        raise SystemExit(f"fedseg: error: ${name}={raw!r}: must be > 0")
    return value


# -- processes (/proc: no psutil needed in the thin client) ------------------------------

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return comm, int(fields[1]), int(fields[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start``, is still the same process)."""
    stat = _proc_stat(pid)
    return stat is not None and (start is None or stat[2] == start)


def client_process() -> tuple[int, int] | None:
    """(pid, start) of the FEDn client: the nearest ancestor that is not a shell.

    FEDn runs ``bash -c "python entrypoint.py ..."``; bash may or may not exec python,
    so the shells between are skipped. ``$FEDSEG_WARM_WATCH_PID`` overrides.
    """
    override = os.environ.get(WATCH_ENV, "").strip()
    if override:
        stat = _proc_stat(int(override)) if override.isdigit() else None
        return (int(override), stat[2]) if stat else None
    pid = os.getppid()
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            return None
        if stat[0] not in SHELLS:
            return pid, stat[2]
        pid = stat[1]
    return None


# -- wire protocol: one JSON object per line ---------------------------------------------

def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _receive(sock: socket.socket, timeout_s: float) -> dict[str, Any]:
    """Read one JSON line; WorkerGone on EOF, TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    sock.settimeout(POLL_S)
    while b"\n" not in buffer:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            continue
        if not chunk:
            raise WorkerGone("connection closed without an answer")
        buffer += chunk
    answer = json.loads(buffer.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise WorkerGone(f"malformed answer {answer!r}")
    return answer


def _connect(files: WorkerFiles) -> socket.socket | None:
    """A connection to the worker, or None when none listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _in_folder(files.folder):
            sock.connect(files.socket)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    return sock


@contextlib.contextmanager
def _in_folder(folder: Path) -> Any:
    """chdir into ``folder`` for a relative socket name (no-op when already there)."""
    before = Path.cwd()
    if before == folder:
        yield
        return
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def ping(files: WorkerFiles, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """The worker's hello (pid, key, data summary), or None when none answers."""
    sock = _connect(files)
    if sock is None:
        return None
    try:
        _send(sock, {"op": "ping"})
        return _receive(sock, timeout_s)
    except (WorkerGone, TimeoutError, OSError, ValueError):
        return None
    finally:
        sock.close()


# -- client side: start, hand over, wait -------------------------------------------------

def start_worker(files: WorkerFiles, timeout_s: float | None = None) -> dict[str, Any] | None:
    """Start this clinic's worker (unless one answers) and wait until it answers.

    Returns:
        Its hello, or None when it could not start (its log says why).
    """
    hello = ping(files)
    if hello is not None:
        return hello
    timeout_s = timeout_s or _env_seconds(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
    argv = [sys.executable, "-m", "fedseg_clinic.warm_worker"]
    watched = client_process()
    if watched is not None:
        argv += ["--watch", str(watched[0]), "--watch-start", str(watched[1])]
    with _private_open(files.log) as log:
        # Same process group as the FEDn client: stopping the client's group stops it.
        proc = subprocess.Popen(argv, cwd=files.folder, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, close_fds=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hello = ping(files)
        if hello is not None:
            return hello
        code = proc.poll()
        # 0: another worker holds the lock and is still starting; keep waiting for it.
        if code not in (None, 0):
            return None
        time.sleep(0.2)
    proc.kill()
    return None


def _private_open(path: Path) -> Any:
    """Open for appending, created 0600 (the log names data folders and ledger lines)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def _stop_pid(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _print_error(code: int, message: str) -> None:
    prefix = "fedseg: privacy budget" if code == EXIT_BUDGET else "fedseg: error"
    print(f"{prefix}: {message}", file=sys.stderr)


def run_entry(entry: str, args: Sequence[str], folder: Path | None = None) -> int | None:
    """Hand one entry point's job to the clinic's worker.

    Returns:
        The exit code for the entry point, or None when the caller must do the job in
        its own process (worker turned off or not startable).
    """
    if not warm_enabled() or entry not in ENTRIES:
        return None
    if len(args) != 2:
        return None  # the in-process path prints the usage line
    files = worker_files(folder)
    job = {"op": "job", "entry": entry, "key": files.key,
           "args": [str(Path(a).resolve()) for a in args]}
    job_timeout = _env_seconds(JOB_TIMEOUT_ENV, DEFAULT_JOB_TIMEOUT_S)
    for attempt in (1, 2):
        hello = start_worker(files)
        if hello is None:
            print(f"fedseg: warm worker did not start (read {files.log}); "
                  f"running {entry} in this process", file=sys.stderr)
            return None
        pid = int(hello.get("pid", 0))
        sock = _connect(files)
        if sock is None:
            continue  # it just went away: start another
        try:
            _send(sock, job)
            answer = _receive(sock, job_timeout)
        except TimeoutError:
            _stop_pid(pid)
            _print_error(EXIT_USER_ERROR, f"warm worker pid {pid}: {entry} did not finish in "
                         f"{job_timeout:.0f} s (${JOB_TIMEOUT_ENV}); stopped it, read {files.log}")
            return EXIT_USER_ERROR
        except (WorkerGone, OSError, ValueError) as exc:
            if entry == "train" or attempt == 2:
                # Never run a training twice: its privacy cost may be in the ledger already.
                _print_error(EXIT_USER_ERROR, f"warm worker pid {pid} died during {entry} "
                             f"({exc}); read {files.log}; the next call starts a new one")
                return EXIT_USER_ERROR
            print(f"fedseg: warm worker pid {pid} died during {entry}; "
                  "running it again in a new one", file=sys.stderr)
            continue
        finally:
            sock.close()
        code = int(answer.get("code", EXIT_USER_ERROR))
        if code != 0:
            _print_error(code, str(answer.get("message", "worker failed")))
        return code
    return EXIT_USER_ERROR


def startup(folder: Path | None = None) -> int | None:
    """The ``startup`` entry point: start the worker, print its data summary.

    Returns:
        0, or None when the caller must do ``startup`` in its own process.
    """
    if not warm_enabled():
        return None
    files = worker_files(folder)
    hello = start_worker(files)
    if hello is None:
        print(f"fedseg: warm worker did not start (read {files.log}); "
              "every call will run in its own process", file=sys.stderr)
        return None
    print(json.dumps({**hello.get("summary", {}), "warm_worker": hello.get("pid")},
                     default=str))
    return 0


# -- worker side -------------------------------------------------------------------------

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
            os.unlink(self.files.socket)  # a dead worker's; we hold the lock
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
                                                        f"{text} (read {self.files.log})"}
        logger.info("%s done in %.2f s", entry, time.monotonic() - tic)
        return {"code": 0}

    def serve_forever(self) -> None:
        """Accept connections one at a time (jobs of one client are sequential anyway)."""
        assert self._listener is not None
        while True:
            conn, _ = self._listener.accept()
            with conn:
                try:
                    if not self._peer_is_us(conn):
                        logger.warning("refused a connection from another user")
                        continue
                    message = _receive(conn, 60.0)
                    if message.get("op") == "ping":
                        _send(conn, self.hello())
                    elif message.get("op") == "job":
                        _send(conn, self.run_job(message))
                    else:
                        _send(conn, {"code": EXIT_USER_ERROR, "message": "unknown op"})
                except (OSError, ValueError, WorkerGone, TimeoutError) as exc:
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
        try:
            owner = json.loads(self.files.pid.read_text()).get("pid")
        except (OSError, ValueError):
            owner = None
        if owner == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.files.folder / self.files.socket)
            with contextlib.suppress(OSError):
                self.files.pid.unlink()


def _write_pid_file(files: WorkerFiles) -> None:
    stat = _proc_stat(os.getpid())
    tmp = files.pid.with_name(files.pid.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": stat[2] if stat else None,
                               "key": files.key}))
    os.replace(tmp, files.pid)


def serve(watch: tuple[int, int | None] | None) -> int:
    """The worker process: lock, build the app, listen, serve until the client ends."""
    from fedseg_clinic.errors import FedsegError

    files = worker_files()
    lock = _private_open(files.lock)  # held for the process's life
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
        logger.info("warm worker pid %d serving on %s/%s", os.getpid(), files.folder,
                    files.socket)
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
