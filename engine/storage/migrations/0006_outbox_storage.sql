-- Every commit inserts one outbox row whose transfer_balances holds 64 bytes per transfer:
-- about 520 kB for a batch of 8,190. Postgres' default storage compresses such a value with
-- pglz before it moves it out of line, on the commit's critical path, and balances compress
-- well enough that pglz works through all of it: tens of milliseconds of the writer backend per
-- batch. Stored out of line uncompressed instead, the insert costs a few milliseconds; the rows
-- are transient (trimmed after events_retention_seconds), so the extra bytes are few.
ALTER TABLE event_outbox ALTER COLUMN transfer_balances SET STORAGE EXTERNAL;
ALTER TABLE event_outbox ALTER COLUMN other_events SET STORAGE EXTERNAL;
