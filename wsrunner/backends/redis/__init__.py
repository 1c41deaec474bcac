"""Redis: work queue and claims, status mirror, events, membership, cancel bus."""
