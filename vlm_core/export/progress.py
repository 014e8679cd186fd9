"""Numbered step lines on stderr, with a heartbeat during long steps.

    progress = Progress(total=6)
    with progress.step("exporting the vision graph"):
        ...                      # [3/6] exporting the vision graph ... / done in 4.2 s

How many steps an export takes is counted in one place, export/pipeline.py's count_steps.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


class Progress:
    """Numbered step lines on stderr, with a heartbeat during long steps.

    total: the number of steps (None until known: run_export sets it from count_steps)."""

    def __init__(self, total: int | None = None, stream=None, heartbeat_s: float = 20.0):
        # stream None: whatever sys.stderr is when a line is written (a default bound at import time
        # would keep writing to a stream that was swapped out and closed since, e.g. by a test harness)
        self.total, self.index, self.stream, self.heartbeat_s = total, 0, stream, heartbeat_s

    def log(self, message: str) -> None:
        print(message, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str):
        self.index += 1
        start = time.perf_counter()
        self.log(f"[{self.index}/{self.total if self.total is not None else '?'}] {name} ...")
        done = threading.Event()

        def beat():
            while not done.wait(self.heartbeat_s):
                self.log(f"      ... {name}: {time.perf_counter() - start:.0f} s")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
        self.log(f"      done in {time.perf_counter() - start:.1f} s")
