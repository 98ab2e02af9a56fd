"""Transports: the quart-trio app and the streaming ASGI handlers beside it."""
