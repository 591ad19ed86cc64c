"""Plain-Python oracle of ext/copy.pyx: Postgres binary COPY built with struct."""
from __future__ import annotations

import struct

INT16, INT32, INT64, UUID, BYTEA = 1, 2, 3, 4, 5
HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
TRAILER = b"\xff\xff"


def encode_binary_copy_reference(rows: int, columns: list[tuple]) -> bytes:
    """Same contract as engine.kernels._copy.encode_binary_copy."""
    out = [HEADER]
    for r in range(rows):
        out.append(struct.pack(">h", len(columns)))
        for spec in columns:
            kind = spec[0]
            if kind == INT16:
                out.append(struct.pack(">ih", 2, int(spec[1][r])))
            elif kind == INT32:
                out.append(struct.pack(">ii", 4, int(spec[1][r])))
            elif kind == INT64:
                out.append(struct.pack(">iq", 8, int(spec[1][r])))
            elif kind == UUID:
                out.append(struct.pack(">iQQ", 16, int(spec[1][r]), int(spec[2][r])))
            elif kind == BYTEA:
                value = spec[1][int(spec[2][r]):int(spec[2][r + 1])]
                out.append(struct.pack(">i", len(value)) + bytes(value))
            else:
                raise ValueError(f"unknown column kind {kind}")
    out.append(TRAILER)
    return b"".join(out)
