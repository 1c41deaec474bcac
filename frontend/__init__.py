"""The pluggable HTTP layer of wsrunner: Quart-Trio apps served by Hypercorn in the daemon's nursery.

The daemon loads this module by name (setting `frontend`) and calls `serve()`; the core never
imports it. Handlers reach the core only through `wsrunner.service.Service`.
"""

from __future__ import annotations

from frontend.server import serve

__all__ = ["serve"]
