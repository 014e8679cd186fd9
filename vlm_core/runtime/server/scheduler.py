"""Admission and running of generations: N worker threads, a bounded queue, timeouts, cancellation.

Knows nothing of HTTP or of the model: a job is any iterator of events (`worker.run` gives one), which
the scheduler drives on a worker thread and hands, event by event, to the event loop through the job's
Ticket. It owns its counters (running, queued, stats); callers only read them.

    ticket = scheduler.submit(events, arrived=time.monotonic())   # QueueFull at once when full
    while (event := await ticket.next()) is not None: ...          # raises the job's error
    ticket.cancel()                                                # client gone: leaves the queue at once,
                                                                   # or stops the running job at its next event

Why a worker per sequence: each worker thread drives one request's `vlm.stream_generate`, and
every such request is a sequence of the model's BatchEngine, which decodes all of them in one batched
decoder call per step (a step for 4 sequences costs far less than 4 steps: decode reads the weights
once). So the number of workers is `--parallel`, the sequences decoded together; more requests wait.

Timeouts count from the request's arrival, queueing included: a job still queued at its deadline
ends with QueueTimeout; a running one is stopped at its next event with GenerationTimeout.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Iterator

log = logging.getLogger("vlm_core.runtime.server")


class QueueFull(Exception):
    """Every worker is busy and the queue holds `max_queue` jobs: try again shortly."""


class QueueTimeout(Exception):
    """No worker became free before the job's deadline."""


class GenerationTimeout(Exception):
    """The job was still running at its deadline and was stopped."""


class Cancelled(Exception):
    """The job was cancelled (its client went away) before it finished."""


_END = object()  # the job's iterator is exhausted


class Ticket:
    """One submitted job, seen from the event loop: its events, its state, and a way to cancel it."""

    def __init__(self, scheduler: "Scheduler", events: Iterator, deadline: float):
        self.scheduler, self.events, self.deadline = scheduler, events, deadline
        self.state = "queued"  # -> "running" -> "done"
        self.cancel_requested = threading.Event()  # read by the worker thread between events
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._expiry: asyncio.TimerHandle | None = None

    async def next(self):
        """The job's next event; None once it has ended. Raises the error it ended with.

        Errors: QueueTimeout, GenerationTimeout, Cancelled, or whatever the job's iterator raised.
        """
        kind, value = await self._outbox.get()
        if kind == "error":
            raise value
        return None if value is _END else value

    def cancel(self) -> None:
        """Stop the job: a queued one leaves the queue now, a running one stops at its next event."""
        self.cancel_requested.set()
        if self.state == "queued":
            self.scheduler._drop(self, Cancelled("cancelled while queued"), "cancelled")

    def _put(self, kind: str, value) -> None:
        self._outbox.put_nowait((kind, value))


class Scheduler:
    """`workers` threads run jobs; at most `max_queue` jobs wait. Event-loop thread only, except `_drive`."""

    def __init__(self, workers: int, max_queue: int, timeout: float):
        self.workers, self.max_queue, self.timeout = workers, max_queue, timeout
        self._running: set[Ticket] = set()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._stats = collections.Counter()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def stats(self) -> dict:
        """Counts of jobs started, completed, failed, cancelled, rejected (queue full) and timed out."""
        return dict(self._stats)

    def submit(self, events: Iterator, arrived: float | None = None) -> Ticket:
        """Run `events` on a free worker, or queue it. Raises QueueFull when the queue is full.

        Args:
            events: an iterator (usually a generator, not yet started); it is advanced and closed only on a
                worker thread.
            arrived: time.monotonic() when the request arrived; the timeout counts from it.
        """
        self._loop = asyncio.get_running_loop()
        arrived = time.monotonic() if arrived is None else arrived
        ticket = Ticket(self, events, arrived + self.timeout)
        if len(self._running) < self.workers and not self._queue:
            self._start(ticket)
        elif len(self._queue) >= self.max_queue:
            self._stats["rejected"] += 1
            raise QueueFull(f"the server is busy: {self.workers} generation(s) running and {self.max_queue} "
                            f"waiting (--max-queue); retry shortly")
        else:
            self._queue.append(ticket)
            ticket._expiry = self._loop.call_later(max(0.0, ticket.deadline - time.monotonic()), self._drop, ticket,
                                                   QueueTimeout(f"no worker became free within the server's "
                                                                f"timeout of {self.timeout:g} s (--timeout)"),
                                                   "timeouts")
        return ticket

    def close(self) -> None:
        """Stop everything: queued jobs are cancelled, running ones stop at their next event."""
        for ticket in list(self._queue) + list(self._running):
            ticket.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- event-loop side ----------------------------------------------------------------------------

    def _start(self, ticket: Ticket) -> None:
        if ticket._expiry is not None:
            ticket._expiry.cancel()
        ticket.state = "running"
        self._running.add(ticket)
        self._stats["started"] += 1
        self._executor.submit(self._drive, ticket)

    def _drop(self, ticket: Ticket, error: Exception, outcome: str) -> None:
        """A queued job leaves the queue without running (cancelled or expired)."""
        if ticket.state != "queued":
            return
        self._queue.remove(ticket)
        if ticket._expiry is not None:
            ticket._expiry.cancel()
        ticket.state = "done"
        self._stats[outcome] += 1
        ticket._put("error", error)
        _close(ticket.events)  # never started: nothing to clean up, but release what it holds now

    def _finished(self, ticket: Ticket, outcome: str, error: Exception | None) -> None:
        """A worker is done with `ticket`: report its end, free the worker, start the next queued job."""
        ticket.state = "done"
        self._running.discard(ticket)
        self._stats[outcome] += 1
        if error is not None:
            ticket._put("error", error)
        else:
            ticket._put("event", _END)
        while self._queue and len(self._running) < self.workers:
            self._start(self._queue.popleft())

    # --- worker-thread side -------------------------------------------------------------------------

    def _drive(self, ticket: Ticket) -> None:
        """Advance the job's iterator, handing each event to the loop; stop on cancel or at the deadline.

        The iterator is always closed here, so a stopped generation frees its KV cache before the worker
        is released."""
        outcome, error = "completed", None
        try:
            while True:
                if ticket.cancel_requested.is_set():
                    raise Cancelled("cancelled")
                if time.monotonic() > ticket.deadline:
                    raise GenerationTimeout(f"the generation did not finish within the server's timeout of "
                                            f"{self.timeout:g} s (--timeout); ask for fewer max_tokens")
                try:
                    event = next(ticket.events)
                except StopIteration:
                    break
                self._call(ticket._put, "event", event)
        except Cancelled as e:
            outcome, error = "cancelled", e
        except GenerationTimeout as e:
            outcome, error = "timeouts", e
        except Exception as e:  # the job's own error (a bad request found late, or an engine failure)
            outcome, error = "failed", e
        finally:
            _close(ticket.events)  # runs the engine generator's cleanup; its KV cache becomes garbage now
            self._call(self._finished, ticket, outcome, error)

    def _call(self, function, *args) -> None:
        """Run `function(*args)` on the event loop, from a worker thread."""
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


def _close(events: Iterator) -> None:
    """Close a job's iterator; a failure to clean up is logged, never allowed to keep its worker."""
    close = getattr(events, "close", None)
    try:
        if close is not None:
            close()
    except Exception:
        log.exception("closing a generation failed")
