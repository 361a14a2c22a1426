"""Cases that try to break a transport: what a hostile or careless user does.

Each case here reproduces a way events were lost or withheld in an adversarial
run against the public API (subscriptions entered concurrently, payloads
accepted but undeliverable, garbage written next to us by another client), so
every present and future transport is held to the fix:

- many ``__aenter__`` at once through ``asyncio.gather`` each return live, and
  each then receives every matching event;
- the largest accepted payload and the deepest accepted nesting are delivered,
  and one byte or one level more is refused at publish (nothing accepted that
  cannot be delivered);
- every malformed publish or subscribe argument raises a :class:`PubSubError`
  subclass, generated with hypothesis, and nothing reaches a subscriber;
- garbage written on the wire by the broker's own raw client never stops the
  delivery of later good events (the ``garbage_writer`` fixture).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from alkpubsub import (
    Capabilities,
    ConfigError,
    Event,
    InvalidTopic,
    PayloadError,
    PubSubError,
    Subscription,
    Transport,
)
from alkpubsub.limits import MAX_DEPTH, MAX_HEADERS_BYTES, MAX_INT, MAX_KEY_LENGTH, MIN_INT

from .suite import (
    NOT_APPLICABLE,
    RECEIVE_TIMEOUT,
    SuiteFixtures,
    TransportFactory,
    collect,
    nothing_more,
    unique,
)

GarbageWriter = Callable[[str], Awaitable[int]]
"""Writes malformed messages, with the broker's own raw client, where a
subscription to the given exact topic reads; returns how many it wrote. At
least one must be undecodable by any rule (e.g. bytes that are not UTF-8)."""

ENTER_TIMEOUT = 15.0
"""Bound on entering a batch of concurrent subscriptions (one enters in ms)."""

HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


async def enter_all(subs: list[Subscription]) -> None:
    """Enter every subscription concurrently, or fail saying how many did not."""
    try:
        async with asyncio.timeout(ENTER_TIMEOUT):
            await asyncio.gather(*(sub.__aenter__() for sub in subs))
    except TimeoutError:
        pytest.fail(
            f"{len(subs)} subscriptions entered concurrently did not all return within "
            f"{ENTER_TIMEOUT} s"
        )


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels deep (``[]`` is depth 1)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- strategies --------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=MIN_INT, max_value=MAX_INT),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


class _Opaque:
    """An object no JSON encoder knows."""


bad_scalars = st.one_of(
    st.integers(min_value=MAX_INT + 1),
    st.integers(max_value=MIN_INT - 1),
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            1j,
            b"\xff",
            b"ok",
            {1, 2},
            _Opaque(),
            frozenset(),
            bytearray(b"x"),
            range(3),
            object,
        ]
    ),
    st.datetimes(),
    st.uuids(),
    st.decimals(allow_nan=False),
)
bad_payloads = st.one_of(
    bad_scalars,
    st.lists(bad_scalars, min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), bad_scalars, min_size=1, max_size=3),
    # Non-text keys: {1: "a", "1": "b"} would silently collapse to one key.
    st.dictionaries(
        st.one_of(st.integers(), st.floats(), st.none(), st.booleans()),
        json_scalars,
        min_size=1,
        max_size=3,
    ),
    st.integers(min_value=MAX_DEPTH + 1, max_value=MAX_DEPTH + 160).map(nested),
    st.builds(lambda v: {"deep": nested(MAX_DEPTH)} | {"v": v}, json_scalars),
)
bad_topics = st.one_of(
    st.text(max_size=30).filter(lambda t: not _is_topic(t)),
    st.integers(),
    st.none(),
    st.binary(max_size=8),
    st.lists(st.text(max_size=3), max_size=2),
)
bad_headers = st.one_of(
    st.text(max_size=5),
    st.integers(),
    st.lists(st.text(max_size=3), min_size=1, max_size=2),
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(st.integers(), st.none(), st.binary(max_size=3), st.floats()),
        min_size=1,
        max_size=2,
    ),
    st.dictionaries(
        st.one_of(st.integers(), st.none()), st.text(max_size=3), min_size=1, max_size=2
    ),
    st.builds(lambda k: {k: "v"}, st.sampled_from(["", "a b", "a:b", "é", "x\n", "a" * 129])),
    st.builds(lambda v: {"h": v}, st.sampled_from(["a\r\nb", "a\nb", "a\x00b", "\ud800"])),
    st.just({"big": "x" * (MAX_HEADERS_BYTES + 1)}),
)
bad_keys = st.one_of(
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=2)),
    st.just(""),
    st.just("k" * (MAX_KEY_LENGTH + 1)),
    st.just("a\nb"),
    st.booleans(),
)
bad_batches = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=4),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2)),
    st.lists(
        st.one_of(
            st.integers(),
            st.none(),
            st.text(max_size=3),
            st.tuples(st.just("t")),
            st.tuples(st.just("t"), st.none(), st.none()),
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.tuples(st.just("t"), bad_payloads), min_size=1, max_size=2),
    st.lists(st.tuples(bad_topics, json_scalars), min_size=1, max_size=2),
)


def _is_topic(text: str) -> bool:
    try:
        from alkpubsub import validate_topic

        validate_topic(text)
    except InvalidTopic:
        return False
    return True


class AdversarialCases(SuiteFixtures):
    """Hostile and careless use, demanded of every transport."""

    @pytest.fixture
    def garbage_writer(self) -> GarbageWriter | None:
        """Override in a transport's test module: see :data:`GarbageWriter`.
        None means the transport has no wire another client can write to."""
        return None

    # -- concurrent subscribe ------------------------------------------------

    async def test_concurrent_subscribe_same_pattern_each_receives_everything(
        self, transport: Transport
    ) -> None:
        # Seen on redis://: 8 concurrent entries hung, or returned live and got nothing.
        base = unique("c")
        subs = [transport.subscribe(f"{base}:>") for _ in range(8)]
        await enter_all(subs)
        try:
            sent = [await transport.publish(f"{base}:x{i}", i) for i in range(3)]
            for sub in subs:
                got = await collect(sub, 3)
                assert [e.id for e in got] == [e.id for e in sent], sub
        finally:
            await asyncio.gather(*(sub.close() for sub in subs))

    async def test_concurrent_subscribe_distinct_patterns_each_receives_its_own(
        self, transport: Transport, caps: Capabilities
    ) -> None:
        base = unique("d")
        topics = [f"{base}:t{i}:e" for i in range(8)]
        patterns = list(topics)
        if caps.wildcards:
            patterns += [f"{base}:t{i}:*" for i in range(4)] + [f"{base}:>"]
        subs = [transport.subscribe(p) for p in patterns]
        await enter_all(subs)
        try:
            sent = {t: await transport.publish(t, t) for t in topics}
            for pattern, sub in zip(patterns, subs, strict=True):
                want = [sent[t].id for t in topics if sub.pattern.matches(t)]
                got = await collect(sub, len(want))
                assert [e.id for e in got] == want, pattern
                await nothing_more(sub, 0.1)
        finally:
            await asyncio.gather(*(sub.close() for sub in subs))

    async def test_concurrent_subscribe_and_close_leaves_the_rest_live(
        self, transport: Transport
    ) -> None:
        topic = unique("sc")
        first = [transport.subscribe(topic) for _ in range(10)]
        await enter_all(first)
        second = [transport.subscribe(topic) for _ in range(10)]
        # Half the first batch closes while the second batch enters.
        try:
            async with asyncio.timeout(ENTER_TIMEOUT):
                await asyncio.gather(
                    *(s.close() for s in first[:5]), *(s.__aenter__() for s in second)
                )
            live = first[5:] + second
            sent = await transport.publish(topic, "after")
            for sub in live:
                [got] = await collect(sub, 1)
                assert got.id == sent.id
        finally:
            await asyncio.gather(*(s.close() for s in first + second))

    # -- limits: the largest accepted is delivered, one more is refused -----

    async def test_largest_payload_is_delivered_and_one_byte_more_refused(
        self, transport: Transport
    ) -> None:
        limit = transport.max_payload_bytes
        topic = unique("big")
        largest = "x" * (limit - 2)  # a JSON string: two quote characters
        assert len(to_json(largest)) == limit
        async with transport.subscribe(topic) as sub:
            with pytest.raises(PayloadError, match=str(limit)):
                await transport.publish(topic, largest + "y")
            with pytest.raises(PayloadError, match=str(limit)):
                await transport.publish_many([(topic, "small"), (topic, largest + "y")])
            sent = await transport.publish(topic, largest)
            after = await transport.publish(topic, "small")
            got = await collect(sub, 2, timeout=RECEIVE_TIMEOUT * 3)
            assert [e.id for e in got] == [sent.id, after.id]
            assert got[0].payload == largest
            await nothing_more(sub)

    async def test_deepest_nesting_is_delivered_and_one_level_more_refused(
        self, transport: Transport
    ) -> None:
        topic = unique("deep")
        async with transport.subscribe(topic) as sub:
            with pytest.raises(PayloadError, match=f"deeper than {MAX_DEPTH}"):
                await transport.publish(topic, nested(MAX_DEPTH + 1))
            with pytest.raises(PayloadError, match=f"deeper than {MAX_DEPTH}"):
                await transport.publish(topic, {"a": nested(MAX_DEPTH)})
            sent = await transport.publish(topic, nested(MAX_DEPTH))
            [got] = await collect(sub, 1)
            assert got.id == sent.id and got.payload == nested(MAX_DEPTH)
            await nothing_more(sub)

    async def test_edge_values_arrive_unchanged(self, transport: Transport) -> None:
        topic = unique("edge")
        payload = {
            "ints": [MIN_INT, MAX_INT, 0, -1, 2**53 + 1],
            "floats": [5e-324, 1.7976931348623157e308, -0.0, 0.1],
            "text": ["", "\x00", "é✓🙂", '"\\/', "\u2028"],
            "": {"": None},
        }
        headers = {"h" * 128: "v" * 1000, "trace-id": "é✓ \t tab"}
        key = "k" * MAX_KEY_LENGTH
        async with transport.subscribe(topic) as sub:
            sent = await transport.publish(topic, payload, headers=headers, key=key)
            [got] = await collect(sub, 1)
        assert got.id == sent.id
        assert got.payload == payload
        assert got.headers == headers
        assert got.key == key

    # -- malformed arguments: always a PubSubError, nothing published -------

    def test_malformed_publish_arguments_raise_pubsub_errors(
        self, factory: TransportFactory
    ) -> None:
        topic = unique("bad")

        def run(runner: asyncio.Runner, transport: Transport, sub: Subscription) -> None:
            @HYPOTHESIS
            @given(
                case=st.one_of(
                    st.tuples(st.just("topic"), bad_topics),
                    st.tuples(st.just("payload"), bad_payloads),
                    st.tuples(st.just("headers"), bad_headers),
                    st.tuples(st.just("key"), bad_keys),
                    st.tuples(st.just("batch"), bad_batches),
                )
            )
            def attempt(case: tuple[str, Any]) -> None:
                runner.run(_refused(transport, topic, *case))

            attempt()
            # Nothing any refused call made may reach a subscriber.
            sent = runner.run(transport.publish(topic, "sentinel"))
            [got] = runner.run(collect(sub, 1))
            assert got.id == sent.id, f"a refused publish was delivered: {got!r}"

        _with_subscription(factory, topic, run)

    def test_odd_but_valid_payloads_arrive_unchanged(self, factory: TransportFactory) -> None:
        topic = unique("odd")

        def run(runner: asyncio.Runner, transport: Transport, sub: Subscription) -> None:
            @HYPOTHESIS
            @given(payload=json_values)
            def attempt(payload: Any) -> None:
                got = runner.run(_round_trip(transport, sub, topic, payload))
                # Compared as JSON text: True == 1 and 1 == 1.0 in Python, not on the wire.
                assert to_json(got.payload) == to_json(payload)

            attempt()

        _with_subscription(factory, topic, run)

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"pattern": None}, InvalidTopic),
            ({"pattern": b"a"}, InvalidTopic),
            ({"pattern": 5}, InvalidTopic),
            ({"buffer": True}, ConfigError),
            ({"buffer": 0}, ConfigError),
            ({"buffer": -1}, ConfigError),
            ({"buffer": "10"}, ConfigError),
            ({"buffer": 1.5}, ConfigError),
            ({"consumer": ""}, ConfigError),
            ({"consumer": 5}, ConfigError),
            ({"consumer": "a b"}, ConfigError),
            ({"start": True}, ConfigError),
            ({"start": -1}, ConfigError),
            ({"start": "latest"}, ConfigError),
            ({"start": 1.0}, ConfigError),
        ],
        ids=repr,
    )
    def test_malformed_subscribe_arguments_raise_pubsub_errors(
        self, transport: Transport, kwargs: dict[str, Any], error: type[PubSubError]
    ) -> None:
        args = dict(kwargs)  # the parameter dict is shared by every transport's run
        pattern = args.pop("pattern", unique("s"))
        with pytest.raises(error):
            transport.subscribe(pattern, **args)

    # -- garbage on the wire ------------------------------------------------

    async def test_garbage_on_the_wire_never_stops_delivery(
        self,
        connect: TransportFactory,
        caps: Capabilities,
        garbage_writer: GarbageWriter | None,
    ) -> None:
        if garbage_writer is None:
            pytest.skip(f"{NOT_APPLICABLE}no wire another client can write garbage to")
        transport = await connect()
        base = unique("g")
        topic = f"{base}:x"
        subs = [transport.subscribe(topic)]
        if caps.wildcards:
            subs.append(transport.subscribe(f"{base}:*"))
        if caps.consumer_offsets:
            subs.append(transport.subscribe(topic, consumer=unique("c")))
        await enter_all(subs)
        try:
            before = await transport.publish(topic, "before")
            written = await garbage_writer(topic)
            assert written >= 1
            sent = [before] + [await transport.publish(topic, i) for i in range(3)]
            for sub in subs:
                got = await _good_events(sub, {e.id for e in sent})
                assert [e.id for e in got] == [e.id for e in sent], sub
                assert not sub.closed
                seen = sub.stats.malformed + sub.stats.dead_lettered
                assert seen >= 1, f"{sub!r}: garbage neither counted as malformed nor dead-lettered"
            # A subscription opened after the garbage works as well.
            async with transport.subscribe(topic) as fresh:
                late = await transport.publish(topic, "late")
                [got_late] = await _good_events(fresh, {late.id})
                assert got_late.id == late.id
        finally:
            await asyncio.gather(*(sub.close() for sub in subs))


async def _made(factory: TransportFactory) -> Transport:
    return await factory()


def _with_subscription(
    factory: TransportFactory,
    topic: str,
    body: Callable[[asyncio.Runner, Transport, Subscription], None],
) -> None:
    """Run ``body`` with a live subscription to ``topic``, outside pytest-asyncio:
    hypothesis drives a plain function, so the event loop is an ``asyncio.Runner``."""
    with asyncio.Runner() as runner:
        transport = runner.run(_made(factory))
        sub = transport.subscribe(topic)
        try:
            runner.run(sub.__aenter__())
            body(runner, transport, sub)
        finally:
            runner.run(sub.close())
            runner.run(transport.close())


async def _refused(transport: Transport, topic: str, kind: str, value: Any) -> None:
    try:
        if kind == "topic":
            await transport.publish(value, {})
        elif kind == "payload":
            await transport.publish(topic, value)
        elif kind == "headers":
            await transport.publish(topic, 1, headers=value)
        elif kind == "key":
            await transport.publish(topic, 1, key=value)
        else:
            await transport.publish_many(value)
    except PubSubError:
        return
    except Exception as exc:  # the defect this case exists for
        pytest.fail(f"{kind}={value!r:.80} raised {type(exc).__name__}: {exc}, not a PubSubError")
    pytest.fail(f"{kind}={value!r:.80} was accepted")


async def _round_trip(transport: Transport, sub: Subscription, topic: str, payload: Any) -> Event:
    sent = await transport.publish(topic, payload)
    [got] = await collect(sub, 1)
    assert got.id == sent.id
    return got


async def _good_events(sub: Subscription, ids: set[str]) -> list[Event]:
    """The events of ``ids`` in arrival order; foreign events adopted by the
    transport may arrive in between and are skipped (they must match the pattern)."""
    got: list[Event] = []
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            while len(got) < len(ids):
                event = await sub.__anext__()
                assert sub.pattern.matches(event.topic), f"{event.topic!r} does not match"
                if event.id in ids:
                    got.append(event)
                if sub.consumer is not None:
                    await sub.ack(event)
    except TimeoutError:
        pytest.fail(f"{sub!r}: {len(got)} of {len(ids)} good events arrived after the garbage")
    return got
