"""128-bit ids: wire bytes, (hi, lo) halves for kernels, and time-ordered generation."""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from engine.limits import ID_BYTES

ZERO_ID = bytes(ID_BYTES)


def halves(ids: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Split 16-byte big-endian ids into native uint64 arrays (hi, lo).

    Every id must already be exactly 16 bytes (the servicer checks lengths).
    """
    if not ids:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty.copy()
    words = np.frombuffer(b"".join(ids), dtype=">u8").astype(np.uint64).reshape(-1, 2)
    return np.ascontiguousarray(words[:, 0]), np.ascontiguousarray(words[:, 1])


def as_int(id_bytes: bytes) -> int:
    return int.from_bytes(id_bytes, "big")


def from_int(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


class TimeOrderedIds:
    """UUIDv7-layout ids: 48-bit milliseconds, version 7, then a per-millisecond counter and
    random bits, so ids made in one process are strictly increasing and index well."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def next(self) -> bytes:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms <= self._last_ms:
                now_ms = self._last_ms
                self._counter += 1
            else:
                self._last_ms = now_ms
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            counter = self._counter & 0xFFF
            if counter != self._counter:
                self._last_ms += 1
                now_ms = self._last_ms
                self._counter = counter = 0
            rand = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
            value = (now_ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
            return from_int(value)


new_id = TimeOrderedIds().next
