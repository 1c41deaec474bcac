"""git that reaches a remote: daemon-owned mirrors, and the workspace side."""
