"""Local server processes and their TCP ports: start, wait for readiness, stop.

Every long-lived process of a network (object store, state store, API server,
combiners, hooks) is started here as the leader of its own session, so that
stopping its process group also stops the children it forked (gunicorn
workers, PostgreSQL backends). A process is recorded with its pid and its
creation time; stopping checks both, so a recycled pid is never killed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


@dataclass
class ProcessRecord:
    """One started process.

    Attributes:
        name: Our name for it ("api", "combiner-1", "moto", ...).
        pid: Process id of the session leader.
        create_time: psutil's creation time of that pid (guards against pid reuse).
        port: The TCP port it serves on, or None.
        log: Its combined stdout/stderr log file.
        stop_signal: First signal on stop (SIGINT is PostgreSQL's fast shutdown).
    """

    name: str
    pid: int
    create_time: float
    port: int | None
    log: str
    stop_signal: int = int(signal.SIGTERM)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProcessRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(name=str(data["name"]), pid=int(data["pid"]),
                   create_time=float(data["create_time"]),
                   port=None if data.get("port") is None else int(data["port"]),
                   log=str(data["log"]),
                   stop_signal=int(data.get("stop_signal", signal.SIGTERM)))


def port_owner(port: int) -> str:
    """Describe who listens on a TCP port ("pid 123 (python)" or "an unknown process")."""
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return "an unknown process"
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "an unknown process"
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "an unknown process"


def is_port_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether nothing listens on host:port (a bind test, as the server would do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too: a port left in TIME_WAIT by a stopped network is
        # free for them, so it must count as free here.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1.

    The sockets are held open together, so the OS cannot hand out one port twice.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((LOCALHOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def require_free_ports(ports: dict[str, int], host: str = LOCALHOST) -> None:
    """Raise FedsegError for the first named port that is taken or duplicated.

    Args:
        ports: Role (e.g. "api_port") -> port number.
        host: The address they will be bound on.

    Raises:
        FedsegError: A port taken, or ``host`` not an address of this machine.
    """
    seen: dict[int, str] = {}
    for role, port in ports.items():
        if port in seen:
            raise FedsegError(f"{role} {port} is the same port as {seen[port]}")
        seen[port] = role
        try:
            free = is_port_free(port, host)
        except OSError as exc:
            raise FedsegError(f"host {host}: cannot listen there ({exc.strerror}; is it an "
                              "address of this machine?)") from None
        if not free:
            raise FedsegError(f"{role} {port} is already in use by {port_owner(port)}")


def port_is_listening(port: int, host: str = LOCALHOST, timeout_s: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def spawn(name: str, argv: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str],
          port: int | None = None, user: str | None = None,
          stop_signal: int = signal.SIGTERM) -> ProcessRecord:
    """Start a process as leader of its own session, output to a log file.

    Args:
        name: Our name for the process.
        argv: Program and arguments (no shell).
        cwd: Working directory (explicit: never the caller's).
        log: File for stdout and stderr (appended).
        env: The complete environment of the process.
        port: The port it will serve on (recorded for status).
        user: Run as this user (only when we are root), e.g. "postgres".
        stop_signal: First signal :func:`stop` sends.

    Returns:
        The record to keep in the network state.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as log_file:
        try:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, user=user,
            )
        except OSError as exc:
            raise FedsegError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0
    logger.info("started %s pid %d: %s", name, proc.pid, " ".join(argv))
    return ProcessRecord(name=name, pid=proc.pid, create_time=create_time, port=port,
                         log=str(log), stop_signal=int(stop_signal))


def _process(record: ProcessRecord) -> psutil.Process | None:
    """The live process of a record, or None when gone or its pid was reused."""
    try:
        proc = psutil.Process(record.pid)
        if record.create_time and abs(proc.create_time() - record.create_time) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def is_alive(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs (and is the same process)."""
    return _process(record) is not None


def wait_ready(record: ProcessRecord, check: Callable[[], bool], timeout_s: float,
               what: str) -> None:
    """Poll ``check`` until it is true; fail early if the process dies.

    Raises:
        FedsegError: The process exited or the timeout passed; names the log file.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if not is_alive(record):
            raise FedsegError(f"{record.name} exited while starting ({what}); read {record.log}")
        if check():
            return
        if time.monotonic() > deadline:
            raise FedsegError(f"{record.name} not ready after {timeout_s:.0f} s ({what}); "
                              f"read {record.log}")
        time.sleep(0.2)


def stop(record: ProcessRecord, timeout_s: float = 10.0) -> bool:
    """Stop a recorded process and its process group: signal, wait, then SIGKILL.

    Args:
        record: The process to stop.
        timeout_s: How long to wait after the first signal (record.stop_signal)
            before SIGKILL.

    Returns:
        True if something was running and got stopped, False if it was already gone.
    """
    proc = _process(record)
    if proc is None and psutil.pid_exists(record.pid) and not _is_zombie(record.pid):
        # The pid now belongs to another process. Linux keeps a pid number reserved
        # while any process still uses it as session id, so nothing of ours is left.
        return False
    # Members of its session that outlived the leader (e.g. gunicorn workers).
    members = [m for m in _session_members(record.pid)
               if _create_time(m) >= record.create_time - 1.0]
    if proc is None and not members:
        return False
    targets = ([proc] if proc is not None else []) + members
    _signal_group(record.pid, targets, record.stop_signal)
    _gone, alive = psutil.wait_procs(targets, timeout=timeout_s)
    if alive:
        logger.warning("%s did not stop in %.0f s: SIGKILL", record.name, timeout_s)
        _signal_group(record.pid, alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5.0)
    _reap(record.pid)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _create_time(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def _session_members(sid: int) -> list[psutil.Process]:
    """Processes whose session id is ``sid`` (the leader's pid), leader excluded."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != sid and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, procs: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.warning("no permission to signal process group %d", pgid)
    # Processes that left the group (setsid in a child) still get the signal.
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            continue


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (no zombie left)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
