"""The engine: poller, task slots, the runner of one task, heartbeat and reaper."""
