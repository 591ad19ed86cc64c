-- Security: the audit trail, correlation ids of committed requests, and the runtime role.

-- Append-only, hash-chained audit records (engine.security.audit). seq is gap-free; hash is
-- SHA-256 over prev_hash and the record, so any change is found by `txengine audit verify`.
CREATE TABLE audit_log (
    seq bigint PRIMARY KEY,
    at timestamptz NOT NULL,
    principal text NOT NULL,
    rpc text NOT NULL,
    correlation_id text NOT NULL,
    request_digest bytea NOT NULL,
    outcome text NOT NULL,
    detail text NOT NULL DEFAULT '',
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL
);
CREATE INDEX audit_log_correlation_id ON audit_log (correlation_id);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- The correlation id of every committed request that stored transfers: one row per request,
-- covering the commit timestamps [timestamp_min, timestamp_max] of its transfers (a request's
-- transfers get consecutive timestamps, and no two requests share one). Written in the same
-- transaction as the transfers; the view below joins it to each transfer.
CREATE TABLE request_log (
    timestamp_min bigint PRIMARY KEY,
    timestamp_max bigint NOT NULL,
    correlation_id text NOT NULL
);

CREATE VIEW transfer_correlation AS
SELECT t.id AS transfer_id, t."timestamp", r.correlation_id
FROM transfers t
JOIN LATERAL (SELECT * FROM request_log r WHERE r.timestamp_min <= t."timestamp"
              ORDER BY r.timestamp_min DESC LIMIT 1) r ON t."timestamp" <= r.timestamp_max;

-- Least privilege: the engine serves as a member of txengine_runtime, which may read, insert
-- and update ledger rows but only read and insert audit records and cannot change the schema;
-- migrations run as the role that owns the tables. Creating the role needs CREATEROLE; without
-- it a DBA creates the role, and `txengine migrate` grants it its privileges once it exists.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'txengine_runtime') THEN
        BEGIN
            CREATE ROLE txengine_runtime NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation OR insufficient_privilege THEN
            RAISE NOTICE 'role txengine_runtime not created here (%)', SQLERRM;
        END;
    END IF;
END $$;

DO $$
DECLARE
    schema_name text := quote_ident(current_schema());
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'txengine_runtime') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %s TO txengine_runtime', schema_name);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %s TO txengine_runtime', schema_name);
        GRANT INSERT, UPDATE ON accounts, transfers, shards TO txengine_runtime;
        GRANT INSERT ON account_balances, audit_log, request_log TO txengine_runtime;
        -- Tables of later migrations (and the per-shard partitions): the runtime role reads,
        -- inserts and updates them; a migration whose table needs DELETE grants it, and one
        -- that adds an append-only table revokes UPDATE, as this one does below.
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT SELECT, INSERT, UPDATE '
                       'ON TABLES TO txengine_runtime', schema_name);
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT USAGE, SELECT ON SEQUENCES '
                       'TO txengine_runtime', schema_name);
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM txengine_runtime;
    END IF;
END $$;
