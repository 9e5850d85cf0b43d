"""FastAPI front end of adapter-server: `create_app(settings)` builds the app; `cli.main` serves it."""
