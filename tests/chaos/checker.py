"""The offline checker: a history log plus the final database, judged against the contract.

Run it after the faults stop and the engine serves again. It
  1. resolves every request whose outcome stayed unknown by LookupTransfers (through the
     engine) and checks the engine's answers against the database;
  2. checks every send of every id against the stored row: an acknowledged OK is stored exactly
     once with the acknowledged fields and timestamp; EXISTS names the stored timestamp;
     EXISTS_WITH_DIFFERENT_<F> means the stored version differs first in F (the changed version
     never committed); a stored row was sent by an attempt that could have committed it (OK or
     unknown outcome), never only by attempts that failed or were rejected (INVALID_ARGUMENT,
     RESOURCE_EXHAUSTED, ...); an identical retry after an acknowledged commit is EXISTS;
  3. checks chains all-or-nothing (stored and in every response);
  4. checks storage: one row per id, each in the partition of its id, per-shard seq exactly
     1..last_seq and in timestamp order, timestamps unique and never ahead of the shards'
     clock, Σ debits = Σ credits per ledger (posted and pending);
  5. replays every committed account and transfer in timestamp order through `LedgerModel`:
     every one must be accepted (so guarded accounts never exceeded their limits at any
     point), and the replay must reproduce every stored balance exactly.
The result is a `CheckReport` (valid flag, counts, violations with witnesses).
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import pathlib
from collections import Counter, defaultdict

import asyncpg
import grpc

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.posting.batch import shards_of
from engine.posting.model import EXPIRED, PENDING, LedgerModel, ModelAccount, ModelTransfer
from engine.results import AccountFlags as AF
from engine.results import AccountResult as AR
from engine.results import TransferFlags as TF
from engine.results import TransferResult as TR

from chaos.history import AMBIGUOUS_CODES, from_json, read_history

ZERO = bytes(16)
# Field order of the idempotency comparison (README "Results and their precedence").
TRANSFER_COMPARE = (("flags", "FLAGS"), ("debit_account_id", "DEBIT_ACCOUNT_ID"),
                    ("credit_account_id", "CREDIT_ACCOUNT_ID"), ("amount", "AMOUNT"),
                    ("pending_id", "PENDING_ID"), ("user_data", "USER_DATA"),
                    ("timeout_seconds", "TIMEOUT"), ("code", "CODE"), ("ledger", "LEDGER"))
ACCOUNT_COMPARE = (("flags", "FLAGS"), ("user_data", "USER_DATA"), ("ledger", "LEDGER"),
                   ("code", "CODE"))
# Results decided before the idempotency check (README precedence, and the model's order for
# post/void): they may answer a resend of a committed id.
BEFORE_IDEMPOTENCY = {TR[name] for name in (
    "LINKED_EVENT_FAILED", "LINKED_EVENT_CHAIN_OPEN", "TIMESTAMP_MUST_BE_ZERO", "RESERVED_FLAG",
    "ID_MUST_NOT_BE_ZERO", "DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO",
    "CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO", "ACCOUNTS_MUST_BE_DIFFERENT", "PENDING_ID_MUST_BE_ZERO",
    "PENDING_ID_MUST_NOT_BE_ZERO", "PENDING_ID_MUST_BE_DIFFERENT",
    "TIMEOUT_RESERVED_FOR_PENDING_TRANSFER", "FLAGS_ARE_MUTUALLY_EXCLUSIVE",
    "LEDGER_MUST_NOT_BE_ZERO", "CODE_MUST_NOT_BE_ZERO", "AMOUNT_MUST_NOT_BE_ZERO",
    "DEBIT_ACCOUNT_NOT_FOUND", "CREDIT_ACCOUNT_NOT_FOUND", "ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER",
    "TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS", "PENDING_TRANSFER_NOT_FOUND",
    "PENDING_TRANSFER_NOT_PENDING", "PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID",
    "PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID", "PENDING_TRANSFER_HAS_DIFFERENT_LEDGER",
    "PENDING_TRANSFER_HAS_DIFFERENT_CODE") if name in TR.__members__}
_SPEC = LedgerModel()  # its idempotency comparison (_exists) is the contract's
MAX_WITNESSES = 40
# An open reservation may outlive its expiry by this much in a snapshot (the writer releases it
# at its next commit or idle wake-up, IDLE_WAKE_SECONDS_MAX = 1 s), not more.
EXPIRY_LAG_NS_MAX = 3 * 10**9


@dataclasses.dataclass
class CheckReport:
    valid: bool = True
    violations: list[str] = dataclasses.field(default_factory=list)
    counts: Counter = dataclasses.field(default_factory=Counter)

    def violation(self, kind: str, message: str) -> None:
        self.valid = False
        self.counts[f"violation:{kind}"] += 1
        if len(self.violations) < MAX_WITNESSES:
            self.violations.append(f"[{kind}] {message}")

    def summary(self) -> str:
        keys = ("requests", "attempts", "retries", "ambiguous_attempts", "acked_ok_ids",
                "exists_replies", "conflict_replies", "unresolved_requests",
                "unresolved_items_committed", "unresolved_items_absent", "committed_transfers",
                "committed_pending", "committed_posts", "committed_voids", "expired_reservations",
                "committed_balancing", "accounts", "lookups_checked")
        figures = ", ".join(f"{k}={self.counts.get(k, 0)}" for k in keys)
        head = f"checker: {'VALID' if self.valid else 'INVALID'}: {figures}"
        kinds = {k: v for k, v in self.counts.items() if k.startswith("violation:")}
        if kinds:
            head += f"\n  violations by kind: {kinds}"
        return "\n".join([head, *("  " + v for v in self.violations)])


@dataclasses.dataclass
class Send:
    """One attempt of one request, for one item."""

    req: int
    attempt: int
    index: int
    fields: dict
    outcome: str  # "result" | "ambiguous" | "rejected"
    result: int = 0
    timestamp: int = 0
    code: str = ""
    invoked: float = 0.0
    answered: float = 0.0


@dataclasses.dataclass
class Request:
    req: int
    op: str
    kind: str
    items: list[dict]
    attempts: dict[int, dict] = dataclasses.field(default_factory=dict)

    def final(self) -> dict | None:
        if not self.attempts:
            return None
        return self.attempts[max(self.attempts)]


def _norm_transfer(fields: dict) -> dict:
    out = dict(fields)
    out["pending_id"] = out.get("pending_id") or ZERO
    out["user_data"] = out.get("user_data") or b""
    return out


def _hex(b: bytes) -> str:
    return b.hex()[:12] if isinstance(b, bytes | bytearray) else str(b)


def _chains(items: list[dict]) -> list[list[int]]:
    """Index lists of linked chains (2+ items), including an open chain at the end."""
    chains, current = [], []
    for i, item in enumerate(items):
        current.append(i)
        if not item.get("flags", 0) & TF.LINKED:
            if len(current) > 1:
                chains.append(current)
            current = []
    if len(current) > 1 or (current and items[current[-1]].get("flags", 0) & TF.LINKED):
        chains.append(current)
    return chains


def _groups(rows: list, flag: int) -> list[list]:
    """Consecutive rows joined by `flag` (a linked chain replays as one request)."""
    groups, current = [], []
    for row in rows:
        current.append(row)
        if not row["flags"] & flag:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


# -- input -----------------------------------------------------------------------------------------

def load_requests(path) -> tuple[dict[int, Request], list[dict]]:
    requests: dict[int, Request] = {}
    nemesis = []
    for ev in read_history(path):
        kind = ev["ev"]
        if kind == "request":
            requests[ev["req"]] = Request(ev["req"], ev["op"], ev["kind"],
                                          [from_json(i) for i in ev["items"]])
        elif kind == "invoke":
            requests[ev["req"]].attempts[ev["attempt"]] = {"invoked": ev["mono"]}
        elif kind in ("ok", "fail"):
            attempts = requests[ev["req"]].attempts
            attempt = attempts.setdefault(ev["attempt"], {"invoked": ev["mono"]})
            attempt.update(ev)
        elif kind == "nemesis":
            nemesis.append(ev)
    return requests, nemesis


async def read_database(database_url: str) -> tuple[list, list, list]:
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        await conn.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                                  format="binary")
        # One snapshot: the engine may still be committing (e.g. expiring reservations).
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            accounts = await conn.fetch('SELECT * FROM accounts ORDER BY "timestamp"')
            transfers = await conn.fetch('SELECT * FROM transfers ORDER BY "timestamp"')
            shards = await conn.fetch("SELECT * FROM shards ORDER BY shard")
    finally:
        await conn.close()
    return ([dict(r) for r in accounts], [dict(r) for r in transfers], [dict(r) for r in shards])


async def lookup_transfers(address: str, ids: list[bytes],
                           timeout: float = 60) -> dict[bytes, pb.Transfer]:
    """LookupTransfers through the engine, retrying UNAVAILABLE until `timeout`."""
    found: dict[bytes, pb.Transfer] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for start in range(0, len(ids), 8_000):
            chunk = ids[start:start + 8_000]
            while True:
                try:
                    response = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=chunk),
                                                          timeout=10)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                            grpc.StatusCode.DEADLINE_EXCEEDED) \
                            or loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            for t in response.transfers:
                found[t.id] = t
    return found


# -- the checks ------------------------------------------------------------------------------------

async def check(history_path: str | pathlib.Path, database_url: str,
                engine_address: str | None = None, *, lookup_timeout: float = 60) -> CheckReport:
    report = CheckReport()
    requests, _ = load_requests(history_path)
    accounts, transfers, shards = await read_database(database_url)
    counts = report.counts
    counts["requests"] = len(requests)
    counts["attempts"] = sum(len(r.attempts) for r in requests.values())
    counts["retries"] = counts["attempts"] - sum(1 for r in requests.values() if r.attempts)
    counts["committed_transfers"] = len(transfers)
    for t in transfers:
        for flag, name in ((TF.PENDING, "committed_pending"),
                           (TF.POST_PENDING_TRANSFER, "committed_posts"),
                           (TF.VOID_PENDING_TRANSFER, "committed_voids"),
                           (TF.BALANCING_DEBIT | TF.BALANCING_CREDIT, "committed_balancing")):
            if t["flags"] & flag:
                counts[name] += 1
        if t.get("pending_status") == EXPIRED:
            counts["expired_reservations"] += 1
    counts["accounts"] = len(accounts)

    stored_t: dict[bytes, dict] = {}
    for row in transfers:
        if row["id"] in stored_t:
            report.violation("duplicate", f"transfer {_hex(row['id'])} is stored more than once")
        stored_t[row["id"]] = row
    stored_a = {row["id"]: row for row in accounts}

    sends_t, sends_a = _collect_sends(requests, report)
    unresolved = [r for r in requests.values()
                  if r.op == "transfers" and _final_kind(r) == "ambiguous"]
    counts["unresolved_requests"] = len(unresolved)

    if engine_address is not None:
        await _check_lookups(report, engine_address, requests, unresolved, stored_t,
                             lookup_timeout)
    for r in unresolved:
        for item in r.items:
            counts["unresolved_items_committed" if item["id"] in stored_t
                   else "unresolved_items_absent"] += 1

    for tid in stored_t.keys() - sends_t.keys():
        report.violation("committed_without_ok", f"transfer {_hex(tid)} is stored but was "
                                                 f"never sent")
    for aid in stored_a.keys() - sends_a.keys():
        report.violation("committed_without_ok", f"account {_hex(aid)} is stored but was "
                                                 f"never sent")
    _check_transfer_sends(report, sends_t, stored_t)
    _check_account_sends(report, sends_a, stored_a)
    _check_chains(report, requests, stored_t)
    _check_storage(report, accounts, transfers, shards)
    _replay(report, accounts, transfers, shards, _requested_amounts(sends_t, transfers))
    return report


def _final_kind(r: Request) -> str:
    final = r.final()
    if final is None or "ev" not in final:
        return "ambiguous"
    if final["ev"] == "ok":
        return "ok"
    return "ambiguous" if final["code"] in AMBIGUOUS_CODES else "rejected"


def _collect_sends(requests: dict[int, Request], report: CheckReport):
    sends_t: dict[bytes, list[Send]] = defaultdict(list)
    sends_a: dict[bytes, list[Send]] = defaultdict(list)
    for r in requests.values():
        target = sends_t if r.op == "transfers" else sends_a
        for attempt_no, attempt in sorted(r.attempts.items()):
            ev = attempt.get("ev")
            results = attempt.get("results")
            if ev == "ok":
                if len(results) != len(r.items):
                    report.violation("response", f"request {r.req}: {len(results)} results for "
                                                 f"{len(r.items)} items")
                    continue
                if r.op == "transfers":
                    _check_chain_response(report, r, results)
            open_chain = set()
            if r.items and r.items[-1].get("flags", 0) & TF.LINKED and r.op == "transfers":
                open_chain = set(_chains(r.items)[-1])
            for index, item in enumerate(r.items):
                fields = _norm_transfer(item) if r.op == "transfers" else item
                send = Send(r.req, attempt_no, index, fields, "ambiguous",
                            invoked=attempt.get("invoked", 0.0), answered=attempt.get("mono", 0.0))
                if ev == "ok":
                    send.outcome, (send.result, send.timestamp) = "result", results[index]
                elif ev == "fail" and attempt["code"] not in AMBIGUOUS_CODES:
                    send.outcome, send.code = "rejected", attempt["code"]
                elif ev == "fail":
                    send.code = attempt["code"]
                    if send.code == "UNKNOWN":
                        report.violation("status", f"request {r.req} attempt {attempt_no}: "
                                                   f"UNKNOWN status ({attempt.get('detail')})")
                else:
                    send.code = "NO_ANSWER"
                if index in open_chain and send.outcome == "ambiguous":
                    # An open chain can never commit, whatever happened to the attempt.
                    send.outcome, send.code = "rejected", f"OPEN_CHAIN/{send.code}"
                target[item["id"]].append(send)
            if ev == "fail" and attempt["code"] in AMBIGUOUS_CODES:
                report.counts["ambiguous_attempts"] += 1
    return sends_t, sends_a


def _check_chain_response(report: CheckReport, r: Request, results) -> None:
    ok = (TR.OK, TR.EXISTS)
    for chain in _chains(r.items):
        got = [results[i][0] for i in chain]
        if r.items[chain[-1]].get("flags", 0) & TF.LINKED:
            expected = [TR.LINKED_EVENT_FAILED] * (len(chain) - 1) + [TR.LINKED_EVENT_CHAIN_OPEN]
            if got != expected:
                report.violation("chain", f"request {r.req}: open chain {chain} answered {got}")
            continue
        if any(g in ok for g in got) and not all(g in ok for g in got):
            report.violation("chain", f"request {r.req}: chain {chain} answered {got}")


def _same(fields: dict, row: dict, compare) -> str | None:
    """The first field (in precedence order) where a sent version differs from the row, or
    None when resending it would be EXISTS. Transfers follow the model's comparison (a
    post/void may leave ids, code, ledger and amount zero; a balancing transfer may be stored
    with less than it asked for)."""
    if compare is TRANSFER_COMPARE:
        result, _ = _SPEC._exists(_model_transfer(fields), _model_transfer(row))
        if result == TR.EXISTS:
            return None
        return TR(result).name.removeprefix("EXISTS_WITH_DIFFERENT_")
    for name, label in compare:
        if fields.get(name) != row.get(name):
            return label
    return None


def _model_transfer(t: dict) -> ModelTransfer:
    return ModelTransfer(
        id=t["id"], debit_account_id=t["debit_account_id"] or ZERO,
        credit_account_id=t["credit_account_id"] or ZERO, amount=t["amount"],
        pending_id=t.get("pending_id") or ZERO, ledger=t["ledger"], code=t["code"],
        flags=t["flags"], timeout_seconds=t["timeout_seconds"], user_data=t.get("user_data") or b"")


def _describe(sends: list[Send]) -> list:
    return [(s.req, s.outcome, s.code or s.result) for s in sends[:6]]


def _check_transfer_sends(report: CheckReport, sends: dict[bytes, list[Send]],
                          stored: dict[bytes, dict]) -> None:
    counts = report.counts
    for tid, items in sends.items():
        row = stored.get(tid)
        oks = [s for s in items if s.outcome == "result" and s.result == TR.OK]
        if oks:
            counts["acked_ok_ids"] += 1
        if len(oks) > 1:
            report.violation("applied_twice", f"transfer {_hex(tid)} acknowledged OK {len(oks)} "
                                              f"times (requests {[s.req for s in oks]})")
        could_commit = [s for s in items if s.outcome == "ambiguous"
                        or (s.outcome == "result" and s.result == TR.OK)]
        if row is not None:
            if not any(_same(s.fields, row, TRANSFER_COMPARE) is None for s in could_commit):
                report.violation("committed_without_ok", f"transfer {_hex(tid)} is stored but no "
                                 f"attempt that could have committed it sent that version "
                                 f"(sends: {_describe(items)})")
        ack_time = None
        for s in items:
            if s.outcome != "result":
                continue
            if s.result in (TR.OK, TR.EXISTS):
                if s.timestamp <= 0:
                    report.violation("response", f"transfer {_hex(tid)} request {s.req}: "
                                                 f"{TR(s.result).name} without a timestamp")
                if row is None:
                    report.violation("lost", f"transfer {_hex(tid)} acknowledged "
                                     f"{TR(s.result).name} (request {s.req}) but not stored")
                    continue
                diff = _same(s.fields, row, TRANSFER_COMPARE)
                if diff is not None:
                    report.violation("different", f"transfer {_hex(tid)} acknowledged "
                                     f"{TR(s.result).name} (request {s.req}) but stored with a "
                                     f"different {diff}")
                if row["timestamp"] != s.timestamp:
                    report.violation("timestamp", f"transfer {_hex(tid)} acknowledged at "
                                     f"{s.timestamp} (request {s.req}), stored at "
                                     f"{row['timestamp']}")
                if s.result == TR.EXISTS:
                    counts["exists_replies"] += 1
                ack_time = s.answered if ack_time is None else min(ack_time, s.answered)
            elif TR(s.result).name.startswith("EXISTS_WITH_DIFFERENT_"):
                counts["conflict_replies"] += 1
                label = TR(s.result).name.removeprefix("EXISTS_WITH_DIFFERENT_")
                if row is None:
                    report.violation("conflict", f"transfer {_hex(tid)} answered "
                                     f"{TR(s.result).name} (request {s.req}) but nothing is stored")
                elif _same(s.fields, row, TRANSFER_COMPARE) != label:
                    report.violation("conflict", f"transfer {_hex(tid)} answered "
                                     f"{TR(s.result).name} (request {s.req}) but the stored "
                                     f"version differs first in "
                                     f"{_same(s.fields, row, TRANSFER_COMPARE)}")
            elif s.timestamp:
                counts["failures_with_timestamp"] += 1
        # Once a commit of this id was acknowledged, every later resend answers from storage.
        if ack_time is not None and row is not None:
            for s in items:
                if s.outcome != "result" or s.invoked <= ack_time:
                    continue
                diff = _same(s.fields, row, TRANSFER_COMPARE)
                expected = TR.EXISTS if diff is None else TR[f"EXISTS_WITH_DIFFERENT_{diff}"]
                if s.result != expected and s.result not in BEFORE_IDEMPOTENCY:
                    report.violation("idempotency", f"transfer {_hex(tid)}: resent after its "
                                     f"commit was acknowledged (request {s.req}), answered "
                                     f"{TR(s.result).name}, expected {expected.name}")


def _check_account_sends(report: CheckReport, sends: dict[bytes, list[Send]],
                         stored: dict[bytes, dict]) -> None:
    for aid, items in sends.items():
        row = stored.get(aid)
        could_commit = [s for s in items if s.outcome == "ambiguous"
                        or (s.outcome == "result" and s.result == AR.OK)]
        if row is not None and not any(_same(s.fields, row, ACCOUNT_COMPARE) is None
                                       for s in could_commit):
            report.violation("committed_without_ok", f"account {_hex(aid)} is stored but no "
                                                     f"attempt that could have created it sent it")
        for s in items:
            if s.outcome != "result" or s.result not in (AR.OK, AR.EXISTS):
                continue
            if row is None:
                report.violation("lost", f"account {_hex(aid)} acknowledged "
                                         f"{AR(s.result).name} (request {s.req}) but not stored")
            elif row["timestamp"] != s.timestamp or _same(s.fields, row, ACCOUNT_COMPARE):
                report.violation("different", f"account {_hex(aid)} acknowledged (request "
                                              f"{s.req}) differs from the stored one")


def _check_chains(report: CheckReport, requests: dict[int, Request], stored: dict) -> None:
    for r in requests.values():
        if r.op != "transfers":
            continue
        for chain in _chains(r.items):
            present = [r.items[i]["id"] in stored for i in chain]
            if r.items[chain[-1]].get("flags", 0) & TF.LINKED:
                continue  # an open chain: its items are checked one by one (never committed)
            if any(present) and not all(present):
                report.violation("chain", f"request {r.req}: linked chain {chain} is partly "
                                          f"stored: {present}")


async def _check_lookups(report: CheckReport, address: str, requests: dict[int, Request],
                         unresolved: list[Request], stored: dict[bytes, dict],
                         timeout: float) -> None:
    """Every id ever sent, looked up through the engine: the engine's answer must be the
    database row (this is how an unresolved request is resolved)."""
    ids = list({item["id"] for r in requests.values() if r.op == "transfers" for item in r.items
                if len(item["id"]) == 16})
    found = await lookup_transfers(address, ids, timeout)
    report.counts["lookups_checked"] = len(ids)
    for tid in ids:
        row, got = stored.get(tid), found.get(tid)
        if (row is None) != (got is None):
            report.violation("lookup", f"transfer {_hex(tid)}: LookupTransfers "
                             f"{'found' if got else 'missed'} it, the database "
                             f"{'has' if row else 'has not'}")
        elif row is not None:
            for name in ("debit_account_id", "credit_account_id", "amount", "ledger", "code",
                         "flags", "timeout_seconds", "user_data", "timestamp"):
                if getattr(got, name) != row[name]:
                    report.violation("lookup", f"transfer {_hex(tid)}: LookupTransfers "
                                               f"{name}={getattr(got, name)!r}, "
                                               f"stored {row[name]!r}")
                    break


def _check_storage(report: CheckReport, accounts: list, transfers: list, shards: list) -> None:
    shard_count = len(shards)
    if not shard_count:
        report.violation("storage", "no shards")
        return
    if transfers:
        ids = [t["id"] for t in transfers]
        own = shards_of(ids, shard_count).tolist()
        debit = shards_of([t["debit_account_id"] for t in transfers], shard_count).tolist()
        for t, s_id, s_debit in zip(transfers, own, debit):
            if t["shard"] != s_id:
                report.violation("storage", f"transfer {_hex(t['id'])} in partition {t['shard']}, "
                                            f"its id hashes to {s_id}")
            if t["seq_shard"] != s_debit:
                report.violation("seq", f"transfer {_hex(t['id'])} ordered in shard "
                                        f"{t['seq_shard']}, its debit account is in {s_debit}")
    if accounts:
        own = shards_of([a["id"] for a in accounts], shard_count).tolist()
        for a, s in zip(accounts, own):
            if a["shard"] != s:
                report.violation("storage", f"account {_hex(a['id'])} in partition {a['shard']}, "
                                            f"its id hashes to {s}")
    by_shard: dict[int, list] = defaultdict(list)
    for t in transfers:
        by_shard[t["seq_shard"]].append(t)
    for s in shards:
        rows = sorted(by_shard.pop(s["shard"], []), key=lambda t: t["seq"])
        seqs = [t["seq"] for t in rows]
        if seqs != list(range(1, s["last_seq"] + 1)):
            missing = sorted(set(range(1, s["last_seq"] + 1)) - set(seqs))[:5]
            extra = sorted(set(seqs) - set(range(1, s["last_seq"] + 1)))[:5]
            dups = [q for q, c in Counter(seqs).items() if c > 1][:5]
            report.violation("seq", f"shard {s['shard']}: seq is not 1..{s['last_seq']} "
                                    f"(missing {missing}, beyond {extra}, repeated {dups})")
        stamps = [t["timestamp"] for t in rows]
        if any(a >= b for a, b in zip(stamps, stamps[1:])):
            report.violation("order", f"shard {s['shard']}: seq order and timestamp order disagree")
    if by_shard:
        report.violation("seq", f"transfers ordered in unknown shards {sorted(by_shard)}")
    stamps = [t["timestamp"] for t in transfers] + [a["timestamp"] for a in accounts]
    if len(stamps) != len(set(stamps)):
        dup = [ts for ts, c in Counter(stamps).items() if c > 1][:5]
        report.violation("timestamp", f"timestamps are not unique: {dup}")
    if stamps and shards and max(stamps) > max(s["last_timestamp"] for s in shards):
        report.violation("timestamp", "a stored timestamp is ahead of shards.last_timestamp "
                                      "(a restart could hand it out again)")
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for a in accounts:
        s = sums[a["ledger"]]
        for k, name in enumerate(("debits_pending", "debits_posted", "credits_pending",
                                  "credits_posted")):
            s[k] += a[name]
        if a["flags"] & AF.DEBITS_MUST_NOT_EXCEED_CREDITS and \
                a["debits_pending"] + a["debits_posted"] > a["credits_posted"]:
            report.violation("limit", f"account {_hex(a['id'])} debits exceed credits")
        if a["flags"] & AF.CREDITS_MUST_NOT_EXCEED_DEBITS and \
                a["credits_pending"] + a["credits_posted"] > a["debits_posted"]:
            report.violation("limit", f"account {_hex(a['id'])} credits exceed debits")
    for ledger, (dp, dpo, cp, cpo) in sums.items():
        if dp != cp or dpo != cpo:
            report.violation("conservation", f"ledger {ledger}: debits pending/posted {dp}/{dpo}, "
                                             f"credits pending/posted {cp}/{cpo}")


def _release(model: LedgerModel, tid: bytes, now: int) -> None:
    """Expire one open reservation in the model (LedgerModel.expire, for a single transfer)."""
    t = model.transfers.get(tid)
    if t is None or t.status != PENDING:
        return
    dr, cr = model.accounts[t.debit_account_id], model.accounts[t.credit_account_id]
    dr.debits_pending -= t.amount
    cr.credits_pending -= t.amount
    t.status = EXPIRED
    model._record_history(dr, cr, now)


def _requested_amounts(sends: dict[bytes, list[Send]], transfers: list) -> dict[bytes, int]:
    """For balancing transfers: the amount asked for by the send that committed each one."""
    out = {}
    for t in transfers:
        if not t["flags"] & (TF.BALANCING_DEBIT | TF.BALANCING_CREDIT):
            continue
        candidates = [s for s in sends.get(t["id"], ())
                      if (s.outcome == "ambiguous" or (s.outcome == "result" and s.result == TR.OK))
                      and _same(s.fields, t, TRANSFER_COMPARE) is None]
        candidates.sort(key=lambda s: s.outcome != "result")  # an acknowledged OK first
        if candidates:
            out[t["id"]] = candidates[0].fields["amount"]
    return out


def _replay(report: CheckReport, accounts: list, transfers: list, shards: list,
            requested: dict[bytes, int]) -> None:
    model = LedgerModel()
    for group in _groups(accounts, AF.LINKED):
        items = [ModelAccount(id=a["id"], ledger=a["ledger"], code=a["code"], flags=a["flags"],
                              user_data=a["user_data"]) for a in group]
        results = model.create_accounts(items, [a["timestamp"] for a in group])
        for a, (result, _) in zip(group, results):
            if result != AR.OK:
                report.violation("replay", f"account {_hex(a['id'])}: replay says "
                                           f"{AR(result).name}")
    limits = AF.DEBITS_MUST_NOT_EXCEED_CREDITS | AF.CREDITS_MUST_NOT_EXCEED_DEBITS
    # Reservations that lapse: the engine's writer releases an open reservation after every
    # item stamped before its expiry and before every item stamped at or after it (its commit
    # clock moves forward to the expiry when one falls among the commit's timestamps), and a
    # post/void at or after the expiry is PENDING_TRANSFER_EXPIRED either way. So the replay
    # releases a reservation the snapshot shows expired right at its expiry, and balancing
    # amounts, which depend on what is still held, must come out the same.
    expired_ids = {t["id"] for t in transfers if t.get("pending_status") == EXPIRED}
    expiries: list[tuple[int, bytes]] = []  # open reservations that can lapse, by expiry
    for group in _groups(transfers, TF.LINKED):
        first = group[0]["timestamp"]
        while expiries and expiries[0][0] <= first:
            _, tid = heapq.heappop(expiries)
            if tid in expired_ids:
                _release(model, tid, first)
        items = [_model_transfer(t) for t in group]
        for t, item in zip(group, items):
            if t["flags"] & (TF.BALANCING_DEBIT | TF.BALANCING_CREDIT):
                # Stored is what the engine took; replay what was asked for.
                item.amount = requested.get(t["id"], t["amount"])
        results = model.create_transfers(items, [t["timestamp"] for t in group])
        for t, (result, ts) in zip(group, results):
            if result != TR.OK or ts != t["timestamp"]:
                report.violation("replay", f"transfer {_hex(t['id'])} (ts {t['timestamp']}): "
                                           f"replay in timestamp order says {TR(result).name}")
                continue
            replayed = model.transfers[t["id"]]
            if (replayed.amount, replayed.debit_account_id, replayed.credit_account_id) != \
                    (t["amount"], t["debit_account_id"], t["credit_account_id"]):
                report.violation("replay", f"transfer {_hex(t['id'])}: stored amount/accounts "
                                           f"({t['amount']}) differ from the replay's "
                                           f"({replayed.amount})")
            if replayed.expires_at:
                heapq.heappush(expiries, (replayed.expires_at, t["id"]))
        for t in group:
            for aid in (t["debit_account_id"], t["credit_account_id"]):
                a = model.accounts.get(aid)
                if a is None or not a.flags & limits:
                    continue
                if (a.flags & AF.DEBITS_MUST_NOT_EXCEED_CREDITS
                        and a.debits_pending + a.debits_posted > a.credits_posted) or \
                        (a.flags & AF.CREDITS_MUST_NOT_EXCEED_DEBITS
                         and a.credits_pending + a.credits_posted > a.debits_posted):
                    report.violation("limit", f"account {_hex(aid)} over its limit after "
                                              f"transfer {_hex(t['id'])}")
    # The end: every reservation due by the shards' clock has lapsed (the engine expires them in
    # its writer, also when idle), so the final balances include those releases.
    end = max([s["last_timestamp"] for s in shards] + [0])
    while expiries and expiries[0][0] <= end:
        _, tid = heapq.heappop(expiries)
        if tid in expired_ids:
            _release(model, tid, end)
    for t in transfers:
        if "pending_status" in t and t["flags"] & TF.PENDING:
            m = model.transfers.get(t["id"])
            if m is None:
                continue
            if t["pending_status"] == EXPIRED and m.expires_at and m.expires_at > end:
                report.violation("pending", f"pending transfer {_hex(t['id'])} expired before "
                                            f"its expiry {m.expires_at} (clock {end})")
            elif t["pending_status"] == PENDING and m.status == PENDING and m.expires_at and \
                    m.expires_at < end - EXPIRY_LAG_NS_MAX:
                report.violation("pending", f"pending transfer {_hex(t['id'])} still holds its "
                                 f"reservation {(end - m.expires_at) / 1e9:.1f} s after its expiry")
            elif (m.status, m.expires_at) != (t["pending_status"], t["expires_at"]):
                report.violation("pending", f"pending transfer {_hex(t['id'])}: stored state "
                                 f"{t['pending_status']} expiring at {t['expires_at']}, replay "
                                 f"{m.status} at {m.expires_at}")
            elif m.status == PENDING and m.expires_at and m.expires_at <= end:
                report.counts["reservations_overdue_in_snapshot"] += 1
    for a in accounts:
        m = model.accounts.get(a["id"])
        stored = (a["debits_pending"], a["debits_posted"], a["credits_pending"],
                  a["credits_posted"])
        if m is None:
            continue
        if m.balances() != stored:
            report.violation("balance", f"account {_hex(a['id'])}: stored {stored}, "
                                        f"replay {m.balances()}")
