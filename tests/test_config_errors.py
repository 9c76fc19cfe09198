"""Start-up errors a newcomer meets: one line each, naming the file or address and the fix.

Real ``hybridrelay`` subprocesses: what is checked is what the terminal shows (stderr, exit 2).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import Relay, TlsFiles

CLI = [sys.executable, "-m", "hybridrelay"]
RELAY_HEAD = "server:\n  host: 127.0.0.1\n  port: 0\n  plaintext: true\n"
KEY = "k" * 44


async def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    """The only line of ``err`` (log lines of a relay that started its store aside)."""
    lines = [line for line in err.splitlines() if line.startswith("hybridrelay")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["serve", "bridge"])
async def test_bad_yaml_is_one_line_with_the_file_and_line(tmp_path: Path, command: str) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(RELAY_HEAD + "namespace:\n  hybrid_connections:\n   - name: a\n  - b\n")
    flag = "--config" if command == "serve" else "-f"
    code, _, err = await run(command, flag, "relay.yaml", cwd=tmp_path)
    line = one_line(err)
    assert code == 2
    what = "config file" if command == "serve" else "bridge config"
    assert f"{what} relay.yaml, line 8: invalid YAML: " in line, line
    assert "<unicode string>" not in err and "\n " not in err


@pytest.mark.timeout(60)
async def test_relay_config_mistakes_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(RELAY_HEAD.replace("port: 0", "prot: 0"))
    code, _, err = await run("serve", "--config", str(config))
    assert code == 2
    assert one_line(err) == (
        f"hybridrelay: config file {config}: unknown key(s): server.prot (did you mean 'port'?)"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("REPLACE-ME-primary-0000000000000000000000000", "a placeholder, not a key"),
        ("change-me-0123456789-0123456789-0123456789", "a placeholder, not a key"),
        ("a-short-key-0123456789", "22 characters, a key needs at least 32"),
    ],
)
async def test_placeholder_and_short_keys_are_refused(
    tmp_path: Path, key: str, expected: str
) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        RELAY_HEAD + "namespace:\n  authorization_rules:\n"
        f'    - {{name: root, primary_key: "{KEY}", rights: [Listen]}}\n'
        f'    - {{name: edge, primary_key: "{KEY}", secondary_key: "{key}", rights: [Listen]}}\n'
    )
    code, _, err = await run("serve", "--config", str(config))
    line = one_line(err)
    assert code == 2
    assert f"namespace.authorization_rules[1].secondary_key: {expected}" in line, line
    assert line.endswith("make one with `openssl rand -base64 32`")
    assert key not in err  # a secret, even a bad one, is never echoed


@pytest.mark.timeout(60)
async def test_a_missing_certificate_or_key_is_named(tmp_path: Path, tls_files: TlsFiles) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        f"  tls: {{cert: {tls_files.cert_file}, key: missing-key.pem}}\n"
    )
    code, _, err = await run("serve", "--config", str(config))
    assert code == 2
    line = one_line(err)
    assert f"the TLS private key {tmp_path / 'missing-key.pem'}: No such file" in line, line
    config.write_text(
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        f"  tls: {{cert: certs/missing.pem, key: {tls_files.key_file}}}\n"
    )
    code, _, err = await run("serve", "--config", str(config))
    assert code == 2
    assert f"the TLS certificate {tmp_path / 'certs' / 'missing.pem'}: " in one_line(err)


@pytest.mark.timeout(60)
async def test_a_port_in_use_is_said_once_with_the_fix(tmp_path: Path) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relay.yaml"
        config.write_text(RELAY_HEAD.replace("port: 0", f"port: {port}"))
        code, _, err = await run("serve", "--config", str(config))
        assert code == 2
        line = one_line(err)
        assert line == (
            f"hybridrelay: cannot listen on 127.0.0.1:{port}: the address is already in use: "
            "stop the other process listening there, or choose another port (--port)"
        )
        code, _, err = await run(
            "serve", "--port", "0", "--management-port", str(port), "--data-dir", str(tmp_path)
        )
        assert code == 2
        line = one_line(err)
        assert line.count(str(port)) == 1 and line.count("in use") == 1, line
        assert "--management-port" in line
    finally:
        taken.close()


@pytest.mark.timeout(60)
async def test_the_bridge_checks_everything_before_it_binds_anything(tmp_path: Path) -> None:
    """Two forwards bind fine and the third cannot: none is bound, not even for a moment (the
    first is 0.0.0.0, which a bridge that exits later would have exposed meanwhile)."""
    cs = "Endpoint=ws://127.0.0.1:9/;SharedAccessKeyName=a;SharedAccessKey=" + KEY
    socket_path = tmp_path / "no-such-dir" / "app.sock"
    code, out, err = await run(
        "bridge",
        "-x",
        cs,
        "-L",
        "0.0.0.0:0:web",
        "-L",
        "127.0.0.1:0:web",
        "-L",
        f"unix:{socket_path}:web",
    )
    assert code == 2
    line = one_line(err)
    assert line == (
        f"hybridrelay bridge: -L unix:{socket_path}:web: the socket's directory "
        f"{socket_path.parent} does not exist: create it (systemd: RuntimeDirectory=) or choose "
        "another path"
    )
    assert "listening on" not in out + err
    code, out, err = await run(
        "bridge", "-x", cs, "-L", "127.0.0.1:0:web", "-L", "192.0.2.1:0:web", "--ca-file", "x"
    )
    assert code == 2
    assert one_line(err).startswith("hybridrelay bridge: -L 192.0.2.1:0:web: cannot listen on ")
    assert "listening on 127.0.0.1" not in out + err
    code, _, err = await run("bridge", "-x", cs, "-L", "0:web", "--ca-file", str(tmp_path / "ca"))
    assert code == 2
    assert (
        one_line(err) == f"hybridrelay bridge: --ca-file {tmp_path / 'ca'}: no such readable file"
    )


@pytest.mark.timeout(60)
async def test_a_bridge_port_in_use_is_said_once_with_the_fix(relay: Relay) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run("bridge", "-x", relay.connection_string(), "-L", f"{port}:hc")
        assert code == 2
        line = one_line(err)
        assert line == (
            f"hybridrelay bridge: -L {port}:hc: cannot listen on {port}: the address is already "
            "in use: stop the other process listening there, or choose another port (in the -L "
            "spec)"
        ), line
    finally:
        taken.close()
