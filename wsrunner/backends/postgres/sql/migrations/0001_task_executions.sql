-- The durable task record. Columns of the reference system's task_executions, so its readers keep
-- working, plus what a complete record needs: the result, attempts, lease, idempotency key.
-- workspace_id is TEXT (validated ids, not only UUIDs) and has no foreign key: wsrunner does not
-- own a workspaces table.
CREATE TABLE task_executions (
    id                  UUID PRIMARY KEY,
    workspace_id        TEXT NOT NULL,
    task_type           VARCHAR(50) NOT NULL DEFAULT 'background_job',
    agent_id            INTEGER,
    prompt              TEXT,
    configuration       JSONB NOT NULL DEFAULT '{}',
    priority            VARCHAR(20) NOT NULL DEFAULT 'normal'
                        CHECK (priority IN ('critical', 'high', 'normal', 'low')),
    runner_backend      VARCHAR(20) NOT NULL DEFAULT 'queued',
    resources_requested JSONB NOT NULL DEFAULT '{}',
    resources_used      JSONB NOT NULL DEFAULT '{}',
    status              VARCHAR(20) NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'running', 'completed', 'failed',
                                          'cancelled', 'timed_out')),
    submitted_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at          TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ,
    result              JSONB,
    error_message       TEXT,
    tokens_used         INTEGER NOT NULL DEFAULT 0,
    execution_time_ms   INTEGER,
    parent_execution_id UUID REFERENCES task_executions (id),
    correlation_id      VARCHAR(255),
    k8s_namespace       VARCHAR(255),
    k8s_job_name        VARCHAR(255),
    k8s_pod_name        VARCHAR(255),
    worker_id           VARCHAR(255),
    workspace_path      TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- wsrunner additions
    timeout_seconds     INTEGER NOT NULL DEFAULT 300 CHECK (timeout_seconds BETWEEN 10 AND 3600),
    attempts            INTEGER NOT NULL DEFAULT 0,       -- times a daemon started it
    lease_expires_at    TIMESTAMPTZ,                      -- running only; renewed by heartbeats
    idempotency_key     VARCHAR(255),
    request_hash        TEXT,                             -- of the submitted body, for idempotency
    cancel_requested_at TIMESTAMPTZ
);

CREATE INDEX task_executions_workspace_idx ON task_executions (workspace_id, submitted_at DESC);
CREATE INDEX task_executions_submitted_idx ON task_executions (submitted_at DESC);
CREATE INDEX task_executions_correlation_idx ON task_executions (correlation_id);
CREATE INDEX task_executions_live_idx ON task_executions (status, lease_expires_at)
    WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX task_executions_idempotency_idx
    ON task_executions (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
