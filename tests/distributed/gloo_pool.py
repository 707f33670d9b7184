"""A pool of P forked processes joined in a gloo process group, started once per world size and
reused by every test (importing torch and forming the group dominate a fresh start).

    results = pool(3).run(fn, *args)    # fn(rank, world_size, *args) on every rank; list of returns

`fn` must be a module-level function of an already imported module (the workers are forked
after the test modules are imported, and receive it by reference). An exception on any rank
fails the call with that rank's traceback; a call that does not finish within `timeout` kills
the pool (a hang fails the test instead of the suite)."""

from __future__ import annotations

import atexit
import socket
import traceback

import torch
import torch.multiprocessing as mp

_POOLS: dict = {}
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException as e:  # reported to the test, the worker stays alive
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class GlooPool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("fork")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = TIMEOUT_S) -> list:
        """fn(rank, world_size, *args) on every rank; the list of returns in rank order."""
        for q in self.tasks:
            q.put((fn, args))
        got = {}
        import queue

        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                got[rank] = (ok, value)
        except queue.Empty:
            self.close(kill=True)
            _POOLS.pop(self.world_size, None)
            raise AssertionError(f"{fn.__name__} did not finish on all {self.world_size} ranks within {timeout} s "
                                 f"(finished: {sorted(got)}): a hang")
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            raise RankError(failed)
        return [got[r][1] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self.procs, self.tasks):
            if not kill and p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()  # one of our own workers, by its handle


class RankError(AssertionError):
    """Raised by `GlooPool.run` when fn raised on some ranks: `.errors` maps rank -> message."""

    def __init__(self, errors: dict) -> None:
        self.errors = errors
        super().__init__("\n".join(f"rank {r}: {m}" for r, m in sorted(errors.items())))


def pool(world_size: int) -> GlooPool:
    if world_size not in _POOLS:
        _POOLS[world_size] = GlooPool(world_size)
    return _POOLS[world_size]


@atexit.register
def _close_all() -> None:
    for p in list(_POOLS.values()):
        p.close()
    _POOLS.clear()
