-- A job that ended while Redis was away has no final event in its stream: the flag stays false
-- and the reconciler announces it again. Rows that ended before this migration count as
-- announced.
ALTER TABLE jobs ADD COLUMN final_announced boolean NOT NULL DEFAULT true;
ALTER TABLE jobs ALTER COLUMN final_announced SET DEFAULT false;
CREATE INDEX jobs_final_unannounced ON jobs (updated_at)
    WHERE NOT final_announced AND status IN ('completed', 'failed', 'cancelled');
