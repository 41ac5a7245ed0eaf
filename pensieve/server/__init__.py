"""OpenAI-compatible HTTP server for the Pensieve engine (`pensieve serve`)."""

from pensieve.server.app import create_app, start_server
from pensieve.server.state import STATE, ServerState

__all__ = ["STATE", "ServerState", "create_app", "start_server"]
