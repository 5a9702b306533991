-- How a job uses the prompt cache: 'use' (read, then store what it renders), 'refresh' (store
-- without reading, replacing the entry) or 'off' (neither). Jobs from before it stored results.
ALTER TABLE jobs ADD COLUMN cache_mode text NOT NULL DEFAULT 'use'
    CHECK (cache_mode IN ('use', 'refresh', 'off'));
