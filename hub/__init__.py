"""Hub and spokes over WebSocket: :class:`Hub` serves a transport per tenant as
an ASGI app; spokes connect with ``ws://``/``wss://`` URLs
(``alkpubsub.transports.ws``). The frame protocol: ``docs/hub-protocol.md``."""

from .auth import Authenticator, Grant, covers, grants_from_spec, tokens
from .server import Hub, HubConnection

__all__ = ["Authenticator", "Grant", "Hub", "HubConnection", "covers", "grants_from_spec", "tokens"]
