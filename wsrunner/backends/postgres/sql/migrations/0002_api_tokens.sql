-- Bearer tokens of the public API. Only a SHA-256 digest of each token is kept; the token itself
-- is shown once, by `wsrunner tokens create`. `workspaces` NULL means every workspace.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,               -- the public part of the token, for look-up
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    workspaces    TEXT[],
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
