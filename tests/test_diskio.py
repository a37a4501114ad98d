"""The disk tier's file: unaligned O_DIRECT writes and reads against an in-memory mirror."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flexgen.diskio import ALIGN, DiskFile


@pytest.mark.parametrize("direct", [True, False])
def test_random_writes_and_reads_match_a_mirror(tmp_path, direct):
    size = 13 * ALIGN + 123
    f = DiskFile(tmp_path / "f.bin", size, direct=direct)
    mirror = np.zeros(size, dtype=np.uint8)        # never-written bytes read as zeros
    rng = random.Random(0)
    try:
        for _ in range(1500):
            off = rng.randrange(size)
            n = rng.randrange(1, min(3 * ALIGN, size - off) + 1)
            if rng.random() < 0.6:
                data = torch.randint(0, 256, (n,), dtype=torch.uint8)
                f.write(off, data)
                mirror[off:off + n] = data.numpy()
            else:
                out = torch.empty(n, dtype=torch.uint8)
                f.read(off, out)
                assert np.array_equal(out.numpy(), mirror[off:off + n]), (off, n)
        # Appending one KV-cache token at a time (unaligned rows) keeps what came before.
        row = 3 * 1000
        for t in range(4):
            tok = torch.full((row,), t + 1, dtype=torch.uint8)
            f.write(t * row, tok)
            mirror[t * row:(t + 1) * row] = t + 1
            out = torch.empty((t + 1) * row, dtype=torch.uint8)
            f.read(0, out)
            assert np.array_equal(out.numpy(), mirror[:(t + 1) * row])
    finally:
        f.close()
    # A file reopened without create keeps the bytes around a small write.
    g = DiskFile(tmp_path / "f.bin", size, create=False, direct=direct)
    try:
        g.write(ALIGN - 2, torch.tensor([7, 8, 9, 10], dtype=torch.uint8))
        mirror[ALIGN - 2:ALIGN + 2] = [7, 8, 9, 10]
        out = torch.empty(size, dtype=torch.uint8)
        g.read(0, out)
        assert np.array_equal(out.numpy(), mirror)
    finally:
        g.close()


def test_direct_read_of_unaligned_length_into_aligned_buffer(tmp_path):
    """Whole pages go straight into the destination, the last partial page separately."""
    f = DiskFile(tmp_path / "g.bin", 64 * ALIGN)
    if not f.direct:
        f.close()
        pytest.skip("the file system here does not support O_DIRECT")
    try:
        data = torch.arange(10 * ALIGN + 100, dtype=torch.int64).to(torch.uint8)
        f.write(0, data)
        from flexgen.diskio import aligned_host_empty
        out = aligned_host_empty((data.numel(),), torch.uint8)
        f.read(0, out)
        assert torch.equal(out, data)
        assert f.bytes_read == data.numel() and f.bytes_written == data.numel()
    finally:
        f.close()


def test_read_with_scratch_after_fills_only_the_owned_tail(tmp_path):
    """With scratch_after, one aligned read may run past dst into the padding it owns."""
    from flexgen.diskio import aligned_host_empty
    f = DiskFile(tmp_path / "h.bin", 8 * ALIGN)
    try:
        data = torch.randint(0, 256, (8 * ALIGN,), dtype=torch.uint8)
        f.write(0, data)
        for n in (1, ALIGN - 1, ALIGN, 3 * ALIGN + 17):
            buf = aligned_host_empty((n + 5,), torch.uint8)
            buf.fill_(0)
            f.read(ALIGN, buf[:n], scratch_after=True)
            assert torch.equal(buf[:n], data[ALIGN:ALIGN + n])
            assert f.bytes_read > 0
        # Without ownership of the bytes after dst they stay untouched.
        buf = aligned_host_empty((ALIGN + 10,), torch.uint8)
        buf.fill_(0)
        f.read(0, buf[:10])
        assert torch.equal(buf[:10], data[:10]) and not buf[10:].any()
    finally:
        f.close()


def test_scratch_read_at_the_end_of_a_file_ending_mid_page(tmp_path):
    """A file opened without create may end mid-page: the read must not run past it."""
    from flexgen.diskio import aligned_host_empty
    path = tmp_path / "short.bin"
    data = torch.randint(0, 256, (2 * ALIGN + 100,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    f = DiskFile(path, data.numel(), create=False)
    try:
        buf = aligned_host_empty((ALIGN + 100 + ALIGN,), torch.uint8)
        f.read(ALIGN, buf[:ALIGN + 100], scratch_after=True)
        assert torch.equal(buf[:ALIGN + 100], data[ALIGN:])
    finally:
        f.close()


def test_creating_over_an_existing_file_keeps_its_bytes_around_a_write(tmp_path):
    """O_CREAT without O_TRUNC: bytes already in the file are not taken for zeros."""
    path = tmp_path / "old.bin"
    data = torch.randint(0, 256, (3 * ALIGN,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    f = DiskFile(path, data.numel())
    try:
        f.write(ALIGN + 10, torch.tensor([1, 2, 3], dtype=torch.uint8))
        expect = data.clone()
        expect[ALIGN + 10:ALIGN + 13] = torch.tensor([1, 2, 3], dtype=torch.uint8)
        out = torch.empty(data.numel(), dtype=torch.uint8)
        f.read(0, out)
        assert torch.equal(out, expect)
    finally:
        f.close()


def test_threads_appending_to_separate_regions_of_one_file(tmp_path):
    """Like the KV arena: I/O threads append unaligned rows to their own page-aligned regions."""
    import threading

    regions, row, steps = 4, 3 * 1000 + 8, 40
    region_bytes = -(-row * steps // ALIGN) * ALIGN
    f = DiskFile(tmp_path / "kv.bin", regions * region_bytes)
    errors = []

    def append(r):
        try:
            for t in range(steps):
                f.write(r * region_bytes + t * row, torch.full((row,), (r * steps + t) % 251, dtype=torch.uint8))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(r,)) for r in range(regions)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        for r in range(regions):
            out = torch.empty(row * steps, dtype=torch.uint8)
            f.read(r * region_bytes, out)
            want = torch.arange(r * steps, (r + 1) * steps).remainder(251).to(torch.uint8).repeat_interleave(row)
            assert torch.equal(out, want), r
    finally:
        f.close()


@pytest.mark.parametrize("direct", [True, False])
def test_large_reads_are_issued_in_pieces_and_match(tmp_path, monkeypatch, direct):
    """A read longer than READ_PIECE goes to the disk in pieces no longer than it (so a
    small read from another thread is not queued behind all of it), and returns the same
    bytes as the file holds, at aligned and unaligned offsets."""
    import os

    from flexgen import diskio

    size = 40 * ALIGN + 77
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = DiskFile(tmp_path / "f.bin", size, direct=direct)
    f.write(0, data)
    monkeypatch.setattr(diskio, "READ_PIECE", 3 * ALIGN)
    lengths = []
    real = os.preadv

    def preadv(fd, bufs, offset):
        lengths.append(sum(len(b) for b in bufs))
        return real(fd, bufs, offset)

    monkeypatch.setattr(diskio.os, "preadv", preadv)
    try:
        for off, n in ((0, size), (5 * ALIGN, 20 * ALIGN), (123, 17 * ALIGN + 5)):
            lengths.clear()
            out = diskio.aligned_empty(n)[:n]
            f.read(off, out)
            assert torch.equal(out, data[off:off + n]), (off, n)
            assert max(lengths) <= 3 * ALIGN and sum(lengths) >= n, lengths
    finally:
        f.unlink()


@pytest.mark.parametrize("direct", [True, False])
def test_a_background_read_waits_between_pieces_while_an_urgent_read_runs(tmp_path, monkeypatch, direct):
    """A read given `yield_to` (the next layer's weights) issues no further piece while an
    urgent read (the next gpu batch's KV cache) is under way, and resumes after it with
    the right bytes. Without `yield_to` its third piece would go to the disk at once."""
    import os
    import threading

    from flexgen import diskio

    size = 12 * ALIGN
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    f = DiskFile(tmp_path / "f.bin", size, direct=direct)
    f.write(0, data)
    monkeypatch.setattr(diskio, "READ_PIECE", 2 * ALIGN)
    prio = diskio.ReadPriority()
    entered, release = threading.Event(), threading.Event()
    events = []

    def urgent_read():
        with prio.urgent():
            entered.set()
            release.wait(5)
            events.append("urgent done")

    real = os.preadv

    def preadv(fd, bufs, offset):
        if threading.current_thread() is background:
            events.append("piece")
            if events.count("piece") == 2:   # an urgent read starts after the second piece
                threading.Thread(target=urgent_read).start()
                entered.wait(5)
                threading.Timer(0.1, release.set).start()
        return real(fd, bufs, offset)

    monkeypatch.setattr(diskio.os, "preadv", preadv)
    out = diskio.aligned_empty(size)
    background = threading.Thread(target=f.read, args=(0, out), kwargs={"yield_to": prio})
    try:
        background.start()
        background.join(10)
        assert not background.is_alive()
        assert torch.equal(out, data)
        assert events == ["piece", "piece", "urgent done"] + ["piece"] * 4, events
    finally:
        release.set()
        f.unlink()


def test_weight_reads_take_turns_in_issue_order():
    """weights.ReadOrder: reads start in the order their turns were taken, whichever thread
    gets there first, and a turn given back without reading (a failed or cancelled load)
    holds no one up."""
    import threading
    import time

    from flexgen.weights import ReadOrder
    order = ReadOrder()
    turns = [order.take() for _ in range(4)]
    order.release(turns[1])                       # its load failed before reading
    started = []

    def read(turn):
        with order.turn(turn):
            started.append(turn)
            time.sleep(0.01)
    threads = [threading.Thread(target=read, args=(t,)) for t in (turns[3], turns[2], turns[0])]
    for th in threads:
        th.start()
        time.sleep(0.02)                          # later turns are waiting before the first arrives
    for th in threads:
        th.join(timeout=10)
    assert started == [turns[0], turns[2], turns[3]]
    assert order.take() == turns[3] + 1 and not any(th.is_alive() for th in threads)
