"""Shared fixtures: throwaway broker servers (see brokers.py)."""

from brokers import (  # noqa: F401 - imported so pytest registers the fixtures
    nats_server,
    nats_server_session,
    redis_server,
    redis_server_session,
)
