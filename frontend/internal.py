"""The internal API app (WORKER_HEALTH_PORT): `/health` for now, open to anyone."""

from __future__ import annotations

from typing import Any

from quart import jsonify

from frontend.app import App
from wsrunner.service import Service


def create_internal_app(service: Service) -> App:
    app = App("wsrunner.internal")

    @app.get("/health")
    async def health() -> Any:
        body = await service.health()
        return jsonify(body), 200 if body["status"] == "healthy" else 503

    return app
