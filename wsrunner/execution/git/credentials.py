"""Where git access tokens come from: a pluggable provider, asked when a clone runs.

Tokens never travel with a task. The payload, the task row, events and logs hold the plain
`https://host/owner/repo` URL; when the step runs, the executor asks the provider for the
workspace's token for that host and hands it to git through `GIT_ASKPASS`.

The first provider reads a YAML file (`git_credentials_file`, for example a systemd credential)
on every look-up, so a rotated token applies to the next clone without a restart:

    # every workspace (optional)
    default:
      github.com: ghp_xxx
    # per workspace; wins over `default`
    workspaces:
      acme:
        github.com: ghp_yyy
        gitlab.com: glpat-zzz
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Protocol

import trio
import yaml

from wsrunner.errors import ConfigError

logger = logging.getLogger(__name__)


class GitCredentialProvider(Protocol):
    async def token_for(self, workspace_id: str, host: str) -> str | None:
        """The access token of `workspace_id` for `host` (`name` or `name:port`), or None."""
        ...


class NoCredentials:
    """The provider when none is configured: clones are anonymous."""

    async def token_for(self, workspace_id: str, host: str) -> str | None:
        return None


class FileCredentialProvider:
    """Per-workspace tokens from a YAML file, re-read on every look-up."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def token_for(self, workspace_id: str, host: str) -> str | None:
        """`host` may carry a port; a key with the port wins over the bare host name."""
        data = await trio.to_thread.run_sync(self._load)
        tables = (data.get("workspaces", {}).get(workspace_id) or {}, data.get("default") or {})
        for table in tables:
            for key in dict.fromkeys((host, host.rsplit(":", 1)[0] if ":" in host else host)):
                token = table.get(key)
                if isinstance(token, str) and token:
                    return token
        return None

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"git_credentials_file {self.path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "git_credentials_file %s is readable by group or others; chmod 600 it", self.path
            )
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"git_credentials_file {self.path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"default", "workspaces"}:
            raise ConfigError(
                f"git_credentials_file {self.path}: expected the keys 'default' and/or "
                "'workspaces' at the top level"
            )
        return data


def credential_provider(path: Path | None) -> GitCredentialProvider:
    return NoCredentials() if path is None else FileCredentialProvider(path)
