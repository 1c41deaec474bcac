"""Running steps: processes, the OS sandbox, and git through daemon-owned mirrors."""
