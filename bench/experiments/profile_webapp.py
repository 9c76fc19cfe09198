"""Profile the web-app paths of ``bench.webapp`` with py-spy while wrk loads them.

``python -m bench.experiments.profile_webapp "bridge -H" [--seconds 8] [--url small]`` keeps the
path up (``direct``, ``serve-app`` or ``bridge -H``), runs wrk (50 keep-alive connections)
against ``/{url}`` and records each process of the path (relay, listener, its uvicorn) with
``py-spy record -f raw`` (``--native``: with the C frames, uvloop's and httptools'); writes
``bench/results/profile-webapp-<path>-<role>.txt`` and prints the top self and inclusive frames
of each (``profile_path.top``).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from pathlib import Path

from bench.experiments.profile_path import OUT, top
from bench.httpload import wrk_argv
from bench.webapp import PATHS, path_under_test


async def profile(
    name: str, seconds: int, url: str, rate: int, http: str, native: bool = False
) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        async with path_under_test(name, Path(tmp), http) as (base, headers, pids):
            roles = {"relay": pids.get("relay", [])}
            listener = pids["listener"]
            roles["listener"] = listener[:1]
            roles["upstream"] = listener[1:]
            argv = wrk_argv(
                f"{base}/{url}",
                seconds=seconds + 2,
                connections=50,
                headers=[f"{k}: {v}" for k, v in headers.items()],
            )
            wrk = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
            slug = name.replace(" ", "").replace("-", "")
            spies = []
            for role, group in roles.items():
                for pid in group:
                    out = OUT / f"profile-webapp-{slug}-{role}.txt"
                    spy = await asyncio.create_subprocess_exec(
                        "py-spy",
                        "record",
                        # --native must pause the process to unwind its C stack.
                        *(("--native",) if native else ("--nonblocking",)),
                        "-r",
                        str(rate),
                        "-f",
                        "raw",
                        "-d",
                        str(seconds),
                        "-o",
                        str(out),
                        "--pid",
                        str(pid),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    spies.append((spy, out))
            async with asyncio.timeout(seconds + 60):
                for spy, _ in spies:
                    await spy.wait()
                text, _ = await wrk.communicate()
            print(text.decode(errors="replace"))
            for _, out in spies:
                if out.exists():
                    top(out, 25)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.profile_webapp")
    parser.add_argument("path", choices=PATHS)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--url", default="small")
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--uvicorn-http", choices=("h11", "httptools"), default="h11")
    parser.add_argument(
        "--native", action="store_true", help="C frames too (uvloop, httptools; slower)"
    )
    args = parser.parse_args()
    asyncio.run(
        profile(args.path, args.seconds, args.url, args.rate, args.uvicorn_http, args.native)
    )


if __name__ == "__main__":
    main()
