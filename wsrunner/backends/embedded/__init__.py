"""The embedded backend: an in-process queue and a SQLite store, for one daemon."""
