"""LRU cache of inference results, bounded in bytes (off unless ``cache_bytes`` > 0)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from .model import Array


def cache_key(model_digest: str, inputs: Mapping[str, Array], outputs: Sequence[str]) -> bytes:
    """A digest of the model and the exact input bytes (with names, dtypes and shapes)."""
    digest = hashlib.sha256(model_digest.encode())
    for name, array in inputs.items():
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(np.ascontiguousarray(array).data)
    digest.update(("\0".join(outputs)).encode())
    return digest.digest()


class ResponseCache:
    """Thread-safe LRU of read-only result arrays by :func:`cache_key`, at most ``capacity_bytes``.

    An entry costs its arrays' nbytes + its key + 64 bytes; one larger than the whole capacity is
    not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[bytes, tuple[tuple[Array, ...], int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[Array, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, results: Sequence[Array]) -> None:
        frozen = []
        for result in results:
            copy = np.array(result, copy=True)
            copy.setflags(write=False)  # shared between requests: nobody may change it
            frozen.append(copy)
        # Key and bookkeeping are small next to the arrays; 64 bytes each is a fair bound.
        size = sum(a.nbytes for a in frozen) + len(key) + 64
        if size > self.capacity:
            return
        with self._lock:
            if key in self._entries:
                return
            while self.used + size > self.capacity:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.used -= evicted
            self._entries[key] = (tuple(frozen), size)
            self.used += size

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
