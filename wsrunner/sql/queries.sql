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
INSERT INTO api_tokens (id, name, secret_sha256, workspaces)
VALUES (%(id)s, %(name)s, %(secret_sha256)s, %(workspaces)s::text[])
RETURNING *;

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
