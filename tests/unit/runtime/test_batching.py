"""The batcher's merging, splitting and queue bound, with a recording run function."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from packager.runtime.batching import Batcher, QueueFull

Array = np.ndarray[Any, Any]


class Recorder:
    """Doubles its input and records the rows of every run."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.runs: list[int] = []
        self.gate = gate

    def __call__(
        self, feeds: Mapping[str, Array], outputs: Sequence[str], rows: int
    ) -> list[Array]:
        if self.gate is not None:
            self.gate.wait(10)
        self.runs.append(rows)
        return [feeds["x"] * 2 for _ in outputs]


def test_concurrent_requests_merge_and_split_back_in_order() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=16, max_delay_s=0.2, max_queue=64)
    inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda a: batcher.submit({"x": a}, ["y"]), inputs))
    batcher.close()
    for array, (result,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result, array * 2)
    assert sum(recorder.runs) == sum(len(a) for a in inputs)
    assert len(recorder.runs) < len(inputs)


def test_batch_never_exceeds_max_rows_and_incompatible_shapes_run_apart() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=4, max_delay_s=0.1, max_queue=64)
    inputs = [np.ones((3, 2), np.float32)] * 3 + [np.ones((1, 5), np.float32)] * 2
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda a: batcher.submit({"x": a}, ["y"]), inputs))
    batcher.close()
    assert [r[0].shape for r in results] == [a.shape for a in inputs]
    assert max(recorder.runs) <= 4
    assert sum(recorder.runs) == 11


def test_full_queue_refuses_immediately() -> None:
    gate = threading.Event()
    batcher = Batcher(Recorder(gate), max_batch_size=1, max_delay_s=0.0, max_queue=1)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, {"x": np.ones((1, 1))}, ["y"])  # running (gated)
        time.sleep(0.2)
        second = pool.submit(batcher.submit, {"x": np.ones((1, 1))}, ["y"])  # queued
        time.sleep(0.2)
        assert batcher.depth() == 1
        with pytest.raises(QueueFull):
            batcher.submit({"x": np.ones((1, 1))}, ["y"])
        gate.set()
        assert first.result(5)[0].shape == second.result(5)[0].shape == (1, 1)
    batcher.close()


def test_a_failing_run_fails_every_request_of_the_batch_and_the_worker_survives() -> None:
    calls = []

    def run(feeds: Mapping[str, Array], outputs: Sequence[str], rows: int) -> list[Array]:
        calls.append(rows)
        if len(calls) == 1:
            raise ValueError("boom")
        return [feeds["x"]]

    batcher = Batcher(run, max_batch_size=8, max_delay_s=0.0, max_queue=8)
    with pytest.raises(ValueError, match="boom"):
        batcher.submit({"x": np.ones((1, 1))}, ["y"])
    assert batcher.submit({"x": np.ones((2, 1))}, ["y"])[0].shape == (2, 1)
    assert batcher.alive
    batcher.close()
    assert not batcher.alive


def test_enqueue_calls_back_with_results_or_error_without_blocking() -> None:
    gate = threading.Event()
    batcher = Batcher(Recorder(gate), max_batch_size=4, max_delay_s=0.01, max_queue=8)
    outcomes: list[tuple[Any, Any]] = []
    done = threading.Event()

    def callback(results: list[Array] | None, error: BaseException | None) -> None:
        outcomes.append((results, error))
        if len(outcomes) == 2:
            done.set()

    batcher.enqueue({"x": np.ones((1, 2))}, ["y"], callback)
    batcher.enqueue({"x": np.full((2, 2), 3.0)}, ["y"], callback)
    assert outcomes == []  # enqueue returned while the run waits at the gate
    gate.set()
    assert done.wait(10)
    results = sorted((r[0].tolist() for r, e in outcomes if r is not None and e is None), key=len)
    assert results == [[[2.0, 2.0]], [[6.0, 6.0], [6.0, 6.0]]]
    batcher.close()


def test_one_bad_request_fails_only_itself_when_merged_with_others() -> None:
    """A batch that fails is run again request by request: only the bad one gets the error."""
    gate = threading.Event()
    runs: list[int] = []

    def run(feeds: Mapping[str, Array], outputs: Sequence[str], rows: int) -> list[Array]:
        gate.wait(10)
        runs.append(rows)
        if (feeds["x"] < 0).any():
            raise ValueError("index out of range")
        return [feeds["x"] * 2]

    batcher = Batcher(run, max_batch_size=8, max_delay_s=0.2, max_queue=8)
    outcomes: dict[float, tuple[Any, Any]] = {}
    done = threading.Event()

    def callback_for(value: float) -> Any:
        def callback(results: list[Array] | None, error: BaseException | None) -> None:
            outcomes[value] = (results, error)
            if len(outcomes) == 3:
                done.set()

        return callback

    for value in (1.0, -1.0, 3.0):
        batcher.enqueue({"x": np.full((1, 2), value)}, ["y"], callback_for(value))
    gate.set()
    assert done.wait(10)
    assert runs[0] == 3  # merged first, then one by one
    assert isinstance(outcomes[-1.0][1], ValueError) and outcomes[-1.0][0] is None
    assert outcomes[1.0][0][0].tolist() == [[2.0, 2.0]] and outcomes[1.0][1] is None
    assert outcomes[3.0][0][0].tolist() == [[6.0, 6.0]] and outcomes[3.0][1] is None
    batcher.close()
