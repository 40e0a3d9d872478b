"""The thin side of the warm worker: what ``entrypoint.py`` runs on every FEDn call.

See :mod:`fedseg_clinic.warm_worker` for the design. This module runs once per train /
validate call, so it imports only what it needs from the standard library (no pathlib,
logging, dataclasses, typing, numpy or TensorFlow: on a loaded 2-core machine each of
those costs tens of milliseconds per call); ``fedn.yaml`` starts it with ``python -S``
(no site-packages either). When the worker cannot do the job, :func:`main` re-executes
the entry point with the full environment (:func:`run_in_process`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import time

WARM_ENV = "FEDSEG_WARM_WORKER"
WATCH_ENV = "FEDSEG_WARM_WATCH_PID"
START_TIMEOUT_ENV = "FEDSEG_WARM_START_TIMEOUT_S"
JOB_TIMEOUT_ENV = "FEDSEG_WARM_JOB_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 600.0
DEFAULT_JOB_TIMEOUT_S = 6 * 3600.0
ENTRIES = ("train", "validate", "predict")
# The environment that decides which clinic a worker serves (see warm_worker: isolation).
KEY_ENV = ("FEDSEG_DATA_DIR", "FEDSEG_SETTINGS", "FEDSEG_STATE_DIR", "FEDSEG_CLIENT_NAME")
SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh"})
EXIT_USER_ERROR = 1
EXIT_BUDGET = 3
POLL_S = 1.0
CODE_DIR = os.path.dirname(os.path.abspath(__file__))


class WorkerGoneError(Exception):
    """The worker closed the connection without an answer (it died)."""


class WorkerFiles:
    """The files of one clinic's worker in the package folder.

    Sockets are bound and connected by their relative name from inside the folder: a
    Unix socket path is limited to 107 bytes and package folders can be deeper than that.
    """

    __slots__ = ("folder", "key")

    def __init__(self, folder: str, key: str) -> None:
        self.folder = os.path.abspath(folder)
        self.key = key

    @property
    def socket(self) -> str:
        """Socket file name (relative to the folder)."""
        return f"warm-{self.key}.sock"

    def path(self, suffix: str) -> str:
        """Absolute path of ``warm-<key>.<suffix>`` (sock, pid, lock, log)."""
        return os.path.join(self.folder, f"warm-{self.key}.{suffix}")


def worker_key(environ: object) -> str:
    """Hash of what identifies the clinic a worker serves (and the code it runs)."""
    get = environ.get  # type: ignore[attr-defined]
    parts = [f"{k}={get(k, '')}" for k in KEY_ENV] + [f"code={CODE_DIR}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def worker_files(folder: str | None = None) -> WorkerFiles:
    """The worker files for this process's clinic, in ``folder`` (default: the cwd)."""
    return WorkerFiles(folder or os.getcwd(), worker_key(os.environ))


def warm_enabled() -> bool:
    """False when ``$FEDSEG_WARM_WORKER`` is 0/false/no/off."""
    return os.environ.get(WARM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (exit with one line if bad)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SystemExit(f"fedseg: error: ${name}={raw!r}: not a positive number of seconds")
    return value


# -- processes (/proc) -------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return comm, int(fields[1]), int(fields[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start``, is still the same process)."""
    stat = proc_stat(pid)
    return stat is not None and (start is None or stat[2] == start)


def client_process() -> tuple[int, int] | None:
    """(pid, start) of the FEDn client: the nearest ancestor that is not a shell.

    FEDn runs ``bash -c "python entrypoint.py ..."``; bash may or may not exec python,
    so the shells between are skipped. ``$FEDSEG_WARM_WATCH_PID`` overrides.
    """
    override = os.environ.get(WATCH_ENV, "").strip()
    if override:
        stat = proc_stat(int(override)) if override.isdigit() else None
        return (int(override), stat[2]) if stat else None
    pid = os.getppid()
    while pid > 1:
        stat = proc_stat(pid)
        if stat is None:
            return None
        if stat[0] not in SHELLS:
            return pid, stat[2]
        pid = stat[1]
    return None


# -- wire protocol: one JSON object per line ---------------------------------------------

def send(sock: socket.socket, message: dict) -> None:
    """Send one message."""
    sock.sendall(json.dumps(message).encode() + b"\n")


def receive(sock: socket.socket, timeout_s: float) -> dict:
    """Read one JSON line; WorkerGoneError on EOF, TimeoutError after ``timeout_s``."""
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
            raise WorkerGoneError("connection closed without an answer")
        buffer += chunk
    answer = json.loads(buffer.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise WorkerGoneError(f"malformed answer {answer!r}")
    return answer


def connect(files: WorkerFiles) -> socket.socket | None:
    """A connection to the worker, or None when none listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = files.path("sock")
    before = os.getcwd()
    try:
        if len(path.encode()) < 100:
            sock.connect(path)
        else:
            os.chdir(files.folder)  # the relative socket name (see WorkerFiles)
            sock.connect(files.socket)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    finally:
        if os.getcwd() != before:
            os.chdir(before)
    return sock


def ping(files: WorkerFiles, timeout_s: float = 30.0) -> dict | None:
    """The worker's hello (pid, key, data summary), or None when none answers."""
    sock = connect(files)
    if sock is None:
        return None
    try:
        send(sock, {"op": "ping"})
        return receive(sock, timeout_s)
    except (WorkerGoneError, OSError, ValueError):
        return None
    finally:
        sock.close()


# -- start, hand over, wait --------------------------------------------------------------

def private_open(path: str) -> object:
    """Open for appending, created 0600 (the log names data folders and ledger lines)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def start_worker(files: WorkerFiles, timeout_s: float | None = None) -> dict | None:
    """Start this clinic's worker (unless one answers) and wait until it answers.

    Returns:
        Its hello, or None when it could not start (its log says why).
    """
    hello = ping(files)
    if hello is not None:
        return hello
    import subprocess  # only here: most calls find a running worker

    timeout_s = timeout_s or env_seconds(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
    argv = [sys.executable, "-m", "fedseg_clinic.warm_worker"]
    watched = client_process()
    if watched is not None:
        argv += ["--watch", str(watched[0]), "--watch-start", str(watched[1])]

    def spawn() -> subprocess.Popen:
        with private_open(files.path("log")) as log:
            # Same process group as the FEDn client: stopping the client's group stops it.
            return subprocess.Popen(argv, cwd=files.folder, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, close_fds=True)

    proc = spawn()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hello = ping(files)
        if hello is not None:
            return hello
        code = proc.poll()
        if code not in (None, 0):
            return None
        if code == 0 and not lock_held(files):
            # It found the lock taken by a worker that has ended since: try again.
            proc = spawn()
        time.sleep(0.2)
    proc.kill()
    return None


def lock_held(files: WorkerFiles) -> bool:
    """Whether a worker holds this clinic's lock (is running or starting)."""
    import fcntl

    try:
        fd = os.open(files.path("lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def _print_error(code: int, message: str) -> None:
    prefix = "fedseg: privacy budget" if code == EXIT_BUDGET else "fedseg: error"
    print(f"{prefix}: {message}", file=sys.stderr)


def run_entry(entry: str, args: list[str], folder: str | None = None) -> int | None:
    """Hand one entry point's job to the clinic's worker.

    Returns:
        The exit code for the entry point, or None when the caller must do the job in
        its own process (worker turned off or not startable).
    """
    if not warm_enabled() or entry not in ENTRIES or len(args) != 2:
        return None  # the in-process path also prints the usage line
    files = worker_files(folder)
    job = {"op": "job", "entry": entry, "key": files.key,
           "args": [os.path.abspath(a) for a in args]}
    job_timeout = env_seconds(JOB_TIMEOUT_ENV, DEFAULT_JOB_TIMEOUT_S)
    log = files.path("log")
    for attempt in (1, 2):
        hello = start_worker(files)
        if hello is None:
            print(f"fedseg: warm worker did not start (read {log}); "
                  f"running {entry} in this process", file=sys.stderr)
            return None
        pid = int(hello.get("pid", 0))
        sock = connect(files)
        if sock is None:
            continue  # it just went away: start another
        try:
            send(sock, job)
            answer = receive(sock, job_timeout)
        except TimeoutError:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
            _print_error(EXIT_USER_ERROR, f"warm worker pid {pid}: {entry} did not finish in "
                         f"{job_timeout:.0f} s (${JOB_TIMEOUT_ENV}); stopped it, read {log}")
            return EXIT_USER_ERROR
        except (WorkerGoneError, OSError, ValueError) as exc:
            if entry == "train" or attempt == 2:
                # Never run a training twice: its privacy cost may be in the ledger already.
                _print_error(EXIT_USER_ERROR, f"warm worker pid {pid} died during {entry} "
                             f"({exc}); read {log}; the next call starts a new one")
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


def startup(folder: str | None = None) -> int | None:
    """The ``startup`` entry point: start the worker, print its data summary.

    Returns:
        0, or None when the caller must do ``startup`` in its own process.
    """
    if not warm_enabled():
        return None
    files = worker_files(folder)
    hello = start_worker(files)
    if hello is None:
        print(f"fedseg: warm worker did not start (read {files.path('log')}); "
              "every call will run in its own process", file=sys.stderr)
        return None
    print(json.dumps({**hello.get("summary", {}), "warm_worker": hello.get("pid")},
                     default=str))
    return 0


def run_in_process(script: str, argv: list[str]) -> None:
    """Re-execute ``script`` with the full environment and the worker off (no return).

    The thin path runs under ``python -S`` (no site-packages); the in-process path
    needs them (numpy, TensorFlow).
    """
    os.environ[WARM_ENV] = "0"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, script, *argv])


def main(script: str, argv: list[str]) -> None:
    """``entrypoint.py``: the warm path if it applies, else the in-process entry point."""
    code = None
    if argv and argv[0] == "startup":
        code = startup()
    elif argv:
        code = run_entry(argv[0], argv[1:])
    if code is not None:
        sys.exit(code)
    if sys.flags.no_site:
        run_in_process(script, argv)
    from fedseg_clinic.fedn_package import main as in_process

    in_process(argv)
