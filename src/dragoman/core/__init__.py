"""Pure domain logic: no asyncio, no Redis, no sockets, no wall clock (``now_ms`` is always passed in)."""
