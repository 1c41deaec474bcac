-- Most tasks have no correlation id: index only those that do. Every look-up by a correlation id
-- (`correlation_id = $1` implies it is not null) still uses the index, and a task's insert and
-- its end (an update that moves it in every index) skip one index entry each.
DROP INDEX task_executions_correlation_idx;
CREATE INDEX task_executions_correlation_idx ON task_executions (correlation_id)
    WHERE correlation_id IS NOT NULL;
