"""Every limit of the engine, declared once, with its unit in the name.

Relations between limits are asserted by `check_limits`, which runs at start-up.
"""

# One request holds at most this many accounts, transfers or ids (the v1 contract).
BATCH_ITEMS_MAX = 8_190

# Bytes of caller data per account or transfer.
USER_DATA_BYTES_MAX = 16

# Bytes of an id on the wire; an empty field means zero.
ID_BYTES = 16

# Every balance and amount the engine stores stays within 0..BALANCE_MAX, so that any of them
# fits a signed 64-bit Postgres column and SQL sums over them are exact.
BALANCE_MAX = 2**63 - 1

# Largest encoding of one Transfer message: three ids and a pending id (18 bytes each with tag
# and length), user_data (18), amount and timestamp (11 each), four 32-bit fields (6 each),
# plus the repeated-field tag and length (4).
TRANSFER_WIRE_BYTES_MAX = 4 * 18 + 18 + 2 * 11 + 4 * 6 + 4

# gRPC message size limit, both directions.
GRPC_MESSAGE_BYTES_MAX = 4 * 1024 * 1024

# Items the commit loop takes into one Postgres transaction.
COMMIT_ITEMS_MAX = 32_768

# Items waiting per shard before new requests touching that shard are refused.
SHARD_QUEUE_ITEMS_MAX = 65_536

# Shards of one database; fixed when the database is first migrated.
SHARDS_MAX = 1_024

# Accounts kept in memory by one engine process.
ACCOUNT_CACHE_MAX = 20_000_000

# Concurrent RPCs one server process accepts before answering RESOURCE_EXHAUSTED.
RPC_CONCURRENCY_MAX = 4_096

# Seconds a SIGTERM waits for in-flight requests before the server stops.
SHUTDOWN_GRACE_SECONDS = 10.0


def check_limits() -> None:
    """Assert the relations the rest of the engine relies on."""
    assert BATCH_ITEMS_MAX * TRANSFER_WIRE_BYTES_MAX < GRPC_MESSAGE_BYTES_MAX
    assert COMMIT_ITEMS_MAX >= BATCH_ITEMS_MAX, "one request must fit one commit"
    assert SHARD_QUEUE_ITEMS_MAX >= BATCH_ITEMS_MAX, "one request must fit a shard queue"
    assert 1 <= SHARDS_MAX <= 1_024
    # Two in-range balances and an in-range amount never wrap an unsigned 64-bit sum.
    assert 2 * BALANCE_MAX < 2**64
