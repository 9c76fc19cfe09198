"""The access log, the rate-limited refusal log and the JSON log format (docs/LOGGING.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.auth.sas import create_token
from hybridrelay.cli.logs import JsonFormatter
from hybridrelay.observability.access_log import AccessLog, RefusalLog, redact
from tests.conftest import RelayFactory

pytestmark = pytest.mark.timeout(60)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def logger_with_records(name: str) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    records = Records()
    logger.handlers[:] = [records]
    return logger, records


def test_an_access_line_carries_the_fields_in_text_and_json() -> None:
    logger, records = logger_with_records("test.access")
    AccessLog(logger).connection(
        "6f1c",
        "plant/line-1",
        kind="websocket",
        duration=1.23456,
        bytes_to_listener=1024,
        bytes_to_sender=2048,
        sender="10.0.0.5",
        listener="10.0.0.9",
    )
    (record,) = records.records
    text = record.getMessage()
    assert text.startswith("connection tracking_id=6f1c hc=plant/line-1 kind=websocket")
    assert "duration=1.235" in text and "bytes_to_listener=1024" in text
    document = json.loads(JsonFormatter().format(record))
    assert document["event"] == "connection"
    assert document["hc"] == "plant/line-1" and document["bytes_to_sender"] == 2048
    assert document["level"] == "info" and document["ts"].endswith("Z")


def test_nothing_is_formatted_when_info_is_off() -> None:
    logger, records = logger_with_records("test.access.off")
    logger.setLevel(logging.WARNING)
    AccessLog(logger).http_request(
        "1",
        "hc",
        method="GET",
        status=200,
        duration=0.1,
        request_bytes=0,
        response_bytes=5,
        sender=None,
    )
    assert records.records == []


def test_a_flood_of_refusals_is_rate_limited_and_the_rest_counted() -> None:
    logger, records = logger_with_records("test.refused")
    now = [0.0]
    log = RefusalLog(logger, burst=20, rate=1.0, clock=lambda: now[0])
    for i in range(10_000):
        now[0] = i / 1000  # 10,000 refusals in 10 s
        log.refused("connect", "hc", 401, "bad token", "203.0.113.7")
    # At most the burst and one a second after it.
    assert 20 <= len(records.records) <= 20 + 10 + 1
    summarized = [r for r in records.records if "left out" in r.getMessage()]
    assert summarized
    left_out = sum(getattr(r, "fields", {}).get("suppressed", 0) for r in records.records)
    assert left_out + len(records.records) <= 10_000
    # Another status has its own budget.
    log.refused("listen", "hc", 404, "no such entity", None)
    assert "status=404" in records.records[-1].getMessage()


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=8, max_size=60),
    st.text(max_size=30),
)
def test_no_token_or_key_survives_redaction(secret: str, around: str) -> None:
    token = create_token("http://relay/hc", "rule", secret, expiry=2_000_000_000)
    for leaked in (
        f"{around} {token} {around}",
        f"{around}?sb-hc-token={secret}&x=1",
        f"Endpoint=sb://x/;SharedAccessKeyName=r;SharedAccessKey={secret};{around}",
    ):
        cleaned = redact(leaked)
        assert secret not in cleaned.replace(around, "") or secret in around
        assert token not in cleaned


async def test_serve_writes_json_lines_with_access_lines(make_relay: RelayFactory) -> None:
    """``hybridrelay serve --log-format json``: every stderr line is a JSON object, and a
    refused sender's line carries its fields."""
    env = {**os.environ}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hybridrelay.cli.main",
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        "--log-format",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "serve exited before it was ready"
                if "relay listening on" in line:
                    base_url = line.rsplit(" ", 1)[1].strip()
                    break
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(
                    f"{base_url}/$hc/nothing?sb-hc-action=listen&sb-hc-token=SharedAccessSignature"
                    "%20sr%3Dx%26sig%3Dsecretsig%26se%3D1%26skn%3Dr"
                )
    finally:
        process.terminate()
        async with asyncio.timeout(15):
            await process.wait()
    errors = (await process.stderr.read()).decode().splitlines()
    documents = [json.loads(line) for line in errors if line.strip()]
    assert documents and all({"ts", "level", "logger", "message"} <= d.keys() for d in documents)
    refused = [d for d in documents if d.get("event") == "refused"]
    assert refused and refused[0]["kind"] == "listen" and refused[0]["status"] in (401, 404)
    assert "secretsig" not in "\n".join(errors)
