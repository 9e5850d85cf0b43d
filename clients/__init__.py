"""Python client for adapter-server: `AdapterServerClient` (blocking) and
`AsyncAdapterServerClient` (asyncio), plus the `adapter-client` command line (`clients.cli`)."""

from .client import (AdapterInfo, AdapterServerClient, AdapterServerError, AsyncAdapterServerClient, AuthError,
                     BadRequest, Choice, Completion, Conflict, ConnectionFailed, Deleted, Health, Logprobs,
                     MergeState, Model, NotFound, RateLimited, ServerError, TooLarge, Usage, pack_directory)

__all__ = [
    "AdapterInfo", "AdapterServerClient", "AdapterServerError", "AsyncAdapterServerClient", "AuthError", "BadRequest",
    "Choice", "Completion", "Conflict", "ConnectionFailed", "Deleted", "Health", "Logprobs", "MergeState", "Model",
    "NotFound", "RateLimited", "ServerError", "TooLarge", "Usage", "pack_directory",
]
