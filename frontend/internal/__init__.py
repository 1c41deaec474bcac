"""The internal API (WORKER_HEALTH_PORT): health, metrics, and file/exec/grep/git for orchestrators.

The reference system's paths, so its orchestrator client works unchanged. Every route but
`/health`, the probes, `/metrics` and `/openapi.json` needs `X-Internal-Token`, compared in
constant time. Paths are contained in the workspace by the core; errors are problem+json, with
the message repeated under `error` where the reference's clients read it.

    api.py    the app: the token check, problems, OpenAPI document, probes, /health, /metrics
    files.py  list a directory, read a file, write a file
    exec.py   run a command, or run it and stream its output as Server-Sent Events
    grep.py   regex search
    git.py    one git operation
"""
