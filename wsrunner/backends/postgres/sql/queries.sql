-- Every statement the PostgreSQL store runs, as named blocks (loaded by wsrunner.store).

-- name: insert_task
INSERT INTO task_executions
    (id, workspace_id, task_type, configuration, priority, status, timeout_seconds,
     idempotency_key, request_hash, correlation_id, workspace_path)
VALUES
    (%(id)s, %(workspace_id)s, %(task_type)s, %(configuration)s, %(priority)s, 'queued',
     %(timeout_seconds)s, %(idempotency_key)s, %(request_hash)s, %(correlation_id)s,
     %(workspace_path)s)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: get_task
SELECT * FROM task_executions WHERE id = %(id)s;

-- name: get_by_idempotency_key
SELECT * FROM task_executions
 WHERE workspace_id = %(workspace_id)s AND idempotency_key = %(idempotency_key)s;

-- name: transition
UPDATE task_executions SET
    status            = %(target)s::text,
    updated_at        = now(),
    started_at        = CASE WHEN %(target)s::text = 'running' THEN now() ELSE started_at END,
    completed_at      = CASE WHEN %(terminal)s::boolean THEN now() ELSE completed_at END,
    worker_id         = COALESCE(%(worker_id)s::text, worker_id),
    attempts          = attempts + CASE WHEN %(target)s::text = 'running' THEN 1 ELSE 0 END,
    lease_expires_at  = CASE WHEN %(target)s::text = 'running'
                             THEN now() + make_interval(secs => %(lease_s)s::float8) END,
    result            = COALESCE(%(result)s::jsonb, result),
    error_message     = COALESCE(%(error)s::text, error_message),
    execution_time_ms = COALESCE(%(execution_time_ms)s::integer, execution_time_ms),
    cancel_requested_at = CASE WHEN %(target)s::text = 'cancelled' THEN now()
                               ELSE cancel_requested_at END
 WHERE id = %(id)s::uuid
   AND status = ANY(%(sources)s::text[])
   AND (%(expect_worker)s::text IS NULL OR worker_id = %(expect_worker)s::text)
RETURNING *;

-- The two statements of every task's path run on the trio thread (wsrunner.libpq), prepared,
-- with positional text parameters. Each is one statement: atomic without a transaction block.

-- name: start_task
-- Move a claimed task to running, inserting it as running if its producer wrote no record.
-- Rows: (attempts, NULL) when started; (NULL, status) when it exists in a state that may not
-- start; (NULL, 'duplicate:<id>') when another task has its idempotency key; none when a
-- concurrent start won.
-- $1 id, $2 worker_id, $3 lease_s, $4 sources, $5 workspace_id, $6 task_type,
-- $7 configuration, $8 priority, $9 timeout_seconds, $10 idempotency_key, $11 request_hash,
-- $12 correlation_id, $13 workspace_path
WITH moved AS (
    UPDATE task_executions SET
        status = 'running', updated_at = now(), started_at = now(), worker_id = $2::text,
        attempts = attempts + 1, lease_expires_at = now() + make_interval(secs => $3::float8)
     WHERE id = $1::uuid AND status = ANY($4::text[])
    RETURNING attempts
), inserted AS (
    INSERT INTO task_executions
        (id, workspace_id, task_type, configuration, priority, status, timeout_seconds,
         idempotency_key, request_hash, correlation_id, workspace_path, started_at, worker_id,
         attempts, lease_expires_at)
    SELECT $1::uuid, $5::text, $6::text, $7::jsonb, $8::text, 'running', $9::integer,
           $10::text, $11::text, $12::text, $13::text, now(), $2::text,
           1, now() + make_interval(secs => $3::float8)
     WHERE NOT EXISTS (SELECT 1 FROM task_executions WHERE id = $1::uuid)
    ON CONFLICT DO NOTHING
    RETURNING attempts
)
SELECT attempts::text, NULL FROM moved
UNION ALL
SELECT attempts::text, NULL FROM inserted
UNION ALL
SELECT NULL, status FROM task_executions
 WHERE id = $1::uuid AND NOT EXISTS (SELECT 1 FROM moved)
UNION ALL
SELECT NULL, 'duplicate:' || id::text FROM task_executions
 WHERE workspace_id = $5::text AND idempotency_key = $10::text AND id <> $1::uuid
   AND NOT EXISTS (SELECT 1 FROM task_executions WHERE id = $1::uuid);

-- name: finish_task
-- The end of a run, by the daemon that holds the task. Rows: ('moved') when written, else
-- (current status); none when there is no such task.
-- $1 id, $2 target, $3 sources, $4 worker_id, $5 result, $6 error, $7 execution_time_ms
WITH moved AS (
    UPDATE task_executions SET
        status = $2::text, updated_at = now(), completed_at = now(), lease_expires_at = NULL,
        result = COALESCE($5::jsonb, result), error_message = COALESCE($6::text, error_message),
        execution_time_ms = COALESCE($7::integer, execution_time_ms),
        cancel_requested_at = CASE WHEN $2::text = 'cancelled' THEN now()
                                   ELSE cancel_requested_at END
     WHERE id = $1::uuid AND status = ANY($3::text[]) AND worker_id = $4::text
    RETURNING 1
)
SELECT 'moved' FROM moved
UNION ALL
SELECT status FROM task_executions WHERE id = $1::uuid AND NOT EXISTS (SELECT 1 FROM moved);

-- name: attach_result
UPDATE task_executions
   SET result = %(result)s, execution_time_ms = COALESCE(execution_time_ms, %(execution_time_ms)s),
       updated_at = now()
 WHERE id = %(id)s AND result IS NULL;

-- name: renew_leases
UPDATE task_executions
   SET lease_expires_at = now() + make_interval(secs => %(lease_s)s::float8)
 WHERE worker_id = %(worker_id)s AND status = 'running' AND id = ANY(%(ids)s);

-- name: expired_running
SELECT * FROM task_executions
 WHERE status = 'running' AND lease_expires_at < now()
 ORDER BY lease_expires_at
 LIMIT %(limit)s;

-- name: stale_queued
SELECT * FROM task_executions
 WHERE status = 'queued' AND updated_at < now() - make_interval(secs => %(age_s)s::float8)
 ORDER BY submitted_at
 LIMIT %(limit)s;

-- name: list_tasks
SELECT * FROM task_executions
 WHERE (%(workspace_id)s::text IS NULL OR workspace_id = %(workspace_id)s)
   AND (%(workspaces)s::text[] IS NULL OR workspace_id = ANY(%(workspaces)s::text[]))
   AND (%(status)s::text IS NULL OR status = %(status)s)
   AND (%(before_ts)s::timestamptz IS NULL
        OR (submitted_at, id) < (%(before_ts)s::timestamptz, %(before_id)s::uuid))
 ORDER BY submitted_at DESC, id DESC
 LIMIT %(limit)s;

-- name: insert_token
INSERT INTO api_tokens (id, name, secret_sha256, workspaces, max_priority, max_running, max_queued)
VALUES (%(id)s, %(name)s, %(secret_sha256)s, %(workspaces)s::text[], %(max_priority)s,
        %(max_running)s, %(max_queued)s)
RETURNING *;

-- name: update_token_limits
UPDATE api_tokens SET max_priority = %(max_priority)s, max_running = %(max_running)s,
                      max_queued = %(max_queued)s
 WHERE id = %(id)s
RETURNING *;

-- name: count_queued_of_token
SELECT count(*) AS n FROM task_executions
 WHERE status = 'queued' AND configuration->>'token_id' = %(token_id)s;

-- name: get_token
SELECT * FROM api_tokens WHERE id = %(id)s;

-- name: list_tokens
SELECT * FROM api_tokens ORDER BY created_at, id;

-- name: revoke_token
UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
 WHERE id = %(id)s
RETURNING *;

-- name: touch_token
UPDATE api_tokens SET last_used_at = now()
 WHERE id = %(id)s AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');

-- name: record_home
INSERT INTO workspace_homes (workspace_id, host) VALUES (%(workspace_id)s, %(host)s)
ON CONFLICT (workspace_id) DO UPDATE SET host = excluded.host, updated_at = now();

-- name: list_homes
SELECT workspace_id, host FROM workspace_homes;
