"""The broker's pairing logic, without sockets: control channels over fake message sockets that
record what the relay tells them and fail on demand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.addressing import parse_accept_params, protocol_params
from hybridrelay.server.broker import (
    LISTENERS_BUSY,
    NO_LISTENER,
    NOT_IN_TIME,
    SENDER_GONE,
    TOO_MANY_PENDING,
    Accepted,
    Connection,
    LocalBroker,
    Pending,
    PendingRendezvous,
    Rejection,
)
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import HybridConnectionConfig, LimitsConfig
from hybridrelay.server.http_relay import response_deadline

LONG = 30.0  # a rendezvous timeout no test waits out


def limits(max_pending: int, rendezvous_timeout: float) -> LimitsConfig:
    return LimitsConfig(max_pending_rendezvous=max_pending, rendezvous_timeout=rendezvous_timeout)


class FakeSocket:
    """A control channel's socket as the broker uses it: writes record (or fail)."""

    def __init__(self, *, dead: bool = False) -> None:
        self.dead = dead
        self.sent: list[bytes | str] = []
        self._told = asyncio.Event()

    @property
    def write_paused(self) -> bool:
        return False

    def write_message(self, text: str, body: bytes | None = None) -> None:
        if self.dead:
            raise RelayConnectionError("connection reset")
        self.sent.append(text)
        if body is not None:
            self.sent.append(body)
        self._told.set()

    async def drain(self) -> None:
        return None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        return None

    def abort(self) -> None:
        return None

    async def next_accept(self) -> tuple[str, str]:
        """(secret, id) of the next ``accept`` this listener is told."""
        async with asyncio.timeout(10):
            while not self.sent:
                self._told.clear()
                await self._told.wait()
        text = self.sent.pop(0)
        assert isinstance(text, str)
        accept = json.loads(text)["accept"]
        params = parse_accept_params(protocol_params(urlsplit(accept["address"]).query))
        assert params.connection_id == accept["id"]
        return params.secret, params.connection_id


def channel(name: str, socket: FakeSocket, entity: str = "hc") -> ControlChannel:
    return ControlChannel(entity, name, socket, 0.0, "127.0.0.1", "ws://relay")


def in_order(*names: str) -> Callable[[list[ControlChannel]], None]:
    """A shuffle that tries the listeners in the order of ``names``."""

    def shuffle(channels: list[ControlChannel]) -> None:
        channels.sort(key=lambda c: names.index(c.listener_id))

    return shuffle


def accept(broker: LocalBroker, secret: str, connection_id: str) -> PendingRendezvous | None:
    """What the relay does on a listener's accept: claim, then resolve the outcome."""
    pending = broker.claim(secret, connection_id, PendingRendezvous)
    if pending is not None:
        pending.outcome.set_result(Accepted(None))
    return pending


async def test_a_dead_listener_is_skipped_and_dropped() -> None:
    """The listener tried first cannot be sent to: it is dropped, and the next one is told."""
    dead, alive = FakeSocket(dead=True), FakeSocket()
    broker = LocalBroker(shuffle=in_order("dead", "alive"))
    dead_channel, alive_channel = channel("dead", dead), channel("alive", alive)
    assert broker.register(dead_channel, 25) and broker.register(alive_channel, 25)

    async def listener() -> None:
        assert accept(broker, *await alive.next_accept()) is not None

    answering = asyncio.create_task(listener())
    async with broker.offer("hc", Connection("c1", {}), limits(10, LONG)) as (pending, outcome):
        assert outcome == Accepted(None)
        assert pending is not None and pending.channel is alive_channel
    await answering
    assert not dead.sent
    assert not dead_channel.usable and dead_channel.closed.done()
    assert broker.listener_count("hc") == 1 and broker.channels() == [alive_channel]
    assert broker.pending_count == 0


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
async def test_the_listener_told_is_the_first_in_the_injected_order(order: tuple[str, str]) -> None:
    sockets = {"a": FakeSocket(), "b": FakeSocket()}
    broker = LocalBroker(shuffle=in_order(*order))
    for name, socket in sockets.items():
        broker.register(channel(name, socket), 25)
    first, second = order

    async def listener() -> None:
        accept(broker, *await sockets[first].next_accept())

    answering = asyncio.create_task(listener())
    async with broker.offer("hc", Connection("c1", {}), limits(10, LONG)) as (_, outcome):
        assert outcome == Accepted(None)
    await answering
    assert not sockets[second].sent


async def test_a_listener_gone_before_answering_is_replaced_and_its_answer_refused() -> None:
    first, second = FakeSocket(), FakeSocket()
    broker = LocalBroker(shuffle=in_order("first", "second"))
    first_channel = channel("first", first)
    broker.register(first_channel, 25)
    broker.register(channel("second", second), 25)
    late: list[PendingRendezvous | None] = []

    async def listeners() -> None:
        secret, connection_id = await first.next_accept()
        broker.unregister(first_channel)  # its control channel ends without an answer
        again = await second.next_accept()
        assert again == (secret, connection_id)  # the same rendezvous, offered elsewhere
        assert accept(broker, *again) is not None
        late.append(accept(broker, secret, connection_id))  # single use

    answering = asyncio.create_task(listeners())
    async with broker.offer("hc", Connection("c1", {}), limits(10, LONG)) as (_, outcome):
        assert outcome == Accepted(None)
    await answering
    assert late == [None]


async def test_the_listener_s_rejection_is_the_outcome() -> None:
    socket = FakeSocket()
    broker = LocalBroker()
    broker.register(channel("l", socket), 25)

    async def listener() -> None:
        pending = broker.claim(*await socket.next_accept(), PendingRendezvous)
        assert pending is not None
        pending.outcome.set_result(Rejection(401, "no"))

    answering = asyncio.create_task(listener())
    async with broker.offer("hc", Connection("c1", {}), limits(10, LONG)) as (_, outcome):
        assert outcome == Rejection(401, "no")
    await answering


async def test_no_listener_and_too_many_pending() -> None:
    socket = FakeSocket()
    broker = LocalBroker()
    async with broker.offer("hc", Connection("c1", {}), limits(10, LONG)) as (pending, outcome):
        assert (pending, outcome) == (None, NO_LISTENER)
    broker.register(channel("l", socket), 25)
    waiting = Pending("other", "hc")
    assert broker.open(waiting, limits(1, LONG)) is None
    async with broker.offer("hc", Connection("c1", {}), limits(1, LONG)) as (
        pending,
        outcome,
    ):
        assert (pending, outcome) == (None, TOO_MANY_PENDING)
    assert not socket.sent  # nobody was told
    broker.forget(waiting)
    assert broker.pending_count == 0


async def test_unanswered_in_time_and_the_address_is_dead_after() -> None:
    socket = FakeSocket()
    broker = LocalBroker()
    broker.register(channel("l", socket), 25)
    async with broker.offer("hc", Connection("c1", {}), limits(10, 0.05)) as (pending, outcome):
        assert outcome == NOT_IN_TIME
        assert pending is not None
    secret, connection_id = await socket.next_accept()  # it was told, and ignored it
    assert broker.claim(secret, connection_id, PendingRendezvous) is None
    assert broker.pending_count == 0
    assert pending.outcome.cancelled()


async def test_claim_checks_the_id_the_kind_and_single_use() -> None:
    broker = LocalBroker()
    pending = PendingRendezvous("id-1", "hc")
    other_kind = Pending("id-2", "hc")
    assert broker.open(pending, limits(10, LONG)) is None
    assert broker.open(other_kind, limits(10, LONG)) is None
    assert broker.claim(pending.secret, "id-x", PendingRendezvous) is None
    assert broker.claim("unknown", "id-1", PendingRendezvous) is None
    assert broker.claim(other_kind.secret, "id-2", PendingRendezvous) is None  # made for another
    assert broker.claim(pending.secret, "id-1", PendingRendezvous) is pending  # a wrong id first
    assert broker.claim(pending.secret, "id-1", PendingRendezvous) is None  # single use
    assert broker.claim(other_kind.secret, "id-2", Pending) is other_kind
    assert pending.secret not in repr(pending)  # the address's credential stays out of logs


@dataclass(eq=False)
class _Recorded(Pending):
    gone: list[str] = field(default_factory=list)

    def listener_gone(self) -> None:
        self.gone.append(self.id)


async def test_what_waits_on_a_listener_learns_when_it_goes() -> None:
    """An announced request (HTTP) learns at once that the listener told went away; one the
    broker forgot does not."""
    socket = FakeSocket()
    broker = LocalBroker()
    listener = channel("l", socket)
    broker.register(listener, 25)
    live, finished = _Recorded("r1", "hc"), _Recorded("r2", "hc")
    for pending in (live, finished):
        assert broker.open(pending, limits(10, LONG)) is None
        assert (
            await broker.announce(pending, lambda base: f"request at {base}", b"body") is listener
        )
    assert socket.sent == ["request at ws://relay", b"body"] * 2
    broker.forget(finished)
    broker.unregister(listener)
    assert (live.gone, finished.gone) == (["r1"], [])
    assert broker.listener_count("hc") == 0
    assert await broker.announce(_Recorded("r3", "hc"), lambda base: "x") is None


def test_the_http_deadline_is_the_entity_s_own_else_the_relay_s() -> None:
    limits = LimitsConfig(http_response_timeout=60.0)
    assert response_deadline(limits, HybridConnectionConfig("hc")) == 60.0
    own = HybridConnectionConfig("hc", http_response_timeout=0.5)
    assert response_deadline(limits, own) == 0.5


async def test_one_entity_cannot_take_every_pending_slot() -> None:
    """Past ``max_pending_per_connection`` an entity's senders get 503; another entity still
    gets slots, and a slot given back can be taken again."""
    broker = LocalBroker()
    bounds = LimitsConfig(max_pending_rendezvous=10, max_pending_per_connection=3)
    noisy = [Pending(f"n{i}", "Noisy") for i in range(3)]
    for pending in noisy:
        assert broker.open(pending, bounds) is None
    assert broker.open(Pending("n3", "noisy"), bounds) == TOO_MANY_PENDING  # case-insensitive
    assert broker.open(Pending("q0", "quiet"), bounds) is None
    broker.forget(noisy[0])
    broker.forget(noisy[0])  # twice: counted once
    assert broker.open(Pending("n4", "noisy"), bounds) is None
    assert broker.open(Pending("n5", "noisy"), bounds) == TOO_MANY_PENDING
    assert broker.pending_count == 4


class StalledSocket(FakeSocket):
    """A listener that stopped reading: the transport stays over its high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    @property
    def write_paused(self) -> bool:
        return True

    async def drain(self) -> None:
        await asyncio.Event().wait()

    def abort(self) -> None:
        self.aborted = True


async def test_a_listener_that_stopped_reading_is_passed_over_then_the_senders_get_503() -> None:
    stalled, healthy = StalledSocket(), FakeSocket()
    broker = LocalBroker(shuffle=in_order("stalled", "healthy"))
    slow = channel("stalled", stalled)
    broker.register(slow, 25)
    bounds = LimitsConfig(max_queued_per_listener=2)
    stuck = [
        asyncio.create_task(broker.announce(Pending(f"s{i}", "hc"), lambda base: "x"))
        for i in range(2)
    ]
    await asyncio.sleep(0)  # both are queued on the stalled channel now
    assert slow.queued == 2
    assert broker.open(Pending("s2", "hc"), bounds) == LISTENERS_BUSY
    broker.register(channel("healthy", healthy), 25)
    pending = Pending("s3", "hc")
    assert broker.open(pending, bounds) is None
    told = await broker.announce(pending, lambda base: "to the healthy one")
    assert told is not None and told.listener_id == "healthy"
    assert healthy.sent == ["to the healthy one"]
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)
    assert slow.queued == 0


async def test_a_send_that_times_out_closes_the_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener is routable or disconnected, never a zombie: the channel is dropped (so its
    SDK reconnects) when a message cannot be sent in time."""
    import hybridrelay.server.channel as channel_module

    monkeypatch.setattr(channel_module, "_SEND_TIMEOUT", 0.05)
    stalled = StalledSocket()
    slow = channel("stalled", stalled)
    with pytest.raises(RelayConnectionError):
        await slow.send("accept")
    assert stalled.aborted and not slow.usable


async def test_a_sender_that_goes_away_frees_its_slot_at_once() -> None:
    socket = FakeSocket()
    broker = LocalBroker()
    broker.register(channel("l", socket), 25)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def sender() -> object:
        async with broker.offer("hc", Connection("c1", {}, gone=gone), limits(10, LONG)) as (
            _,
            outcome,
        ):
            return outcome

    waiting = asyncio.create_task(sender())
    await socket.next_accept()  # the listener was told, and does not answer
    assert broker.pending_count == 1
    gone.set_result(None)
    async with asyncio.timeout(5):  # far below the 30 s rendezvous timeout
        assert await waiting == SENDER_GONE
    assert broker.pending_count == 0
