"""SQLAlchemy's own dialect compliance suite, unmodified."""

from sqlalchemy.testing.suite import *  # noqa: F403
