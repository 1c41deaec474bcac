"""`/livez` and `/readyz` on both apps, open to anyone (Kubernetes API-server conventions).

`/livez` answers while the process serves HTTP; `/readyz` answers 200 only when Redis and
PostgreSQL answer and the workspace volume takes a file, and 503 naming what is not ready.
"""

from __future__ import annotations

from typing import Any, Final

from quart import Blueprint, jsonify
from quart_schema import document_response, operation_id, tag_blueprint

from frontend import schemas
from frontend.context import current_service

PATHS: Final = frozenset({"/livez", "/readyz"})

blueprint = Blueprint("probes", __name__)  #: registered on both apps
tag_blueprint(blueprint, ["probes"])


@blueprint.get("/livez")
@operation_id("checkLiveness")
@document_response(schemas.Live)
async def livez() -> Any:
    """The process is alive and serving."""
    return jsonify({"status": "alive", "worker_id": current_service().settings.worker_id})


@blueprint.get("/readyz")
@operation_id("checkReadiness")
@document_response(schemas.Ready)
@document_response(schemas.Ready, 503)
async def readyz() -> Any:
    """Redis, PostgreSQL and the volume are usable; 503 says which is not."""
    checks = await current_service().checks()
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return jsonify(body), 200 if ready else 503
