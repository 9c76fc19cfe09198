"""What docs/DEPLOYMENT.md ships: the systemd units (checked by ``systemd-analyze verify``), the
certbot deploy hook (run against a fake lineage), and the store backup it documents (taken from a
running relay)."""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import grp
import os
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hybridrelay.bridge.config import DEFAULT_SHUTDOWN_GRACE_PERIOD
from hybridrelay.cli.main import build_parser
from hybridrelay.server.config import ServerSettings

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
HOOK = REPO / "deploy" / "certbot" / "hybridrelay-deploy-hook"
DEPLOYMENT = REPO / "docs" / "DEPLOYMENT.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: The relay drains for this long by default (docs/DEPLOYMENT.md, the unit's comment): the
#: config model's grace setting once it has one.
RELAY_SHUTDOWN_GRACE = next(
    (float(f.default) for f in dataclasses.fields(ServerSettings) if "grace" in f.name),  # type: ignore[arg-type]
    30.0,
)
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
}


def service_section(unit: Path) -> dict[str, str]:
    """The unit's [Service] keys (a repeated key: its last value)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text(encoding="utf-8"))
    return dict(parser["Service"])


def our_command() -> str:
    script = Path(sys.executable).parent / "hybridrelay"
    assert script.is_file(), "the package's console script is installed next to python"
    return str(script)


@pytest.mark.timeout(60)
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("template", "instance"),
    [("hybridrelay.service", "hybridrelay.service"), ("hybridrelay-bridge@.service", "edge")],
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, template: str, instance: str) -> None:
    """verify checks that ExecStart's program exists: the copy points at this machine's
    console script instead of /opt/hybridrelay/bin/hybridrelay, nothing else changes."""
    text = (UNITS / template).read_text(encoding="utf-8")
    assert text.count("/opt/hybridrelay/bin/hybridrelay ") == 1
    name = template.replace("@.", f"@{instance}.") if "@" in template else template
    for unit_name in {template, name}:
        (tmp_path / unit_name).write_text(
            text.replace("/opt/hybridrelay/bin/hybridrelay ", our_command() + " "),
            encoding="utf-8",
        )
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    # Unknown keys and bad values are warnings with exit 0: any output at all fails.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stderr


@pytest.mark.parametrize("unit", ["hybridrelay.service", "hybridrelay-bridge@.service"])
def test_units_are_hardened_and_wait_for_the_drain(unit: str) -> None:
    service = service_section(UNITS / unit)
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    assert service["KillSignal"] == "SIGTERM"
    grace = RELAY_SHUTDOWN_GRACE if unit == "hybridrelay.service" else 15.0
    assert grace >= DEFAULT_SHUTDOWN_GRACE_PERIOD  # the examples' bridges use 15 s
    # The relay's drain takes up to 5 s more for the close handshakes (docs/OPERATIONS.md).
    close_handshakes = 5.0 if unit == "hybridrelay.service" else 0.0
    assert float(service["TimeoutStopSec"]) > grace + close_handshakes


def test_the_relay_unit_reloads_keeps_its_store_and_parses(tmp_path: Path) -> None:
    service = service_section(UNITS / "hybridrelay.service")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["StateDirectory"] == "hybridrelay"
    argv = shlex.split(service["ExecStart"])
    assert argv[1:2] == ["serve"] and "${STATE_DIRECTORY}" in argv
    # Our own parser takes the unit's command line as written.
    args = build_parser().parse_args(
        [arg.replace("${STATE_DIRECTORY}", str(tmp_path)) for arg in argv[1:]]
    )
    assert args.config == "/etc/hybridrelay/relay.yaml" and args.data_dir == tmp_path
    bridge = service_section(UNITS / "hybridrelay-bridge@.service")
    argv = shlex.split(bridge["ExecStart"].replace("%i", "edge"))
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/hybridrelay/bridge-edge.yaml"
    # The key comes from a root-only file, never the command line.
    assert bridge["EnvironmentFile"] == "-/etc/hybridrelay/bridge-%i.env"
    assert "SharedAccessKey" not in bridge["ExecStart"]


@pytest.mark.timeout(60)
def test_certbot_hook_installs_the_pair_privately_then_reloads(tmp_path: Path) -> None:
    lineage = tmp_path / "live" / "relay.example.com"
    lineage.mkdir(parents=True)
    (lineage / "fullchain.pem").write_text("CERT CHAIN\n")
    (lineage / "privkey.pem").write_text("PRIVATE KEY\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl-calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    tls_dir = tmp_path / "etc" / "tls"
    group = grp.getgrgid(os.getgid()).gr_name
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RENEWED_LINEAGE": str(lineage),
        "HYBRIDRELAY_TLS_DIR": str(tls_dir),
        "HYBRIDRELAY_TLS_GROUP": group,
    }
    done = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tls_dir / "cert.pem").read_text() == "CERT CHAIN\n"
    assert (tls_dir / "key.pem").read_text() == "PRIVATE KEY\n"
    assert stat.S_IMODE((tls_dir / "key.pem").stat().st_mode) == 0o640
    assert stat.S_IMODE((tls_dir / "cert.pem").stat().st_mode) == 0o644
    assert not list(tls_dir.glob("*.new"))
    assert calls.read_text() == "reload hybridrelay.service\n"
    # Not run by certbot: says so, touches nothing.
    del env["RENEWED_LINEAGE"]
    done = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "RENEWED_LINEAGE" in done.stderr
    assert calls.read_text() == "reload hybridrelay.service\n"


def documented_backup_commands() -> list[str]:
    """The backup commands of DEPLOYMENT.md's "Backups of the store", as written."""
    text = DEPLOYMENT.read_text(encoding="utf-8")
    section = text.split("## Backups of the store", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [c for block in blocks for c in block.replace("\\\n", " ").strip().splitlines()]
    return [c for c in commands if "relay.db" in c]


@pytest.mark.timeout(90)
async def test_the_documented_backups_are_consistent_while_the_relay_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hybridrelay",
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        "--data-dir",
        str(data),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            while b"relay listening on" not in await process.stdout.readline():
                assert process.returncode is None
        commands = documented_backup_commands()
        assert len(commands) == 2, commands  # the sqlite3 one and the Python one
        backups = []
        for i, command in enumerate(commands):
            if command.startswith("sqlite3") and shutil.which("sqlite3") is None:
                continue
            backup = tmp_path / f"backup-{i}.db"
            command = command.replace("/var/lib/hybridrelay/relay.db", str(data / "relay.db"))
            for target in ("relay-$(date +%F).db", "relay.db"):
                command = command.replace(f"/var/backups/hybridrelay/{target}", str(backup))
            done = await asyncio.create_subprocess_shell(
                command.replace("python3 ", f"{sys.executable} ", 1),
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(30):
                _, err = await done.communicate()
            assert done.returncode == 0, (command, err)
            backups.append(backup)
        assert backups
        for backup in backups:
            copy = sqlite3.connect(backup)
            try:
                assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                names = {row[0] for row in copy.execute("SELECT name FROM rules")}
                assert "RootManageSharedAccessKey" in names  # the embedded default's root rule
            finally:
                copy.close()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()
