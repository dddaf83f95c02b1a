"""The scheduler's ASGI application: WebSocket endpoints, HTTP API, dashboard."""
