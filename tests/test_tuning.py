"""Process-wide tuning (transport/tuning.py): the allocator thresholds do what they are for.

Each case runs in a fresh interpreter (the settings are process-wide): 2,000 reads of 1 KiB
with asyncio's read size (``recv(256 KiB)``), counting the page faults they cause. With glibc's
initial thresholds (128 KiB; fixed here, because glibc's own adjustment depends on what the
process freed before) every read maps fresh memory (>= 1 fault per read); with ours the same
memory is reused.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROGRAM = """
import resource, socket, sys
from hybridrelay.transport.tuning import set_malloc_thresholds
if sys.argv[1] == "tuned":
    assert set_malloc_thresholds()
else:
    assert set_malloc_thresholds(128 * 1024, 128 * 1024)  # glibc's initial values
a, b = socket.socketpair()
for _ in range(50):
    a.send(b"x" * 1024); b.recv(256 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    a.send(b"x" * 1024); b.recv(256 * 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_raised_thresholds_stop_per_read_page_faults() -> None:
    assert faults("initial") >= 1000
    assert faults("tuned") < 100
