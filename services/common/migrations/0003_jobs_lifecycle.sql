-- The jobs core: attempt leases (Postgres decides who runs a job, Redis only hints), a failed
-- job's retryable flag, the snapshot every status read returns, and idempotency keys that
-- remember the request they were first used with and expire.
ALTER TABLE jobs ADD COLUMN lease_expires_at timestamptz;
ALTER TABLE jobs ADD COLUMN retryable boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN snapshot bytea;

CREATE TABLE idempotency_keys (
    key            text PRIMARY KEY,
    request_sha256 text NOT NULL,
    job_id         uuid NOT NULL,
    expires_at     timestamptz NOT NULL
);
INSERT INTO idempotency_keys (key, request_sha256, job_id, expires_at)
    SELECT idempotency_key, '', id, created_at + interval '1 day'
    FROM jobs WHERE idempotency_key IS NOT NULL;
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
ALTER TABLE jobs DROP COLUMN idempotency_key;

DROP INDEX IF EXISTS jobs_unqueued;
ALTER TABLE jobs DROP COLUMN enqueued_at;
CREATE INDEX jobs_queued ON jobs (updated_at) WHERE status = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
