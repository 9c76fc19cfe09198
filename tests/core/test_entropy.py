"""The pools of random bytes (transport/entropy.py): each slice fresh, once, in a forked
child too."""

from __future__ import annotations

import os

import pytest

from hybridrelay.transport.entropy import BATCH, EntropyPool

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize("size", [4, 16, 24, 1000])
def test_slices_have_the_size_and_never_repeat_across_batches(size: int) -> None:
    pool = EntropyPool(size)
    taken = [pool.take() for _ in range(3 * BATCH // size + 5)]  # three batches and more
    assert {len(piece) for piece in taken} == {size}
    assert len(set(taken)) == len(taken)


def test_a_size_outside_a_batch_is_refused() -> None:
    for size in (0, BATCH + 1):
        with pytest.raises(ValueError, match="a slice is 1 to"):
            EntropyPool(size)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_take_its_parent_s_next_slices() -> None:
    pool = EntropyPool(16)
    pool.take()  # a batch is drawn: the child would start inside it without the fork hook
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next slice, to the parent
        try:
            os.write(writer, pool.take())
        finally:
            os._exit(0)
    os.close(writer)
    try:
        child = os.read(reader, 16)
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert len(child) == 16
    assert child != pool.take()
