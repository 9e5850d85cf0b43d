"""FastAPI front end of adapter-server: `create_app(settings)` builds the app; `cli.main` serves it."""

import adapter_runtime  # noqa: F401  (first, before torch: the process's default OpenMP threads, adapter_runtime/threads.py)
