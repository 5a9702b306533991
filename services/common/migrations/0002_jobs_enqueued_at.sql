-- When a job's queue entry was written: a queued job without one is put on the queue by the
-- generators' sweep (the process that created it died between the row and the entry).
ALTER TABLE jobs ADD COLUMN enqueued_at timestamptz;
UPDATE jobs SET enqueued_at = created_at WHERE status = 'queued';
CREATE INDEX jobs_unqueued ON jobs (created_at) WHERE status = 'queued' AND enqueued_at IS NULL;
