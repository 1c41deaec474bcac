"""wsrunner: a host daemon that runs workspace tasks for orchestrators and AI agents."""

from __future__ import annotations

__version__ = "0.1.0"
