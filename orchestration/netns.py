"""Linux network namespaces for multi-host tests and benchmarks on one machine.

A :class:`Netns` is the server's address on one veth pair plus ``n`` namespaces, one per
simulated clinic host: pair i has its root-namespace end here and its peer inside
namespace ``names[i]``, each pair on its own 10.213.x.0/30, so clinics reach the server
only through their own pair, at an address that exists only on these pairs. A process
runs in namespace i through :meth:`Netns.exec_argv` (``ip netns exec``). Everything is
removed by :meth:`Netns.down` (also after a failed :meth:`Netns.up`).

Creating namespaces needs root or CAP_NET_ADMIN and the ``ip`` command;
:func:`namespaces_unavailable` says why they cannot be made, so callers can skip with a
reason instead of failing.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from fedseg_clinic.errors import FedsegError

MAX_NAMESPACES = 200  # third octets of 10.213.x.0/30, with room for a random offset
_PREFIX = "10.213"


class Netns:
    """The server's address on one veth pair, and ``n`` clinic namespaces.

    ``host_ip`` (on pair 0) is the server's address. Namespaces 1.. reach it through
    their own pair with a host route (the address is local to our namespace, so no
    forwarding is needed).

    Attributes:
        names: Namespace names (``fsns<tag><i>``).
        veths: Root-namespace ends of the pairs.
        peers: Their peers (inside the namespaces).
        subnets: ``10.213.x`` of each pair (a /30: .1 here, .2 in the namespace).
        host_ip: The server's address (pair 0's root end).
        peer_ips: Each namespace's own address.
    """

    def __init__(self, n: int = 3) -> None:
        """Pick names and addresses (nothing is created yet).

        Raises:
            FedsegError: n outside 1..MAX_NAMESPACES.
        """
        if not 1 <= n <= MAX_NAMESPACES:
            raise FedsegError(f"namespaces: n={n} must be between 1 and {MAX_NAMESPACES}")
        tag = secrets.token_hex(2)
        # A random block of third octets, so two runs on one machine rarely overlap.
        base = int(tag, 16) % (256 - n)
        self.names = [f"fsns{tag}{i}" for i in range(n)]
        self.veths = [f"fsv{tag}{i}" for i in range(n)]
        self.peers = [f"fsp{tag}{i}" for i in range(n)]
        self.subnets = [f"{_PREFIX}.{base + i}" for i in range(n)]
        self.host_ip = f"{self.subnets[0]}.1"
        self.peer_ips = [f"{subnet}.2" for subnet in self.subnets]

    @property
    def name(self) -> str:
        """The first namespace (the one on the server's own pair)."""
        return self.names[0]

    def up(self) -> None:
        """Create every namespace and pair.

        Raises:
            subprocess.CalledProcessError: an ``ip`` step failed (its stderr attached);
                what was made so far stays until :meth:`down`.
        """
        for name, veth, peer, subnet in zip(self.names, self.veths, self.peers, self.subnets,
                                            strict=True):
            steps = [
                ["ip", "netns", "add", name],
                ["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
                ["ip", "link", "set", peer, "netns", name],
                ["ip", "addr", "add", f"{subnet}.1/30", "dev", veth],
                ["ip", "link", "set", veth, "up"],
                ["ip", "netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/30", "dev",
                 peer],
                ["ip", "netns", "exec", name, "ip", "link", "set", peer, "up"],
                ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
            ]
            if subnet != self.subnets[0]:
                steps.append(["ip", "netns", "exec", name, "ip", "route", "add",
                              f"{self.host_ip}/32", "via", f"{subnet}.1"])
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, timeout=10)

    def down(self) -> None:
        """Remove every pair and namespace (those that exist; never raises)."""
        for name, veth in zip(self.names, self.veths, strict=True):
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)

    def leftovers(self) -> list[str]:
        """Our namespaces that still exist (empty after :meth:`down`)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=10).stdout.split()
        return [name for name in self.names if name in listed]

    def exec_argv(self, index: int, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``index`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.names[index], *argv]


def namespaces_unavailable() -> str | None:
    """Why namespaces cannot be made here (no ``ip``, no right to), or None if they can.

    Tries for real: one namespace with one pair, removed again.
    """
    if shutil.which("ip") is None:
        return "no `ip` command: cannot create network namespaces here"
    probe = Netns(1)
    try:
        probe.up()
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip() if isinstance(detail, bytes) \
            else str(detail)
        return ("cannot create a network namespace and veth pair (needs root/"
                f"CAP_NET_ADMIN): {text or exc}")
    finally:
        probe.down()
    return None


@contextmanager
def namespaces(n: int) -> Iterator[Netns]:
    """``n`` namespaces for the duration of a ``with`` block, removed afterwards.

    Raises:
        FedsegError: they cannot be created here (the message says why); nothing is left.
    """
    ns = Netns(n)
    try:
        ns.up()
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        ns.down()
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip() if isinstance(detail, bytes) \
            else str(detail)
        raise FedsegError("cannot create network namespaces and veth pairs (needs root/"
                          f"CAP_NET_ADMIN and `ip`): {text or exc}") from None
    try:
        yield ns
    finally:
        ns.down()
