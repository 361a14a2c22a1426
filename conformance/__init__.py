"""The shared conformance suite: one set of named behaviours every transport passes.

A transport under test is described by a ``factory`` fixture (an async callable
that makes a new, connected transport on the same bus/file/broker); the cases
read ``transport.capabilities`` to decide what to demand, and demand a clean
``ConfigError`` for what is not declared. See README.md in this folder::

    from alkpubsub.conformance import TransportSuite

    class TestMyTransport(TransportSuite):
        @pytest.fixture
        def factory(self):
            return lambda: alkpubsub.connect("mine://")
"""

from .adversarial import AdversarialCases, GarbageWriter
from .basic import BasicCases
from .durable import DurableCases
from .multiprocess import ProcessCases
from .patterns import BAD_PATTERNS, BAD_TOPICS, PATTERN_TABLE
from .processes import OtherProcess
from .suite import (
    QUIET,
    RECEIVE_TIMEOUT,
    SuiteFixtures,
    TransportFactory,
    collect,
    collect_acking,
    nothing_more,
    unique,
)


class TransportSuite(BasicCases, DurableCases, AdversarialCases, ProcessCases):
    """Every conformance case. Subclass it in a test module and define ``factory``."""


__all__ = [
    "BAD_PATTERNS",
    "BAD_TOPICS",
    "PATTERN_TABLE",
    "QUIET",
    "RECEIVE_TIMEOUT",
    "AdversarialCases",
    "BasicCases",
    "DurableCases",
    "GarbageWriter",
    "OtherProcess",
    "ProcessCases",
    "SuiteFixtures",
    "TransportFactory",
    "TransportSuite",
    "collect",
    "collect_acking",
    "nothing_more",
    "unique",
]
