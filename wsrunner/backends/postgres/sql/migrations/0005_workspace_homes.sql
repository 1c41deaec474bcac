-- Each workspace's home host: the host whose volume holds its directory (issue 22). Chosen on
-- first use by the daemon that claims its first task; Redis keeps the working copy
-- (`<prefix>:turns:homes`), restored from here at start-up.
CREATE TABLE workspace_homes (
    workspace_id TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
