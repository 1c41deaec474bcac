"""The public REST + SSE API (PUBLIC_API_PORT): tasks, their events, repository clones, tools.

Every route but `/openapi.json` and the probes needs `Authorization: Bearer <token>`. A token
sees only the workspaces it is scoped to; a task elsewhere is answered 404, exactly like a task
that does not exist, so ids do not leak. Errors are problem+json (`frontend.problems`).

    api.py         the app: authentication, problems, OpenAPI document, probes, blueprints
    tasks.py       submit, list, get, cancel
    events.py      a task's events as Server-Sent Events
    workspaces.py  a repository clone into a workspace
    tools.py       the agent tools: their definitions, and a call
"""
