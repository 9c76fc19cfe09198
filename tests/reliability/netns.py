"""Network namespaces whose links can really drop packets (no FIN, no RST), for the silent
link tests (tests/reliability/test_dropped_packets.py).

:func:`network_namespace` makes a namespace joined to this one by one or more veth links,
each a /30 of its own in 10.201.0.0/16 (``host_ip`` on our side, ``ns_ip`` inside), and
always deletes it (its veth pairs go with it), also when the test fails. :meth:`Link.drop`
puts a ``blackhole`` qdisc on both ends of a link: every packet sent either way is thrown
away and the sender is told it went out, which is what a cut cable or a forgotten NAT entry
looks like to both ends; :meth:`Link.restore` takes it off. (This machine's kernel has no
``netem``, ``u32`` or ``matchall``; ``blackhole`` is built in, and iproute2 is all it needs.)

Something runs inside the namespace in one of two ways: a socket made there
(:meth:`Namespace.socket`: a thread enters the namespace, makes it and returns; a socket
keeps its namespace for life), or this thread inside it for a while
(:meth:`Namespace.entered`, to start a server whose listening socket must live there), or a
process (:meth:`Namespace.command`, ``ip netns exec``).

Names are unique per process and call (xdist workers included); subnets are picked under a
file lock among those no interface uses. Tests skip with :func:`unavailable`'s reason where
namespaces cannot be made (not Linux, not root, no iproute2).
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["Link", "Namespace", "network_namespace", "unavailable"]

_CLONE_NEWNET = 0x40000000
_SUBNETS = ipaddress.ip_network("10.201.0.0/16")
_LOCK = Path("/tmp/hybridrelay-tests-netns.lock")
_counter = itertools.count()
_COMMAND_TIMEOUT = 10.0
#: Namespaces are named ``hrtest<pid in hex>x<n>``, their links ``hrh<pid>x<n><i>`` (here)
#: and ``hrn…`` (inside): an interface name has at most 15 characters, and a pid at most 6 hex
#: digits (pid_max 4194304).
_PREFIX = "hrtest"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=_COMMAND_TIMEOUT)


def _try(*argv: str) -> None:
    """Clean-up: whatever fails (already gone) is ignored."""
    subprocess.run(argv, check=False, capture_output=True, timeout=_COMMAND_TIMEOUT)


def _output(*argv: str) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT
    ).stdout


def _inside(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def _remove_stale() -> None:
    """Delete the namespaces of test processes that are gone (killed before their clean-up):
    their links would hold subnets, and their names could come back with a reused pid."""
    for line in _output("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name.removeprefix(_PREFIX).partition("x")[0]
        if name.startswith(_PREFIX) and pid and all(c in "0123456789abcdef" for c in pid):
            if _alive(int(pid, 16)):
                continue
            _try("ip", "netns", "del", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Link:
    """One veth pair: ``host_if``/``host_ip`` on our side, ``ns_if``/``ns_ip`` inside."""

    namespace: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def drop(self) -> None:
        """From now on every packet sent over the link, either way, is silently lost."""
        _run("tc", "qdisc", "replace", "dev", self.host_if, "root", "blackhole")
        _run(
            *_inside(
                self.namespace, "tc", "qdisc", "replace", "dev", self.ns_if, "root", "blackhole"
            )
        )

    def restore(self) -> None:
        """Packets flow again."""
        _run("tc", "qdisc", "del", "dev", self.host_if, "root")
        _run(*_inside(self.namespace, "tc", "qdisc", "del", "dev", self.ns_if, "root"))


class Namespace:
    """A namespace made by :func:`network_namespace`."""

    def __init__(self, name: str, links: list[Link]) -> None:
        self.name = name
        self.links = links

    @contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace (the sockets it makes meanwhile live there), and
        back where it was afterwards, whatever happens."""
        libc = ctypes.CDLL(None, use_errno=True)
        with (
            open("/proc/thread-self/ns/net", "rb") as home,
            open(f"/run/netns/{self.name}", "rb") as target,
        ):
            if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test namespace failed")
            try:
                yield
            finally:
                if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover
                    raise OSError(ctypes.get_errno(), "setns back failed")

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket that lives in the namespace (made by a thread of its own)."""
        made: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                with self.entered():
                    made.append(socket.socket(family, socket.SOCK_STREAM))
            except BaseException as exc:
                made.append(exc)

        thread = threading.Thread(target=make, name="netns-socket")
        thread.start()
        thread.join(_COMMAND_TIMEOUT)
        result = made[0] if made else TimeoutError("making a socket in the namespace hung")
        if isinstance(result, BaseException):
            raise result
        return result

    def command(self, *argv: str) -> list[str]:
        """``argv`` to run inside the namespace (for :mod:`subprocess`/asyncio)."""
        return _inside(self.name, *argv)


def _used_subnets() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = _output("ip", "-o", "-4", "addr", "show")
    used = set()
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return used


@contextmanager
def network_namespace(links: int = 1) -> Iterator[Namespace]:
    """A namespace with ``links`` veth links to this one (see the module); deleted on exit."""
    tag = f"{os.getpid():x}x{next(_counter)}"
    name = f"{_PREFIX}{tag}"
    made: list[Link] = []
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        with _LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _remove_stale()
            used = _used_subnets()
            free = (net for net in _SUBNETS.subnets(new_prefix=30) if net not in used)
            for index, subnet in zip(range(links), free, strict=False):
                host_ip, ns_ip = (str(address) for address in list(subnet.hosts())[:2])
                link = Link(name, f"hrh{tag}{index}", f"hrn{tag}{index}", host_ip, ns_ip)
                _run(
                    "ip",
                    "link",
                    "add",
                    link.host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    link.ns_if,
                    "netns",
                    name,
                )
                made.append(link)
                _run("ip", "addr", "add", f"{host_ip}/30", "dev", link.host_if)
                _run("ip", "link", "set", link.host_if, "up")
                _run("ip", "-n", name, "addr", "add", f"{ns_ip}/30", "dev", link.ns_if)
                _run("ip", "-n", name, "link", "set", link.ns_if, "up")
        if len(made) < links:
            raise RuntimeError("no free /30 left in 10.201.0.0/16 for a test link")
        yield Namespace(name, made)
    finally:
        # Deleting the namespace deletes its veth ends, and so their peers here; the host
        # ends are deleted too in case the namespace never got them.
        for link in made:
            _try("ip", "link", "del", link.host_if)
        _try("ip", "netns", "del", name)


@cache
def unavailable() -> str | None:
    """Why namespaces with droppable links cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    try:
        with network_namespace() as namespace:
            namespace.links[0].drop()
            namespace.links[0].restore()
            namespace.socket().close()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip() if isinstance(detail, bytes) else ""
        return f"cannot make a network namespace with a droppable link: {text or exc}"
    return None
