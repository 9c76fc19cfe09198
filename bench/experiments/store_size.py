"""What the cluster store costs per hybrid connection: Redis memory, the bytes a node reads to
load it, the time that takes, and the memory the loaded state takes in a node.

``python -m bench.experiments.store_size [--sites 5000] [--writers 20]``

A redis-server this starts; ``--sites`` hybrid connections, each with a rule of its own (a
site's Listen key), written through the store (``store/redis.py``, one transaction each), one
at a time; then ``--writers`` concurrent writers, each creating 10 sites of its own, count
how many of their writes fail (every write WATCHes the one hash of the namespace). Then
a second store opens the namespace, as a node that joins or reloads does: timed, with its
process's RSS before and after (``/proc``), and the hash's ``MEMORY USAGE`` and ``HGETALL``
size. The whole state lives in one hash per namespace and every node loads all of it:
docs/SCALING.md carries these to 1,000,000 sites.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path

from bench.cluster_nodes import start_redis, store_bytes
from bench.procs import ProcGroup, read_mem_kib
from hybridrelay.auth.sas import Rights
from hybridrelay.store.base import StoreUnavailableError
from hybridrelay.store.redis import RedisStore, _prefix, open_redis

NAMESPACE = "sizing"
#: writes of each concurrent writer
WRITES_EACH = 10


async def run(sites: int, writers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="store-size-") as tmp, ProcGroup() as group:
        url = await asyncio.to_thread(start_redis, group, Path(tmp))
        limit = sites + writers * WRITES_EACH + 1
        writer = await RedisStore.open(url, namespace=NAMESPACE, max_hybrid_connections=limit)
        started = time.monotonic()
        for index in range(sites):
            await writer.put_hybrid_connection(f"site-{index}")
            await writer.put_rule("listen", Rights.LISTEN, entity=f"site-{index}")
        wrote = time.monotonic() - started

        failed = 0

        async def concurrent(index: int) -> None:
            nonlocal failed
            for each in range(WRITES_EACH):
                try:
                    await writer.put_hybrid_connection(f"extra-{index}-{each}")
                except StoreUnavailableError:
                    failed += 1

        await asyncio.gather(*(concurrent(i) for i in range(writers)))
        await writer.aclose()

        client = open_redis(url)
        try:
            fields = await client.client.hgetall(_prefix(NAMESPACE) + "store")
        finally:
            await client.aclose()
        loaded_bytes = sum(len(k) + len(v) for k, v in fields.items())
        del fields
        in_redis = await store_bytes(url)

        gc.collect()
        rss_before = read_mem_kib(os.getpid(), tree=False)[0]
        started = time.monotonic()
        reader = await RedisStore.open(url, namespace=NAMESPACE, max_hybrid_connections=limit)
        load_s = time.monotonic() - started
        gc.collect()
        rss_after = read_mem_kib(os.getpid(), tree=False)[0]
        loaded = len(reader.state.hybrid_connections)
        await reader.aclose()
    print(
        f"{sites:,} sites (a hybrid connection and a rule each), written in {wrote:.1f} s "
        f"({2 * sites / wrote:,.0f} transactions/s, one writer); {writers} concurrent "
        f"writers: {failed} of {writers * WRITES_EACH} writes failed (write conflicts)\n"
        f"  Redis: the hash takes {in_redis / sites:,.0f} bytes per site (MEMORY USAGE); "
        f"HGETALL reads {loaded_bytes / sites:,.0f} bytes per site\n"
        f"  a node loading it: {load_s:.2f} s ({load_s / sites * 1e6:.1f} µs per site), "
        f"{(rss_after - rss_before) / loaded:.2f} KiB of RSS per site"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.sites, args.writers))


if __name__ == "__main__":
    main()
