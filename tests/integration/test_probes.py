"""`/livez` and `/readyz` on both ports, without a token, and readiness that can fail."""

from __future__ import annotations

import httpx

from tests.conftest import INTERNAL_TOKEN, Api


async def test_probes_answer_on_both_ports_without_a_token(api: Api) -> None:
    for base in (api.public, api.internal):
        async with httpx.AsyncClient(base_url=base) as anon:
            live = await anon.get("/livez")
            assert live.status_code == 200 and live.json()["status"] == "alive"
            ready = await anon.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "ready",
                "checks": {"redis": "ok", "postgres": "ok", "volume": "ok", "sandbox": "ok"},
            }


async def test_readyz_is_503_naming_what_is_not_ready(start_daemon, tmp_path) -> None:
    daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
    )
    volume = daemon.settings.volume_path
    volume.rename(tmp_path / "moved-away")  # the volume disappears under the running daemon
    try:
        async with httpx.AsyncClient(base_url=daemon.urls[0]) as anon:
            r = await anon.get("/readyz")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "not ready" and body["checks"]["redis"] == "ok"
            assert body["checks"]["volume"].startswith("unavailable: ")
            assert (await anon.get("/livez")).status_code == 200
        async with httpx.AsyncClient(base_url=daemon.urls[1]) as anon:
            health = await anon.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
    finally:
        (tmp_path / "moved-away").rename(volume)
