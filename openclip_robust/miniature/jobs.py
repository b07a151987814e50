"""How the miniature runs its fine-tunes and evaluations: one core each, `workers` at a time, by priority.

Each job runs in a child process forked from a forkserver that imported torch, upstream's training
loop, the plugin and the evaluation code once: a fresh ``python -c`` paid those imports (8-9 s of
CPU) per fine-tune. A child runs with one thread: on shared cores, OpenMP threads that spin-wait
stall each other (steps 10x slower, erratic), and two one-thread jobs use two cores better than
one two-thread job (model evaluation: 1.4x the throughput). As with any start method but fork, the
caller's main module must be safe to import (``if __name__ == "__main__":``): children import it.
"""
import functools
import itertools
import multiprocessing
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

PRELOAD = ["torch", "open_clip_train.main", "openclip_robust.plugin", "openclip_robust.evaluation.suite",
           "clip_benchmark.metrics.zeroshot_classification", "sklearn.metrics", "openclip_robust.miniature.jobs"]


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # a no-op once the forkserver runs
    return ctx


def _child(log, fn, args):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # a forkserver child inherits 'forkserver' as its start method; upstream's loader workers expect a fresh
    # process's default (their dataset holds lambdas, which only 'fork' can pass)
    multiprocessing.set_start_method(None, force=True)
    torch.set_flush_denormal(True)  # without it CPU steps run several times slower
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_in_child(fn, args, log, what):
    """fn(*args) in a one-thread child process, stdout and stderr to `log`; raise naming `what` if it fails.

    fn must be importable by name (a module-level function); a return value is dropped: write files.
    """
    proc = _context().Process(target=_child, args=(str(log), fn, tuple(args)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        lines = Path(log).read_text(errors="replace").splitlines(keepends=True) if Path(log).exists() else []
        tail = "".join(lines[-30:]) or "(nothing logged; a child that fails before its job starts reports on stderr)\n"
        raise RuntimeError(f"{what} failed (exit code {proc.exitcode}); see {log}; its last lines:\n{tail}")


class JobPool:
    """Run jobs `workers` at a time, the lowest priority number first (ties: in the order they became ready).

    A job runs in a worker thread; it usually starts a child (run_in_child), so the threads only wait.
    ``with JobPool(n) as pool``: leaving the block waits for running jobs; on an error, queued jobs
    are cancelled first.
    """

    def __init__(self, workers, progress=None):
        """progress: a prefix; when set, each finished job prints "<prefix> jobs: D done, L left (S s)"."""
        self._progress, self._submitted, self._done, self._t0 = progress, 0, 0, time.time()
        self._count_lock = threading.Lock()
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()
        self._cancelled = False
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, priority, fn, *args, after=()):
        """Future of fn(*args, *results of `after`), queued once every future in `after` is done.

        A failed or cancelled dependency fails the job without running it.
        """
        future, left, lock = Future(), [len(after)], threading.Lock()
        with self._count_lock:
            self._submitted += 1

        def dependency_done(_):
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                results = [d.result() for d in after]
            except BaseException as e:  # noqa: B036 (CancelledError too)
                if future.set_running_or_notify_cancel():
                    future.set_exception(e)
                return
            self._put(priority, future, functools.partial(fn, *args, *results))
        if after:
            for d in after:
                d.add_done_callback(dependency_done)
        else:
            self._put(priority, future, functools.partial(fn, *args))
        return future

    def _put(self, priority, future, job):
        if self._cancelled:
            future.cancel()
        else:
            self._queue.put((priority, next(self._order), future, job))

    def _work(self):
        while True:
            _, _, future, job = self._queue.get()
            if job is None:
                return
            if self._cancelled:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as e:  # noqa: B036
                    future.set_exception(e)
                self._report()

    def _report(self):
        with self._count_lock:
            self._done += 1
            done, left = self._done, self._submitted - self._done
        if self._progress:
            print(f"{self._progress} jobs: {done} done, {left} left ({time.time() - self._t0:.0f} s)", flush=True)

    def close(self, cancel=False):
        """Wait for the jobs (cancel: only for the running ones; the others are cancelled)."""
        self._cancelled = self._cancelled or cancel
        for _ in self._threads:
            self._queue.put((float("inf"), next(self._order), None, None))
        for t in self._threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(cancel=exc_type is not None)
