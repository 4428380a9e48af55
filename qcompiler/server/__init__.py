"""``qcompile serve``: an OpenAI-compatible HTTP server over the engine (``server.app.Server``)."""
from .app import Server

__all__ = ["Server"]
