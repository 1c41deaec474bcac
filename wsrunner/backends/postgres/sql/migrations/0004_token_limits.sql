-- What each public API token may ask of the queue (issue 22): the highest priority it may use,
-- how many of its tasks may run at once and how many may wait (NULL: no limit). Tokens made
-- before this migration get the defaults: up to `high`, no count limits.
ALTER TABLE api_tokens
    ADD COLUMN max_priority TEXT NOT NULL DEFAULT 'high'
        CHECK (max_priority IN ('critical', 'high', 'normal', 'low')),
    ADD COLUMN max_running  INTEGER CHECK (max_running > 0),
    ADD COLUMN max_queued   INTEGER CHECK (max_queued > 0);

-- The waiting tasks of one token, counted at each of its submits.
CREATE INDEX task_executions_token_queued_idx ON task_executions ((configuration->>'token_id'))
    WHERE status = 'queued';
