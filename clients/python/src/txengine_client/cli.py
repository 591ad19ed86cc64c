"""txctl: look at and change a txengine ledger from a shell.

    txctl --address 127.0.0.1:50051 accounts create --ledger 1 --code 1 --flags history
    txctl accounts get 0190a1b2-...  [more ids]
    txctl transfers create --debit ID --credit ID --amount 100 --ledger 1 --code 1
    txctl transfers get ID...
    txctl account-transfers ID [--limit N] [--reversed] [--debits-only | --credits-only]
    txctl balances ID [same filter options]

Tables for people, `--json` for scripts (ids as UUID strings, flags and results as names,
user_data as hex, timestamps as integer nanoseconds). Ids are UUIDs or integers (decimal or
0x-hex). Exit status: 0 done; 1 a create was refused (a result other than OK or EXISTS) or an
id was not found; 2 bad usage; 3 the request failed (the gRPC status is printed).
Tailing committed events needs a server feature that is not there yet.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import os
import sys
import uuid
from collections.abc import Sequence

from txengine_client import __version__
from txengine_client.client import Client
from txengine_client.errors import TxengineError
from txengine_client.ids import as_id
from txengine_client.options import ClientOptions
from txengine_client.types import (
    Account,
    AccountBalance,
    AccountFilter,
    AccountFlags,
    CreateResult,
    Transfer,
    TransferFlags,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_RPC_FAILED = 3


def parse_id(text: str) -> uuid.UUID:
    try:
        if text[:1].isdigit() and "-" not in text:
            return as_id(int(text, 0))
        return as_id(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"not an id (UUID or integer): {text!r}") from error


def flags_parser(flag_type: type[enum.IntFlag]):
    def parse(text: str) -> enum.IntFlag:
        if text.isdigit():
            return flag_type(int(text))
        value = flag_type(0)
        for name in filter(None, (part.strip() for part in text.split(","))):
            try:
                value |= flag_type[name.upper().replace("-", "_")]
            except KeyError:
                known = ", ".join(str(m.name).lower() for m in flag_type if m.value)
                raise argparse.ArgumentTypeError(f"unknown flag {name!r}; known: {known}")
        return value

    return parse


def parse_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from error


# -- output -------------------------------------------------------------------------------------

def flag_names(flags: enum.IntFlag) -> list[str]:
    return [str(m.name) for m in type(flags) if m.value and m in flags]


def plain(value) -> object:
    """A JSON-ready copy of an SDK value."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.IntFlag):
        return flag_names(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def when(timestamp_ns: int) -> str:
    if not timestamp_ns:
        return "-"
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def cell(value) -> str:
    if isinstance(value, enum.IntFlag):
        return "|".join(flag_names(value)) or "-"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return value.hex() or "-"
    if value is None:
        return "-"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def accounts_table(accounts: Sequence[Account]) -> str:
    return table(
        ["ID", "LEDGER", "CODE", "FLAGS", "DEBITS_PENDING", "DEBITS_POSTED", "CREDITS_PENDING",
         "CREDITS_POSTED", "USER_DATA", "CREATED"],
        [[a.id, a.ledger, a.code, a.flags, a.debits_pending, a.debits_posted, a.credits_pending,
          a.credits_posted, a.user_data, when(a.timestamp)] for a in accounts])


def transfers_table(transfers: Sequence[Transfer]) -> str:
    return table(
        ["ID", "DEBIT", "CREDIT", "AMOUNT", "LEDGER", "CODE", "FLAGS", "PENDING_ID",
         "USER_DATA", "COMMITTED"],
        [[t.id, t.debit_account_id, t.credit_account_id, t.amount, t.ledger, t.code, t.flags,
          t.pending_id, t.user_data, when(t.timestamp)] for t in transfers])


def balances_table(balances: Sequence[AccountBalance]) -> str:
    return table(
        ["AT", "DEBITS_PENDING", "DEBITS_POSTED", "CREDITS_PENDING", "CREDITS_POSTED"],
        [[when(b.timestamp), b.debits_pending, b.debits_posted, b.credits_pending,
          b.credits_posted] for b in balances])


def results_table(ids: Sequence[uuid.UUID], results: Sequence[CreateResult]) -> str:
    return table(["ID", "RESULT", "COMMITTED"],
                 [[i, r.result, when(r.timestamp)] for i, r in zip(ids, results)])


# -- commands -----------------------------------------------------------------------------------

def create_accounts(client: Client, args) -> int:
    fields = {"ledger": args.ledger, "code": args.code, "flags": args.flags,
              "user_data": args.user_data}
    account = Account(id=args.id, **fields) if args.id else Account(**fields)
    results = client.create_accounts([account])
    return show_results(args, [account.id], results)


def create_transfers(client: Client, args) -> int:
    fields = {"debit_account_id": args.debit, "credit_account_id": args.credit,
              "amount": args.amount, "ledger": args.ledger, "code": args.code,
              "flags": args.flags, "pending_id": args.pending_id,
              "timeout_seconds": args.timeout_seconds, "user_data": args.user_data}
    transfer = Transfer(id=args.id, **fields) if args.id else Transfer(**fields)
    results = client.create_transfers([transfer])
    return show_results(args, [transfer.id], results)


def show_results(args, ids: Sequence[uuid.UUID], results: Sequence[CreateResult]) -> int:
    if args.json:
        rows = [{"id": str(i), "result": r.result.name, "timestamp": r.timestamp}
                for i, r in zip(ids, results)]
        print(json.dumps(rows, indent=2))
    else:
        print(results_table(ids, results))
    return 0 if all(r.is_ok_or_exists for r in results) else EXIT_REFUSED


def get_accounts(client: Client, args) -> int:
    found = client.lookup_accounts(args.ids)
    return show_found(args, found, accounts_table)


def get_transfers(client: Client, args) -> int:
    found = client.lookup_transfers(args.ids)
    return show_found(args, found, transfers_table)


def show_found(args, found, render) -> int:
    print(json.dumps([plain(x) for x in found], indent=2) if args.json else render(found))
    missing = [i for i in dict.fromkeys(args.ids) if i not in {x.id for x in found}]
    for missing_id in missing:
        print(f"not found: {missing_id}", file=sys.stderr)
    return EXIT_REFUSED if missing else 0


def account_filter(args) -> AccountFilter:
    return AccountFilter(account_id=args.account, timestamp_min=args.timestamp_min,
                         timestamp_max=args.timestamp_max, limit=args.limit,
                         debits=not args.credits_only, credits=not args.debits_only,
                         reversed=args.reversed, code=args.code)


def account_transfers(client: Client, args) -> int:
    transfers = client.get_account_transfers(account_filter(args))
    print(json.dumps([plain(t) for t in transfers], indent=2) if args.json
          else transfers_table(transfers))
    return 0


def balances(client: Client, args) -> int:
    history = client.get_account_balances(account_filter(args))
    print(json.dumps([plain(b) for b in history], indent=2) if args.json
          else balances_table(history))
    return 0


# -- arguments ----------------------------------------------------------------------------------

def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("account", type=parse_id, help="account id")
    parser.add_argument("--limit", type=int, default=100, help="most rows (1..8190)")
    parser.add_argument("--reversed", action="store_true", help="newest first")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--debits-only", action="store_true")
    side.add_argument("--credits-only", action="store_true")
    parser.add_argument("--code", type=int, default=0, help="only this transfer code")
    parser.add_argument("--from", dest="timestamp_min", type=int, default=0,
                        help="inclusive lower bound, nanoseconds")
    parser.add_argument("--to", dest="timestamp_max", type=int, default=0,
                        help="inclusive upper bound, nanoseconds")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="txctl", description=__doc__.split("\n\n")[0])
    root.add_argument("--version", action="version", version=f"txctl {__version__}")
    root.add_argument("--address", default=os.environ.get("TXENGINE_ADDRESS", DEFAULT_ADDRESS),
                      help="HOST:PORT of the engine (env TXENGINE_ADDRESS)")
    root.add_argument("--json", action="store_true", help="print JSON instead of tables")
    root.add_argument("--deadline", type=float, default=10.0, help="seconds per attempt")
    root.add_argument("--tls", action="store_true", help="TLS with the system roots")
    root.add_argument("--root-cert", help="PEM file of the CA that signed the server")
    root.add_argument("--client-cert", help="PEM file of the client certificate (mutual TLS)")
    root.add_argument("--client-key", help="PEM file of the client key (mutual TLS)")
    root.add_argument("--server-name", help="name to check the server certificate for")
    root.add_argument("--token", default=os.environ.get("TXENGINE_TOKEN"),
                      help="bearer token (env TXENGINE_TOKEN)")
    commands = root.add_subparsers(dest="command", required=True)

    accounts = commands.add_parser("accounts", help="create and look up accounts")
    accounts_do = accounts.add_subparsers(dest="action", required=True)
    create = accounts_do.add_parser("create", help="create one account")
    create.add_argument("--id", type=parse_id, help="default: a new time-ordered id")
    create.add_argument("--ledger", type=int, required=True)
    create.add_argument("--code", type=int, required=True)
    create.add_argument("--flags", type=flags_parser(AccountFlags), default=AccountFlags.NONE,
                        help="comma-separated: " + ", ".join(
                            str(m.name).lower() for m in AccountFlags if m.value))
    create.add_argument("--user-data", type=parse_hex, default=b"", help="hex, at most 16 bytes")
    create.set_defaults(run=create_accounts)
    get = accounts_do.add_parser("get", help="look up accounts")
    get.add_argument("ids", nargs="+", type=parse_id)
    get.set_defaults(run=get_accounts)

    transfers = commands.add_parser("transfers", help="create and look up transfers")
    transfers_do = transfers.add_subparsers(dest="action", required=True)
    create = transfers_do.add_parser("create", help="create one transfer")
    create.add_argument("--id", type=parse_id, help="default: a new time-ordered id")
    create.add_argument("--debit", type=parse_id, required=True, help="debit account id")
    create.add_argument("--credit", type=parse_id, required=True, help="credit account id")
    create.add_argument("--amount", type=int, required=True, help="minor units")
    create.add_argument("--ledger", type=int, required=True)
    create.add_argument("--code", type=int, required=True)
    create.add_argument("--flags", type=flags_parser(TransferFlags), default=TransferFlags.NONE,
                        help="comma-separated: " + ", ".join(
                            str(m.name).lower() for m in TransferFlags if m.value))
    create.add_argument("--pending-id", type=parse_id)
    create.add_argument("--timeout-seconds", type=int, default=0)
    create.add_argument("--user-data", type=parse_hex, default=b"", help="hex, at most 16 bytes")
    create.set_defaults(run=create_transfers)
    get = transfers_do.add_parser("get", help="look up transfers")
    get.add_argument("ids", nargs="+", type=parse_id)
    get.set_defaults(run=get_transfers)

    history = commands.add_parser("account-transfers", help="an account's transfers")
    add_filter_options(history)
    history.set_defaults(run=account_transfers)
    history = commands.add_parser("balances", help="historical balances of a HISTORY account")
    add_filter_options(history)
    history.set_defaults(run=balances)
    return root


def client_options(args) -> ClientOptions:
    return ClientOptions(deadline_s=args.deadline, tls=args.tls, root_certificates=args.root_cert,
                         certificate_chain=args.client_cert, private_key=args.client_key,
                         server_name_override=args.server_name, token=args.token)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        options = client_options(args)
    except ValueError as error:
        print(f"txctl: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.address, options=options) as client:
            return args.run(client, args)
    except TxengineError as error:
        print(f"txctl: {error}", file=sys.stderr)
        for violation in error.violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return EXIT_RPC_FAILED


if __name__ == "__main__":
    sys.exit(main())
