"""The adapters behind the core's ports, one folder per backend."""
