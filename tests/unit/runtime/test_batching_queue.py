"""The batcher takes requests out of its queue by identity (issue 16's trace run found this)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from packager.runtime.batching import Batcher

Array = np.ndarray[Any, Any]


def test_a_request_of_another_group_waiting_ahead_does_not_kill_the_batcher() -> None:
    """Queue: busy | A (x: [3, 2] -> y) | B (x: [1, 2] -> z, another group) | C (x: [1, 2] -> y).
    A and C form one batch; taking C out past B compared their numpy arrays with == (ValueError)
    and the batcher thread died, leaving every later request waiting forever."""
    gate = threading.Event()
    runs: list[int] = []

    def run(feeds: Mapping[str, Array], outputs: Sequence[str], rows: int) -> list[Array]:
        gate.wait(10)
        runs.append(rows)
        return [feeds["x"] * 2 for _ in outputs]

    batcher = Batcher(run, max_batch_size=4, max_delay_s=0.5, max_queue=64)
    requests = [
        (np.arange(8, dtype=np.float32).reshape(4, 2), "y"),  # a full batch: runs at once
        (np.arange(6, dtype=np.float32).reshape(3, 2), "y"),
        (np.arange(2, dtype=np.float32).reshape(1, 2), "z"),
        (np.arange(2, 4, dtype=np.float32).reshape(1, 2), "y"),
    ]
    results: dict[int, list[Array]] = {}

    def client(index: int, array: Array, output: str) -> None:
        results[index] = batcher.submit({"x": array}, [output])

    # Daemon threads: on the failure this guards against they would wait forever.
    threads = [
        threading.Thread(target=client, args=(i, array, output), daemon=True)
        for i, (array, output) in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # keep the queue order
    gate.set()
    for thread in threads:
        thread.join(20)
    assert batcher.alive
    assert sorted(results) == [0, 1, 2, 3]
    batcher.close()
    for index, (array, _) in enumerate(requests):
        (result,) = results[index]
        np.testing.assert_array_equal(result, array * 2)
    assert runs == [4, 4, 1]
