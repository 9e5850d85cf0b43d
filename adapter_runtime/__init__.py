"""adapter_runtime: the engine of adapter-server (no web framework in here)."""
