"""Real Redis topologies for the cluster tests, each process on free ports in a temporary
directory: a master with a replica watched by ``redis-server --sentinel`` processes, and a Redis
Cluster of three masters (``redis-cli --cluster create``). Readiness is each server's own log line,
then the topology's own view (``SENTINEL MASTER``, ``CLUSTER INFO``), polled: they have no event."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.cluster.conftest import RedisServer, _free_port, redis_binary
from tests.conftest import TlsFiles

#: Sentinel's timings, small so that a failover takes a few seconds (docs/CLUSTER.md).
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000
SERVICE = "relaymaster"


class ConfiguredRedis(RedisServer):
    """A redis-server with more arguments (replication, cluster mode)."""

    def __init__(self, binary: str, directory: Path, extra: Sequence[str], **kw: object) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(binary, directory, **kw)  # type: ignore[arg-type]
        self.extra = list(extra)

    def _arguments(self) -> list[str]:
        return [*super()._arguments(), *self.extra]

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown, no last write)."""
        process, self._process = self._process, None
        assert process is not None
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


class SentinelProcess(RedisServer):
    """``redis-server <file> --sentinel``; :meth:`start` returns once it monitors the master."""

    ready_line = b"+monitor master"

    def __init__(
        self,
        binary: str,
        directory: Path,
        master_port: int,
        password: str,
        tls: TlsFiles | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(binary, directory)
        self._config = directory / "sentinel.conf"
        listen = f"port {self.port}\n"
        if tls is not None:  # TLS only, to clients, to the other sentinels and to the servers
            listen = (
                f"port 0\ntls-port {self.port}\ntls-cert-file {tls.cert_file}\n"
                f"tls-key-file {tls.key_file}\ntls-ca-cert-file {tls.ca_file}\n"
                "tls-auth-clients no\ntls-replication yes\n"
            )
        self._config.write_text(
            f"{listen}bind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel auth-pass {SERVICE} {password}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        )

    def _command(self) -> list[str]:
        return [self._binary, str(self._config), "--sentinel"]


async def _poll(check: object, what: str, seconds: float = 20.0, *, interval: float = 0.1) -> None:
    """Wait for a topology's own view to settle (it has no event to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except (OSError, aioredis.RedisError):
            pass
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not reached in {seconds} s")
        await asyncio.sleep(interval)


class SentinelSet:
    """A master and a replica (password on both) and three sentinels (quorum 2)."""

    def __init__(
        self,
        master: ConfiguredRedis,
        replica: ConfiguredRedis,
        password: str,
        tls: TlsFiles | None,
    ) -> None:
        self.master = master
        self.replica = replica
        self.password = password
        self.tls = tls
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.tls is None:
            return f"redis+sentinel://:{self.password}@{hosts}/{SERVICE}/0"
        trust = f"?ssl_ca_certs={self.tls.ca_file}"
        return f"rediss+sentinel://:{self.password}@{hosts}/{SERVICE}/0{trust}"

    def _redis(self, port: int, password: str | None) -> aioredis.Redis:
        if self.tls is None:
            return aioredis.Redis(host="127.0.0.1", port=port, password=password)
        return aioredis.Redis(
            host="127.0.0.1", port=port, password=password, ssl=True, ssl_ca_certs=self.tls.ca_file
        )

    def client(self, server: RedisServer) -> aioredis.Redis:
        return self._redis(server.port, self.password)

    def sentinel(self, index: int = 0) -> aioredis.Redis:
        return self._redis(self.sentinels[index].port, None)

    async def master_port(self) -> int:
        """The master's port as the first sentinel names it."""
        sentinel = self.sentinel()
        try:
            address = await sentinel.sentinel_get_master_addr_by_name(SERVICE)
            assert isinstance(address, tuple)
            return int(address[1])
        finally:
            await sentinel.aclose()

    async def promote(self, *, command: bool) -> None:
        """Wait until the sentinels name the replica as master (after ``SENTINEL FAILOVER``
        if ``command``, else after the master died): at most down-after + two attempts."""
        if command:
            sentinel = self.sentinel()
            try:
                await sentinel.sentinel_failover(SERVICE)
            finally:
                await sentinel.aclose()

        async def promoted() -> bool:
            return await self.master_port() == self.replica.port

        bound = (DOWN_AFTER_MS + 2 * FAILOVER_TIMEOUT_MS) / 1000 + 5.0
        await _poll(promoted, "the replica promoted", bound, interval=0.02)

    async def settled(self) -> None:
        """Every sentinel sees the two others and the replica; the replica is in sync."""

        async def replica_synced() -> bool:
            client = self.client(self.replica)
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            return bool(info.get("master_link_status") == "up")

        async def sentinels_agree() -> bool:
            for index in range(len(self.sentinels)):
                sentinel = self.sentinel(index)
                try:
                    state = await sentinel.sentinel_master(SERVICE)
                finally:
                    await sentinel.aclose()
                assert isinstance(state, dict)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            return True

        await _poll(replica_synced, "the replica in sync")
        await _poll(sentinels_agree, "the sentinels see each other and the replica")


@asynccontextmanager
async def sentinel_set(
    directory: Path, tls: TlsFiles | None = None, *, settle: bool = True
) -> AsyncIterator[SentinelSet]:
    """The set; with ``tls``, every process speaks TLS only (replication too). ``settle``:
    wait until a failover can happen (the replica in sync, the sentinels know each other:
    their hello messages come every 2 s); without it, the sentinels only name the master."""
    binary = redis_binary()
    password = "sentinel-test-pw"
    auth = ["--masterauth", password]
    if tls is not None:
        auth += ["--tls-replication", "yes"]
    master = ConfiguredRedis(binary, directory / "master", auth, password=password, tls=tls)
    master.start()
    try:
        replica = ConfiguredRedis(
            binary,
            directory / "replica",
            [*auth, "--replicaof", "127.0.0.1", str(master.port)],
            password=password,
            tls=tls,
        )
        replica.start()
        try:
            topology = SentinelSet(master, replica, password, tls)
            try:
                for index in range(3):
                    sentinel = SentinelProcess(
                        binary, directory / f"sentinel{index}", master.port, password, tls
                    )
                    topology.sentinels.append(sentinel)
                    sentinel.start()
                if settle:
                    await topology.settled()
                yield topology
            finally:
                for sentinel in topology.sentinels:
                    sentinel.stop()
        finally:
            replica.stop()
    finally:
        master.stop()


class RedisClusterSet:
    """Three masters of one Redis Cluster, no replicas."""

    def __init__(self, masters: list[ConfiguredRedis]) -> None:
        self.masters = masters

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{m.port}" for m in self.masters[:2])  # startup nodes
        return f"redis+cluster://{hosts}"


@asynccontextmanager
async def redis_cluster(directory: Path) -> AsyncIterator[RedisClusterSet]:
    binary = redis_binary()
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed")
    async with AsyncExitStack() as stack:
        masters = []
        for index in range(3):
            home = directory / f"shard{index}"
            server = ConfiguredRedis(
                binary,
                home,
                [
                    "--cluster-enabled", "yes",
                    "--cluster-port", str(_free_port()),
                    "--cluster-config-file", str(home / "nodes.conf"),
                    "--cluster-node-timeout", "2000",
                ],
            )  # fmt: skip
            server.start()
            stack.callback(server.stop)
            masters.append(server)
        creator = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create",
            *(f"127.0.0.1:{m.port}" for m in masters),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                output, _ = await creator.communicate()
        finally:
            if creator.returncode is None:
                creator.kill()
                await creator.wait()
        assert creator.returncode == 0, output[-2000:]

        async def all_ok() -> bool:
            for master in masters:
                client = aioredis.Redis(host="127.0.0.1", port=master.port)
                try:
                    info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                finally:
                    await client.aclose()
                if b"cluster_state:ok" not in info:
                    return False
            return True

        await _poll(all_ok, "cluster_state:ok on every shard")
        yield RedisClusterSet(masters)
