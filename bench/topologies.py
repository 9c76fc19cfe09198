"""The paths under test: how to start each one, and where the load generator connects.

Every path ends at the same :mod:`bench.dest` process. ``direct`` is the destination itself;
``hybridrelay`` and ``hybridrelay-tls`` are the full pattern (ingress ``-L`` -> relay -> edge
agent ``-R`` -> destination) as three processes; ``hybridrelay-ingress[-tls]`` is the same
with the relay's own ingress port (``ingress:`` in its config) instead of the ``-L`` bridge:
client -> relay -> edge agent -> destination, two processes like wstunnel. The peers are socat
(one raw TCP hop), ``socat-chain`` / ``socat-chain-tls`` (the ceiling: three socat processes
with the same hops as ours, client -> A -> B -> C -> destination, the two middle legs TLS in
the ``-tls`` variant), ``socat-chain2`` (the same for the own-ingress path: client -> B -> C ->
destination), websockify (a WebSocket-to-TCP server: the load generator speaks
WebSocket to it, so it is one hop *fewer* than our pattern) and the npm ``wstunnel`` (a TCP ->
WebSocket -> TCP tunnel, two processes).

Scenario (6), HTTP relaying, uses its own upstream (:mod:`bench.httpdest`): ``direct`` is that
server itself; on ``hybridrelay``/``hybridrelay-tls`` the edge agent also runs
``-H benchhttp:http://127.0.0.1:PORT`` and the client sends ``GET http(s)://relay/benchhttp/x``
with a SAS token (Send) in ``ServiceBusAuthorization``; the relay checks it per request.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, ProcGroup, free_port, wait_port

__all__ = [
    "ALL_TOPOLOGIES",
    "DEFAULT_TOPOLOGIES",
    "CpuLayout",
    "Topology",
    "available",
    "start_topology",
]

BENCH_DIR = Path(__file__).resolve().parent
PEERS_DIR = BENCH_DIR / ".peers"
HC = "bench"
#: The hybrid connection of scenario (6) (served by the agent's ``-H`` forward).
HTTP_HC = "benchhttp"
KEY_NAME = "bench"

ALL_TOPOLOGIES = [
    "direct",
    "hybridrelay",
    "hybridrelay-tls",
    "hybridrelay-ingress",
    "hybridrelay-ingress-tls",
    "socat",
    "socat-chain",
    "socat-chain-tls",
    "socat-chain2",
    "websockify",
    "wstunnel",
]
#: What ``python -m bench`` runs without ``--topology``: the socat chains (the ceiling of a
#: 3-process chain, ~1 min more) and ``hybridrelay-ingress-tls`` (~45 s) are asked for by
#: name, to keep the default under 3 minutes.
OPT_IN_TOPOLOGIES = ("socat-chain", "socat-chain-tls", "socat-chain2", "hybridrelay-ingress-tls")
DEFAULT_TOPOLOGIES = [t for t in ALL_TOPOLOGIES if t not in OPT_IN_TOPOLOGIES]
#: Load generator modes each path can run (websockify: no half-close over our WS client).
_ALL_MODES = {"down", "up", "lat", "rr", "connrate", "idle"}
MODES: dict[str, set[str]] = {
    # "http": scenario (6), wrk against bench.httpdest (direct) or through relay + bridge -H.
    "direct": _ALL_MODES | {"http"},
    "hybridrelay": _ALL_MODES | {"http"},
    "hybridrelay-tls": _ALL_MODES | {"http"},
    # The relay's own ingress port: the same relay and agent; HTTP relaying is not a TCP path.
    "hybridrelay-ingress": _ALL_MODES,
    "hybridrelay-ingress-tls": _ALL_MODES,
    "socat": _ALL_MODES,
    "socat-chain": _ALL_MODES,
    "socat-chain-tls": _ALL_MODES,
    "socat-chain2": _ALL_MODES,
    # websockify: no half-close through our WS client; "idle" timed out at 100 connections
    # (it forks a process per connection), see docs/PERFORMANCE.md.
    "websockify": _ALL_MODES - {"up", "idle"},
    # Observed: the sink never gets our half-close through it (no answer in 30 s).
    "wstunnel": _ALL_MODES - {"up"},
}


@dataclass(frozen=True)
class CpuLayout:
    """``taskset -c`` lists per role (None: not pinned)."""

    loadgen: str | None = "0"
    dest: str | None = "0"
    relay: str | None = "1"
    ingress: str | None = None
    agent: str | None = None
    peer: str | None = "1"


@dataclass
class Topology:
    name: str
    port: int
    ws_path: str | None = None
    #: Processes of the path itself (not the destination), by role.
    roles: dict[str, Proc] = field(default_factory=dict)
    modes: set[str] = field(default_factory=set)
    note: str = ""
    #: Scenario (6): the URL wrk requests and the headers it sends (None: no HTTP server).
    http_url: str | None = None
    http_headers: list[str] = field(default_factory=list)


def _tool(name: str, *extra: Path) -> str | None:
    for candidate in extra:
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def _websockify() -> str | None:
    return _tool("websockify", PEERS_DIR / "venv" / "bin" / "websockify")


def _wstunnel() -> str | None:
    return _tool("wstunnel", PEERS_DIR / "node" / "node_modules" / ".bin" / "wstunnel")


def available(name: str) -> str | None:
    """None when the path can run here, else why not."""
    if name.startswith("socat") and not shutil.which("socat"):
        return "socat not installed (apt-get install socat)"
    if name == "websockify" and not _websockify():
        return "websockify not installed (see docs/PERFORMANCE.md)"
    if name == "wstunnel" and not (_wstunnel() and shutil.which("node")):
        return "npm wstunnel not installed (see docs/PERFORMANCE.md)"
    return None


def _hybridrelay_command() -> list[str]:
    """``$BENCH_HYBRIDRELAY`` (an A/B experiment's wrapper), else our console script next to
    the interpreter running the bench (a virtual environment's, even when it is not
    activated and so not on PATH), else this interpreter's ``-m hybridrelay``."""
    wrapper = os.environ.get("BENCH_HYBRIDRELAY")
    if wrapper:
        return [wrapper]
    script = Path(sys.executable).parent / "hybridrelay"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "hybridrelay"]


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """(cert, key, ca) for 127.0.0.1, made with trustme."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with cert_path.open("ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert_path, key_path, ca_path


def _relay_config(
    workdir: Path, key: str, tls: tuple[Path, Path] | None, *, ingress: bool = False
) -> Path:
    server = (
        f"  tls: {{cert: {tls[0]}, key: {tls[1]}}}\n" if tls is not None else "  plaintext: true\n"
    )
    text = (
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        + server
        + "limits:\n  max_pending_rendezvous: 20000\n"
        + (
            f'ingress:\n  - {{listen: "127.0.0.1:0", hybrid_connection: {HC}, '
            "max_connections: 20000}\n"
            if ingress
            else ""
        )
        + "namespace:\n  authorization_rules:\n"
        + f'    - {{name: {KEY_NAME}, primary_key: "{key}", rights: [Listen, Send, Manage]}}\n'
        + "  hybrid_connections:\n"
        + f"    - {{name: {HC}, requires_client_authorization: true}}\n"
        + f"    - {{name: {HTTP_HC}, requires_client_authorization: true}}\n"
    )
    path = workdir / ("relay-tls.yaml" if tls else "relay.yaml")
    path.write_text(text)
    return path


def _bridge_config(
    workdir: Path, name: str, cs: str, ca: Path | None, forward: str, *more: str
) -> Path:
    lines = [
        "connection:",
        f'  connection_string: "{cs}"',
        *([f"  ca_file: {ca}"] if ca else []),
        "max_connections: 20000",
        "log_level: info",
        forward,
        *more,
    ]
    path = workdir / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _http_token(key: str) -> str:
    """A Send token for :data:`HTTP_HC` (what ``hybridrelay token -e benchhttp`` prints)."""
    from hybridrelay.auth.sas import create_token, token_audience

    audience = token_audience("127.0.0.1", HTTP_HC)
    return create_token(audience, KEY_NAME, key, expiry=int(time.time()) + 24 * 3600)


#: socat options shared by every socat path: the same 256 KiB transfer buffer.
_SOCAT = ["socat", "-b", "262144"]
_SOCAT_LISTEN = "bind=127.0.0.1,reuseaddr,fork,backlog=4096"
#: The chains set TCP_NODELAY on every leg, as asyncio does on all our sockets: without it the
#: TLS chain's connect-to-first-byte p50 was 49.7 ms (Nagle against delayed ACKs), 6.7 ms with.
_SOCAT_NODELAY = "nodelay"
#: TLS 1.2 or newer; ciphers are OpenSSL's defaults (TLS 1.3 negotiates TLS_AES_256_GCM_SHA384).
_SOCAT_TLS_MIN = "openssl-min-proto-version=TLS1.2"


def _start_socat_chain(
    topo: Topology, procs: ProcGroup, dest_port: int, workdir: Path, cpus: CpuLayout
) -> Topology:
    """client -> A -> B -> C -> destination: three socat processes, the same hops as ours
    (``socat-chain2``: client -> B -> C -> destination, the hops of the relay's own ingress).

    A (``chain-ingress``) and C (``chain-agent``) are unpinned like our ingress and agent; B
    (``chain-relay``) is on the relay's CPU. With ``-tls``, A -> B and B -> C are TLS: A and B
    connect with ``OPENSSL:`` and verify the server certificate (``verify=1``, against the
    trustme CA made as for ``hybridrelay-tls``), B and C listen with ``OPENSSL-LISTEN:`` (no
    client certificate). Started from the destination end, each one's port found by
    bind-probe-release and its readiness by a connect poll (socat cannot report a port-0 bind).
    """
    tls = topo.name.endswith("-tls")
    server = client = ""  # OPENSSL-LISTEN / OPENSSL options of the TLS legs
    if tls:
        cert, key, ca = _tls_files(workdir)
        server = f"cert={cert},key={key},verify=0,{_SOCAT_TLS_MIN},"
        client = f"cafile={ca},verify=1,{_SOCAT_TLS_MIN},"

    def listen(port: int, secure: bool) -> str:
        kind = f"OPENSSL-LISTEN:{port},{server}" if secure else f"TCP-LISTEN:{port},"
        return f"{kind}{_SOCAT_LISTEN},{_SOCAT_NODELAY}"

    def connect(port: int, secure: bool) -> str:
        kind = f"OPENSSL:127.0.0.1:{port},{client}" if secure else f"TCP:127.0.0.1:{port},"
        return f"{kind}{_SOCAT_NODELAY}"

    # (role, CPUs, TLS on the leg into it, TLS on the leg out of it), destination end first.
    hops = [
        ("chain-agent", cpus.agent, tls, False),
        ("chain-relay", cpus.relay, tls, tls),
        ("chain-ingress", cpus.ingress, False, tls),
    ]
    if topo.name == "socat-chain2":
        hops.pop()
    next_port = dest_port
    roles: dict[str, Proc] = {}
    for role, role_cpus, tls_in, tls_out in hops:
        port = free_port()
        roles[role] = procs.start(
            role, [*_SOCAT, listen(port, tls_in), connect(next_port, tls_out)], cpus=role_cpus
        )
        wait_port(port)
        next_port = port
    topo.port = next_port
    order = ("chain-ingress", "chain-relay", "chain-agent")
    topo.roles = {r: roles[r] for r in order if r in roles}
    topo.note = f"{len(hops)} socat processes, {len(hops) + 1} TCP hops, fork per conn" + (
        "; A -> B and B -> C TLS (>= 1.2, verify on)" if tls else ""
    )
    return topo


def start_topology(
    name: str,
    procs: ProcGroup,
    dest_port: int,
    workdir: Path,
    cpus: CpuLayout,
    http_port: int | None = None,
) -> Topology:
    """Start the processes of path ``name`` (owned by ``procs``); returns where to connect.

    With ``http_port`` (a :mod:`bench.httpdest` server), the path also carries scenario (6).
    """
    topo = Topology(name, dest_port, modes=set(MODES[name]))
    if http_port is None or "http" not in topo.modes:
        topo.modes.discard("http")
        http_port = None
    if name == "direct":
        if http_port is not None:
            topo.http_url = f"http://127.0.0.1:{http_port}/x"
        return topo
    if name.startswith("hybridrelay"):
        tls = name.endswith("-tls")
        own_ingress = name.startswith("hybridrelay-ingress")
        key = base64.b64encode(os.urandom(32)).decode()
        ca: Path | None = None
        tls_pair: tuple[Path, Path] | None = None
        if tls:
            cert, pkey, ca = _tls_files(workdir)
            tls_pair = (cert, pkey)
        config = _relay_config(workdir, key, tls_pair, ingress=own_ingress)
        relay = procs.start(
            "relay", [*_hybridrelay_command(), "serve", "--config", str(config)], cpus=cpus.relay
        )
        m = relay.wait_line(r"relay listening on (wss?)://127\.0\.0\.1:(\d+)")
        ingress_port = (
            int(relay.wait_line(r"ingress listening on 127\.0\.0\.1:(\d+)").group(1))
            if own_ingress
            else 0
        )
        scheme = "sb" if m.group(1) == "wss" else "ws"
        cs = f"Endpoint={scheme}://127.0.0.1:{m.group(2)}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={key}"
        bridge = [*_hybridrelay_command(), "bridge"]
        http_forward = (
            [f'http_forwards: ["{HTTP_HC}:http://127.0.0.1:{http_port}"]'] if http_port else []
        )
        agent_cfg = _bridge_config(
            workdir,
            f"agent-{name}",
            cs,
            ca,
            f'remote_forwards: ["{HC}:127.0.0.1:{dest_port}"]',
            *http_forward,
        )
        agent = procs.start("agent", [*bridge, "-f", str(agent_cfg)], cpus=cpus.agent)
        agent.wait_line(r"all forwards are up" if http_port else r"listening for")
        if http_port is not None:
            http_scheme = "https" if tls else "http"
            topo.http_url = f"{http_scheme}://127.0.0.1:{m.group(2)}/{HTTP_HC}/x"
            topo.http_headers = [f"ServiceBusAuthorization: {_http_token(key)}"]
        if own_ingress:
            topo.port = ingress_port
            topo.roles = {"relay": relay, "agent": agent}
            topo.note = "the relay's own TCP port (2 processes)" + (
                "; TLS (wss://) on the agent's leg" if tls else ""
            )
            return topo
        ingress_cfg = _bridge_config(
            workdir, f"ingress-{name}", cs, ca, f'local_forwards: ["127.0.0.1:0:{HC}"]'
        )
        ingress = procs.start("ingress", [*bridge, "-f", str(ingress_cfg)], cpus=cpus.ingress)
        m = ingress.wait_line(r"listening on 127\.0\.0\.1:(\d+)")
        topo.port = int(m.group(1))
        topo.roles = {"relay": relay, "ingress": ingress, "agent": agent}
        topo.note = "TLS (wss://) on both relay legs" if tls else "plaintext ws://"
        return topo
    if name == "socat":
        port = free_port()
        proc = procs.start(
            "socat",
            [*_SOCAT, f"TCP-LISTEN:{port},{_SOCAT_LISTEN}", f"TCP:127.0.0.1:{dest_port}"],
            cpus=cpus.peer,
        )
        wait_port(port)
        topo.port, topo.roles, topo.note = port, {"socat": proc}, "1 raw TCP hop, fork per conn"
        return topo
    if name.startswith("socat-chain"):
        return _start_socat_chain(topo, procs, dest_port, workdir, cpus)
    if name == "websockify":
        wsfy = _websockify()
        assert wsfy is not None
        port = free_port()
        proc = procs.start(
            "websockify", [wsfy, f"127.0.0.1:{port}", f"127.0.0.1:{dest_port}"], cpus=cpus.peer
        )
        wait_port(port)
        topo.port, topo.roles = port, {"websockify": proc}
        topo.ws_path = "/"
        topo.note = "client speaks WS to it: 1 hop, not the 3-process pattern"
        return topo
    if name == "wstunnel":
        wst = _wstunnel()
        assert wst is not None
        sport, cport = free_port(), free_port()
        server = procs.start(
            "wst-server",
            ["node", wst, "-s", f"127.0.0.1:{sport}"],
            cpus=cpus.relay,
        )
        wait_port(sport)
        client = procs.start(
            "wst-client",
            [
                "node",
                wst,
                "-t",
                f"127.0.0.1:{cport}:127.0.0.1:{dest_port}",
                f"ws://127.0.0.1:{sport}",
            ],
            cpus=cpus.ingress,
        )
        wait_port(cport)
        topo.port, topo.roles = cport, {"wst-client": client, "wst-server": server}
        topo.note = "TCP -> WS client -> WS server -> TCP (2 processes)"
        return topo
    raise ValueError(f"unknown topology {name!r}")
