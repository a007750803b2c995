"""Dynamic batching: requests that arrive together share one onnxruntime run.

One worker thread owns the model's runs. A request waits at most ``max_delay_s`` after the oldest
queued request for others to join; compatible requests (same requested outputs, same non-batch
shapes and dtypes) are concatenated along the first dimension up to ``max_batch_size`` rows, run
once, and the results are split back by rows. The queue is bounded: a full queue refuses at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .model import Array

# Type aliases for annotations only: CPython 3.8 (JetPack 5) cannot subscript list or
# collections.abc at run time.
if TYPE_CHECKING:
    RunFn = Callable[[Mapping[str, Array], Sequence[str], int], list[Array]]
    # Called on the batch worker thread with (results, None) or (None, error).
    DoneFn = Callable[[list[Array] | None, BaseException | None], None]


class QueueFull(Exception):
    """Raised by :meth:`Batcher.submit`/``enqueue`` when ``max_queue`` requests already wait or
    the batcher is closing (the server answers 503 + Retry-After)."""


# eq=False: the queue removes a request by identity; a field-wise == would compare numpy arrays
# (ValueError), killing the batcher thread when a request of another group waits ahead of it.
@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, Array]
    outputs: tuple[str, ...]
    rows: int
    group: tuple[Any, ...]
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Array] | None = None
    error: BaseException | None = None
    callback: DoneFn | None = None


def _group(inputs: Mapping[str, Array], outputs: tuple[str, ...]) -> tuple[Any, ...]:
    return (outputs, tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


class Batcher:
    """The worker thread that runs queued requests in batches of at most ``max_batch_size`` rows.

    ``run(feeds, output_names, rows)`` returns one array per output whose first dimension is
    ``rows``; ``max_delay_s`` is in seconds; ``max_queue`` bounds the waiting requests.
    """

    def __init__(self, run: RunFn, max_batch_size: int, max_delay_s: float, max_queue: int) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        """Queue one request and wait for its rows of the batch's results (blocking)."""
        pending = self._enqueue(inputs, outputs, None)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.results is not None
        return pending.results

    def enqueue(self, inputs: Mapping[str, Array], outputs: Sequence[str], done: DoneFn) -> None:
        """Queue one request without waiting: ``done`` is called on the worker thread with its
        results or its error (an event loop hands them back to its own thread)."""
        self._enqueue(inputs, outputs, done)

    def _enqueue(
        self, inputs: Mapping[str, Array], outputs: Sequence[str], done: DoneFn | None
    ) -> _Pending:
        names = tuple(outputs)
        rows = int(next(iter(inputs.values())).shape[0])
        pending = _Pending(inputs, names, rows, _group(inputs, names), time.monotonic())
        pending.callback = done
        with self._cond:
            if self._stopping or len(self._queue) >= self.max_queue:
                raise QueueFull
            self._queue.append(pending)
            self._cond.notify()
        return pending

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _select(self) -> tuple[list[_Pending], int]:
        head = self._queue[0]
        chosen, rows = [head], head.rows
        for item in list(self._queue)[1:]:
            if item.group == head.group and rows + item.rows <= self.max_batch_size:
                chosen.append(item)
                rows += item.rows
        return chosen, rows

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return []
                self._cond.wait()
            deadline = self._queue[0].enqueued + self.max_delay_s
            while True:
                chosen, rows = self._select()
                left = deadline - time.monotonic()
                if rows >= self.max_batch_size or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            for item in chosen:
                self._queue.remove(item)
            return chosen

    def _loop(self) -> None:
        while True:
            items = self._take()
            if not items:
                return
            self._execute(items)

    def _execute(self, items: list[_Pending]) -> None:
        if len(items) > 1:
            try:
                self._compute(items)
            except Exception:
                # One request's bad values must not fail the others merged with it: run each
                # alone, so that only its own request gets the error.
                for item in items:
                    self._execute([item])
                return
            self._finish(items)
            return
        try:
            self._compute(items)
        except Exception as exc:
            items[0].error = exc
        self._finish(items)

    def _compute(self, items: list[_Pending]) -> None:
        """Run the items as one batch and set each one's results (raises on failure)."""
        first = items[0]
        rows = sum(item.rows for item in items)
        if len(items) == 1:
            feeds = first.inputs
        else:
            feeds = {
                name: np.concatenate([item.inputs[name] for item in items]) for name in first.inputs
            }
        results = self._run(feeds, first.outputs, rows)
        for result in results:
            if result.ndim == 0 or result.shape[0] != rows:
                raise RuntimeError(
                    f"the model returned {result.shape} for a batch of {rows} rows; "
                    "it cannot be batched (set max_batch_size to 0)"
                )
        offset = 0
        for item in items:
            item.results = [r[offset : offset + item.rows] for r in results]
            offset += item.rows

    @staticmethod
    def _finish(items: list[_Pending]) -> None:
        for item in items:
            if item.callback is not None:
                try:
                    item.callback(item.results, item.error)
                except Exception:  # a callback's bug must not end the worker
                    pass
            else:
                item.done.set()
