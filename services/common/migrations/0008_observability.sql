-- What the admin dashboard charts, kept with each job so history survives restarts and covers
-- every gateway: when it started and ended, why it failed, what the cache answered, the
-- estimate it was admitted with (cost_cents is what was charged), seconds per stage, and the
-- trace its admission belongs to (W3C traceparent; the generator continues it).
ALTER TABLE jobs
    ADD COLUMN started_at timestamptz,
    ADD COLUMN ended_at timestamptz,
    ADD COLUMN failure_reason text NOT NULL DEFAULT '',
    ADD COLUMN cache_result text NOT NULL DEFAULT ''
        CHECK (cache_result IN ('', 'hit_seed', 'hit_seedless', 'miss', 'off')),
    ADD COLUMN estimated_cents bigint NOT NULL DEFAULT 0,
    ADD COLUMN stage_seconds jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN stage_started_at timestamptz,
    ADD COLUMN trace_parent text NOT NULL DEFAULT '';

-- Jobs from before: their end is their last change, their estimate what they cost.
UPDATE jobs SET ended_at = updated_at WHERE status IN ('completed', 'failed', 'cancelled');
UPDATE jobs SET estimated_cents = cost_cents;
UPDATE jobs SET cache_result = CASE WHEN cache_hit THEN 'hit_seed' ELSE 'miss' END;

-- Ranges of created_at use 0001's jobs_created_at (created_at DESC, id DESC).
CREATE INDEX jobs_ended_at ON jobs (ended_at) WHERE ended_at IS NOT NULL;
