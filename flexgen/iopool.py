"""The I/O threads that run loads and stores while the compute thread computes."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


# Loads in flight at once; the hardware profile times disk reads with as many readers.
LOAD_THREADS = 2


class IOPool:
    """Threads that run loads and stores. Ordering between dependent tasks is explicit:
    a task that needs another's result is given its future and waits for it.

    Stores run on workers of their own: a store may wait for its device-to-host copy
    (and so for compute to reach its mark), and must not hold up the next layer's
    prefetch, which the cost model assumes runs beside it. Weight loads have workers of
    their own too: they read one layer at a time (PlacedWeights' read lock), so a weight
    load can hold a worker for a whole layer's read while waiting its turn, and the next
    gpu batch's cache load, which compute needs sooner, must not queue behind it (on a
    4-layer OPT-13B-width decode, cache loads sat 20 ms each in that queue)."""

    def __init__(self, num_threads: int = LOAD_THREADS, store_threads: int = 1):
        # One intra-op thread per I/O worker (torch's setting is per thread): their copies
        # are memory-bound, and a full OpenMP team each would oversubscribe the cores the
        # compute thread's team runs on (seen as 5-30x stalls on a 2-core host).
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="flexgen-load",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._weights = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="flexgen-weights",
                                           initializer=torch.set_num_threads, initargs=(1,))
        self._stores = ThreadPoolExecutor(max_workers=store_threads, thread_name_prefix="flexgen-store",
                                          initializer=torch.set_num_threads, initargs=(1,))

    def submit(self, fn, *args, store: bool = False, weights: bool = False) -> Future:
        pool = self._stores if store else self._weights if weights else self._pool
        return pool.submit(fn, *args)

    def shutdown(self):
        for pool in (self._pool, self._weights, self._stores):
            pool.shutdown(wait=True, cancel_futures=True)


def done_future(value=None) -> Future:
    f = Future()
    f.set_result(value)
    return f


__all__ = ["IOPool", "done_future"]
