"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read network input.

Not part of the test suite: run by hand or in a nightly job (fuzz/README.md). Each target takes
the fuzzer's bytes, feeds them to one parser and lets only that parser's documented error
through; any other exception is a crash that libFuzzer reports with the input that caused it.
The same parsers have hypothesis fuzzers in the default test run (docs/RELIABILITY.md).

    python3 fuzz/fuzz_parsers.py TARGET [libFuzzer options, e.g. -max_total_time=60]
    python3 fuzz/fuzz_parsers.py --list
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import atheris

# Only our own modules: instrumenting aiohttp, yaml and the rest costs a minute at start.
with atheris.instrument_imports(include=["hybridrelay"]):
    from hybridrelay.auth.sas import parse_token
    from hybridrelay.bridge.specs import parse_local_spec, parse_remote_spec
    from hybridrelay.exceptions import ConfigurationError, ProtocolError, TokenError
    from hybridrelay.protocol.addressing import parse_accept_params, parse_endpoint
    from hybridrelay.protocol.arm import (
        ArmError,
        parse_check_name,
        parse_hybrid_connection_put,
        parse_namespace_put,
        parse_regenerate_keys,
        parse_route,
        parse_rule_put,
    )
    from hybridrelay.protocol.azbridge import DatagramDecoder, PreambleDecoder, ReplyDecoder
    from hybridrelay.protocol.connection_string import ConnectionString
    from hybridrelay.protocol.messages import parse_message
    from hybridrelay.protocol.websocket import (
        FrameError,
        FrameForwarder,
        parse_response_head,
        unmask_python,
        whole_client_frames,
    )


def _text(data: bytes) -> str:
    # UTF-8 (as headers and files arrive), so that the seeds in fuzz/corpus are what they say.
    return data.decode("utf-8", "replace")


def _chunks(data: bytes) -> list[bytes]:
    """The input cut into reads at places the fuzzer chooses (its first byte is the step)."""
    if not data:
        return []
    step, rest = data[0] % 17 + 1, data[1:]
    return [rest[i : i + step] for i in range(0, len(rest), step)]


def control_message(data: bytes) -> None:
    try:
        parse_message(data)
    except ProtocolError:
        pass


def sas_token(data: bytes) -> None:
    try:
        parse_token(_text(data))
    except TokenError:
        pass


def connection_string(data: bytes) -> None:
    try:
        ConnectionString.parse(_text(data))
    except ConfigurationError:
        pass


def endpoint(data: bytes) -> None:
    try:
        parse_endpoint(_text(data))
    except ConfigurationError:
        pass


def accept_params(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    params = {}
    for name in ("sb-hc-statusCode", "sb-hc-statusDescription", "sb-hc-id"):
        if provider.ConsumeBool():
            params[name] = provider.ConsumeUnicodeNoSurrogates(40)
    parsed = parse_accept_params(params)
    assert parsed.status_code is None or 400 <= parsed.status_code <= 599


def client_frames(data: bytes) -> None:
    forwarder = FrameForwarder(unmask_python, max_message_size=1 << 16)
    try:
        for chunk in _chunks(data):
            forwarder.feed(chunk)
    except FrameError as error:
        assert error.code in (1002, 1007, 1009), error.code


def whole_frames(data: bytes) -> None:
    # The control channel's fast path (whole masked data frames at the start of a read) takes
    # only what it can read whole, within the size limit, and leaves the rest to the general
    # reader (tests/core/test_websocket_frames.py checks the two agree message for message).
    frames, used = whole_client_frames(data, 1 << 16, unmask_python)
    assert 0 <= used <= len(data)
    assert (used == 0) == (not frames)
    for opcode, payload in frames:
        assert opcode in (0x1, 0x2)
        assert len(payload) <= 1 << 16
    forwarder = FrameForwarder(unmask_python, max_message_size=1 << 16)
    try:
        forwarder.feed(data[used:])
    except FrameError as error:
        assert error.code in (1002, 1007, 1009), error.code


def response_head(data: bytes) -> None:
    try:
        parse_response_head(data)
    except ProtocolError:
        pass


def azbridge_preamble(data: bytes) -> None:
    decoder = PreambleDecoder()
    try:
        for chunk in _chunks(data):
            if decoder.feed(chunk) is not None:
                break
    except ProtocolError:
        pass


def azbridge_reply(data: bytes) -> None:
    decoder = ReplyDecoder()
    try:
        for chunk in _chunks(data):
            if decoder.feed(chunk) is not None:
                break
    except ProtocolError:
        pass


def udp_framing(data: bytes) -> None:
    decoder = DatagramDecoder()
    for chunk in _chunks(data):
        decoder.feed(chunk)
    assert decoder.pending <= 0xFFFF + 2


def forward_specs(data: bytes) -> None:
    text = _text(data)
    for parse in (parse_local_spec, parse_remote_spec):
        try:
            parse(text)
        except ConfigurationError:
            pass


def management_body(data: bytes) -> None:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    for parse in (
        parse_hybrid_connection_put,
        parse_rule_put,
        parse_regenerate_keys,
        parse_namespace_put,
        parse_check_name,
    ):
        try:
            parse(document)
        except ArmError as error:
            assert 400 <= error.status < 500


def management_route(data: bytes) -> None:
    try:
        parse_route(_text(data))
    except ArmError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    f.__name__: f
    for f in (
        control_message,
        sas_token,
        connection_string,
        endpoint,
        accept_params,
        client_frames,
        whole_frames,
        response_head,
        azbridge_preamble,
        azbridge_reply,
        udp_framing,
        forward_specs,
        management_body,
        management_route,
    )
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.stderr.write("targets: " + " ".join(TARGETS) + "\n")
        sys.exit(0 if "--list" in sys.argv else 2)
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
