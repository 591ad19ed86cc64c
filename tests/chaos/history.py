"""The history log: every request, every attempt and every outcome, as JSON lines.

Events (one JSON object per line, each with `wall` and `mono` times):
  {"ev": "request", "req", "op": "transfers"|"accounts", "kind", "of", "client", "items": [...]}
  {"ev": "invoke",  "req", "attempt"}
  {"ev": "ok",      "req", "attempt", "results": [[result, timestamp], ...]}
  {"ev": "fail",    "req", "attempt", "code", "ambiguous": bool, "detail"}
  {"ev": "nemesis", "what", ...}
Items hold every field of the sent message; bytes fields are hex strings, so the log replays
exactly (an id of the wrong length stays wrong).
"""
from __future__ import annotations

import json
import pathlib
import threading
import time

from engine.gen.txengine.v1 import ledger_pb2 as pb

TRANSFER_FIELDS = ("id", "debit_account_id", "credit_account_id", "amount", "pending_id",
                   "ledger", "code", "flags", "timeout_seconds", "user_data", "timestamp")
ACCOUNT_FIELDS = ("id", "ledger", "code", "flags", "debits_pending", "debits_posted",
                  "credits_pending", "credits_posted", "user_data", "timestamp")
BYTES_FIELDS = {"id", "debit_account_id", "credit_account_id", "pending_id", "user_data"}

# Status codes after which the outcome of the attempt is unknown (README: retry with the same
# ids). Everything else that is not OK is a definite "this attempt changed nothing".
AMBIGUOUS_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN",
                             "CANCELLED", "ABORTED", "LOCAL_ERROR"})


def message_json(message, fields) -> dict:
    out = {}
    for name in fields:
        value = getattr(message, name)
        out[name] = value.hex() if name in BYTES_FIELDS else int(value)
    return out


def transfer_json(t: pb.Transfer) -> dict:
    return message_json(t, TRANSFER_FIELDS)


def account_json(a: pb.Account) -> dict:
    return message_json(a, ACCOUNT_FIELDS)


def from_json(item: dict) -> dict:
    """Item fields with bytes restored."""
    return {k: bytes.fromhex(v) if k in BYTES_FIELDS else v for k, v in item.items()}


def transfer_message(item: dict) -> pb.Transfer:
    return pb.Transfer(**from_json(item))


def account_message(item: dict) -> pb.Account:
    return pb.Account(**from_json(item))


class HistoryLog:
    """Append-only JSON lines; safe to use from several threads and tasks."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._file = open(self.path, "a", buffering=1 << 16)
        self._lock = threading.Lock()

    def write(self, ev: str, **fields) -> None:
        fields["ev"] = ev
        fields["wall"] = time.time()
        fields["mono"] = time.monotonic()
        line = json.dumps(fields, separators=(",", ":"))
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def read_history(path: str | pathlib.Path) -> list[dict]:
    events = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                events.append(json.loads(line))
    return events
