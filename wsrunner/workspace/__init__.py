"""Workspaces on disk: directories and quotas, contained paths, search, operations."""
