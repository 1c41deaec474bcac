"""PostgreSQL: the durable task records and API tokens, and migrations."""
