"""Composite transport: a fast local leg plus one or more targets.

Features
    Publish hands the event to every target first (so it is persisted, or on
    its way to other nodes), then delivers it on the local leg. A required
    target that fails or runs past its timeout fails the publish with
    :class:`PublishError`, which names the legs that succeeded, and the event
    is not delivered locally: a local subscriber never sees an event its
    durable target did not accept. An optional target that fails is counted
    in :attr:`CompositeTransport.leg_stats` and logged, and the publish goes
    on. ``publish`` returns the event as the durable target stored it (its
    ``offset`` set).

    A live subscription listens on the local leg and on every target. Events
    that come back from a target carrying this composite's ``origin`` were
    delivered locally already and are dropped, and an id seen recently is not
    delivered twice, so each subscriber gets each event once. The legs hand
    their events straight to the subscription's buffer (no task in between),
    so local delivery costs one buffer append after the targets accepted.
    Durable subscriptions (``consumer=``, or ``start`` other than ``"new"``)
    go to the first target that declares ``consumer_offsets`` (the durable
    target, which must be required). An optional target that cannot be
    subscribed to when a subscription starts does not stop it: the
    subscription goes live on the other legs and keeps trying that one
    (every 1 s, doubling up to 30 s).

Connection String
    A list of URLs, local leg first:
    ``["memory://", "honker+durable:///app.db"]`` or, in the environment,
    ``ALKPUBSUB_URL='["memory://", "honker+durable:///app.db"]'``.

Transport Options (on each target's URL; see :mod:`alkpubsub.composite.legs`)
    composite_required  true   false: a failure is counted and logged, not raised
    composite_timeout   (Settings.composite_timeout, 5)  seconds to wait for this
                               target to accept an event; 0 = no limit
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Container, Coroutine, Sequence
from dataclasses import fields
from typing import Any, Protocol, runtime_checkable

from alkpubsub.abilities import DEFAULT_MAX_DELIVERIES, Forwarding, max_deliveries_of
from alkpubsub.capabilities import Capabilities, Start
from alkpubsub.config import Settings
from alkpubsub.errors import ConfigError, PublishError
from alkpubsub.event import Event
from alkpubsub.transport import DEFAULT_BUFFER, BaseTransport, Subscription, Transport

from .legs import OPTIONS, LegPolicy, LegStats, has_policy, split_policy

log = logging.getLogger("alkpubsub.composite")

RECENT_IDS = 4096
"""How many recent event ids each subscription remembers to drop duplicates."""
OPTIONAL_RETRY = 1.0
"""Seconds before a subscription tries again an optional target it could not
subscribe to (doubling up to 30 s)."""
OPTIONAL_START_TIMEOUT = 5.0
"""Seconds a subscription waits for an optional target without a
``composite_timeout`` to go live before going on without it."""


def _combine(local: Capabilities, targets: Sequence[Capabilities]) -> Capabilities:
    """Live features need every leg; durable ones come from the durable target."""
    durable = next((t for t in targets if t.consumer_offsets), None)
    values: dict[str, bool] = {}
    for f in fields(Capabilities):
        name = f.name
        if name in ("wildcards", "ordered"):
            values[name] = getattr(local, name) and all(getattr(t, name) for t in targets)
        elif name in ("cross_process", "cross_node", "persistent"):
            values[name] = any(getattr(t, name) for t in targets)
        else:
            values[name] = bool(durable and getattr(durable, name))
    return Capabilities(**values)


@runtime_checkable
class SkipsOwn(Protocol):
    """A durable subscription that can pass over rows known to be its own
    echoes without reading them (``honker+durable://``)."""

    def skip_own(self, first: int, last: int) -> None: ...


class _Either:
    """Contains what either of two containers contains."""

    __slots__ = ("a", "b")

    def __init__(self, a: Container[str], b: Container[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b


class _Seen:
    """Ids delivered recently, in two generations of up to ``size`` each: a copy
    arriving within ``size`` events of the first is always recognised, and
    forgetting happens a generation at a time, so one copy that comes too late
    never makes the next one late too."""

    __slots__ = ("current", "previous", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: set[str] = set()
        self.previous: set[str] = set()

    def first(self, event_id: str) -> bool:
        """True (and remembered) the first time ``event_id`` is seen."""
        if event_id in self.current or event_id in self.previous:
            return False
        self.current.add(event_id)
        if len(self.current) >= self.size:
            self.previous, self.current = self.current, set()
        return True


class CompositeSubscription(Subscription):
    """Merges the legs' live subscriptions, dropping echoes and duplicates."""

    transport: CompositeTransport

    def __init__(self, transport: CompositeTransport, pattern: str, *, buffer: int) -> None:
        super().__init__(transport, pattern, buffer=buffer)
        self._legs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen = _Seen(RECENT_IDS)

    async def on_start(self) -> None:
        composite = self.transport
        try:
            await self._open_leg(composite.local, 0)
            for index in range(1, len(composite.targets) + 1):
                try:
                    await self._open_leg(composite.targets[index - 1], index)
                except Exception as exc:
                    if composite.policies[index - 1].required:
                        raise
                    self._optional_down(index, exc)
        except BaseException:
            await self.on_close()
            raise

    async def _open_leg(self, leg: Transport, index: int) -> None:
        sub = leg.subscribe(self.pattern.text, buffer=self.buffer_size)
        if index == 0:
            sub.deliver_to(self._accept, self.fail)
            await sub.start()
        else:
            composite = self.transport
            durable = index - 1 == composite.durable_index
            sub.deliver_to(
                functools.partial(self._from_target, durable),
                functools.partial(self._leg_failed, index, sub),
            )
            sub.skip_origin = composite.origin  # echoes: dropped before decoding
            sub.keep_ids = composite.kept_by_durable if durable else composite.unsure
            if durable and isinstance(sub, SkipsOwn):
                composite.echo_readers.add(sub)  # told which offsets are echoes
            policy = self.transport.policies[index - 1]
            if policy.required:
                await sub.start()
            else:
                # A hung optional target must not hold the subscription up.
                try:
                    async with asyncio.timeout(policy.timeout or OPTIONAL_START_TIMEOUT):
                        await sub.start()
                except BaseException:
                    await sub.close()
                    raise
        self._legs.append(sub)

    def _leg_failed(self, index: int, sub: Subscription, error: BaseException) -> None:
        if self.transport.policies[index - 1].required:
            self.fail(error)
            return
        if sub in self._legs:
            self._legs.remove(sub)
        self._spawn(sub.close())
        self._optional_down(index, error)

    def _optional_down(self, index: int, error: BaseException) -> None:
        """An optional target cannot deliver: go on without it, and keep trying it."""
        if self.closed:
            return
        target = self.transport.targets[index - 1]
        log.warning("%s: optional target %s stopped (%s); retrying", self, target.name, _why(error))
        self._spawn(self._retry(target, index))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, leg: Transport, index: int) -> None:
        pause = OPTIONAL_RETRY
        while not self.closed:
            await asyncio.sleep(pause)
            try:
                await self._open_leg(leg, index)
            except Exception:
                pause = min(pause * 2, 30.0)
                continue
            log.info("%s: optional target %s subscribed again", self, leg.name)
            return

    def _from_target(self, durable: bool, event: Event) -> None:
        composite = self.transport
        keep = composite.kept_by_durable if durable else composite.unsure
        if event.origin != composite.origin or event.id in keep:
            self._accept(event)
        # else: published here, and the local leg delivered it already

    def _accept(self, event: Event) -> None:
        if self._seen.first(event.id):
            self.push(event)

    async def on_close(self) -> None:
        for sub in self._legs:
            self.transport.echo_readers.discard(sub)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._legs:
            await sub.close()

    @property
    def legs(self) -> list[Subscription]:
        """The per-leg subscriptions (for their stats)."""
        return list(self._legs)


class CompositeTransport(BaseTransport):
    """``CompositeTransport(local, *targets, policies=...)``; see the module docstring.

    ``policies`` gives one :class:`LegPolicy` per target (default: all
    required, no timeout)."""

    def __init__(
        self,
        local: Transport,
        *targets: Transport,
        origin: str | None = None,
        policies: Sequence[LegPolicy] | None = None,
    ) -> None:
        if not targets:
            raise ConfigError("a composite needs a local leg and at least one target")
        for leg in (local, *targets):
            if not isinstance(leg, Forwarding):
                raise ConfigError(f"{leg.name} cannot be a composite leg: it has no forward()")
        policies = list(policies) if policies is not None else [LegPolicy()] * len(targets)
        if len(policies) != len(targets):
            raise ConfigError(f"{len(policies)} leg policies for {len(targets)} targets")
        super().__init__(origin=origin)
        self.local = local
        self.targets = targets
        self.policies = tuple(policies)
        self.name = "composite(" + ", ".join(t.name for t in (local, *targets)) + ")"
        self.capabilities = _combine(local.capabilities, [t.capabilities for t in targets])
        self._durable = next((t for t in targets if t.capabilities.consumer_offsets), None)
        self.durable_index = targets.index(self._durable) if self._durable is not None else -1
        """Which target is the durable one (-1: none)."""
        if self._durable is not None and not self.policies[self.durable_index].required:
            raise ConfigError(
                f"the durable target {self._durable.name} cannot be optional: publish returns "
                "its offset and durable subscriptions read it; drop composite_required=false"
            )
        self._stats = [
            LegStats(t.name, p.required, p.timeout)
            for t, p in zip(targets, self.policies, strict=True)
        ]
        self._failing: set[int] = set()
        self.unsure: dict[str, None] = {}
        """Ids of publishes here that failed or were cancelled before every
        required target answered: a target may have stored them after all, so
        a copy coming back from one is delivered, not dropped as an echo."""
        self.pending: dict[str, None] = {}
        """Ids of publishes in flight: a copy from the durable target (which
        has stored it) is delivered; subscribers drop the local one after it."""
        self.kept_by_durable = _Either(self.pending, self.unsure)
        self.echo_readers: set[Subscription] = set()
        """Subscriptions to the durable target that can pass over our own rows."""

    # -- publishing ----------------------------------------------------------

    async def send(self, event: Event, body: bytes) -> Event:
        stored = (await self._to_targets([(event, body)]))[0]
        await _send(self.local, [(stored, body)])
        return stored

    async def send_batch(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        stored = await self._to_targets(batch)
        await _send(self.local, [(e, body) for e, (_, body) in zip(stored, batch, strict=True)])
        return stored

    async def _to_targets(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        """Hand ``batch`` to every target; the events as the durable one stored them."""
        pending = self.pending
        for event, _ in batch:
            pending[event.id] = None
        try:
            stored = await self._store(batch)
        except BaseException:
            # Failed or cancelled: whether a target stored it is unknown. If
            # one did, its copy is delivered here (like everywhere else).
            unsure = self.unsure
            for event, _ in batch:
                unsure[event.id] = None
            while len(unsure) > RECENT_IDS:
                del unsure[next(iter(unsure))]
            raise
        finally:
            for event, _ in batch:
                pending.pop(event.id, None)
        if self.echo_readers:
            first, last = stored[0].offset, stored[-1].offset
            if first is not None and last is not None and last - first == len(stored) - 1:
                for sub in self.echo_readers:
                    assert isinstance(sub, SkipsOwn)
                    sub.skip_own(first, last)
        return stored

    async def _store(self, batch: list[tuple[Event, bytes]]) -> list[Event]:
        targets = self.targets
        if len(targets) == 1:
            results: list[list[Event] | BaseException] = [await self._attempt(0, batch)]
        else:
            results = await asyncio.gather(*(self._attempt(i, batch) for i in range(len(targets))))
        failed = [
            i
            for i, r in enumerate(results)
            if isinstance(r, BaseException) and self._stats[i].required
        ]
        if failed:
            ok = tuple(
                t.name
                for t, r in zip(targets, results, strict=True)
                if not isinstance(r, BaseException)
            )
            names = ", ".join(f"{targets[i].name} ({_why(results[i])})" for i in failed)
            first = results[failed[0]]
            assert isinstance(first, BaseException)
            raise PublishError(
                f"publish to {batch[0][0].topic!r} failed on {names}; succeeded on "
                f"{list(ok) or 'none'}; not delivered in-process now (if a target stored it, "
                "subscribers here get it from that target). Retry: PublishError.events holds "
                "the events, which forward() sends again with the same ids",
                succeeded=ok,
                events=tuple(event for event, _ in batch),
            ) from first
        durable = results[self.durable_index] if self.durable_index >= 0 else None
        return durable if isinstance(durable, list) else [event for event, _ in batch]

    async def _attempt(
        self, index: int, batch: list[tuple[Event, bytes]]
    ) -> list[Event] | BaseException:
        target, stats = self.targets[index], self._stats[index]
        timeout = stats.timeout
        scope: asyncio.Timeout | None = None
        try:
            if timeout is None:
                stored = await _send(target, batch)
            else:
                async with asyncio.timeout(timeout) as scope:
                    stored = await _send(target, batch)
        except Exception as raised:
            stats.failed += 1
            error: Exception = raised
            if scope is not None and scope.expired():
                stats.timed_out += 1
                error = TimeoutError(f"no answer within composite_timeout={timeout:g}s")
            stats.last_error = _why(error)
            if not stats.required and index not in self._failing:
                self._failing.add(index)
                log.warning(
                    "%s: optional target %s failed (%s); counting failures in leg_stats "
                    "until it accepts again",
                    self.name,
                    target.name,
                    stats.last_error,
                )
            return error
        stats.accepted += len(batch)
        if index in self._failing:
            self._failing.discard(index)
            log.info("%s: optional target %s accepts events again", self.name, target.name)
        return stored

    @property
    def leg_stats(self) -> list[LegStats]:
        """What each target accepted and failed, in target order."""
        return list(self._stats)

    # -- subscribing -----------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
    ) -> Subscription:
        sub = super().subscribe(pattern, consumer=consumer, start=start, buffer=buffer)
        if sub.transport is not self:
            self.forget(sub)  # the durable target's own: it tracks (and closes) it
        return sub

    def make_subscription(
        self, pattern: str, *, consumer: str | None, start: Start, buffer: int
    ) -> Subscription:
        if consumer is not None or start != "new":
            assert self._durable is not None  # the base checked the capabilities
            return self._durable.subscribe(pattern, consumer=consumer, start=start, buffer=buffer)
        return CompositeSubscription(self, pattern, buffer=buffer)

    @property
    def max_payload_bytes(self) -> int:
        """The smallest limit of any leg: an event must fit on all of them."""
        return min(leg.max_payload_bytes for leg in (self.local, *self.targets))

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        # The legs' limits decide; BaseTransport's default is ignored here.
        pass

    @property
    def max_deliveries(self) -> int:
        """The durable target's dead-letter threshold."""
        limit = max_deliveries_of(self._durable)
        return DEFAULT_MAX_DELIVERIES if limit is None else limit

    async def disconnect(self) -> None:
        for leg in (self.local, *self.targets):
            await leg.close()


async def _send(leg: Transport, batch: list[tuple[Event, bytes]]) -> list[Event]:
    """Put checked events on ``leg``: through its send hooks when it is a
    BaseTransport (the composite checked them against every leg's limits, so
    they are not encoded again), else through ``forward``."""
    if isinstance(leg, BaseTransport):
        leg.check_open()
        if len(batch) == 1:
            return [await leg.send(*batch[0])]
        return await leg.send_batch(batch)
    assert isinstance(leg, Forwarding)  # checked in CompositeTransport.__init__
    return [await leg.forward(event) for event, _ in batch]


def _why(error: object) -> str:
    return f"{type(error).__name__}: {error}"


async def open_composite(urls: Sequence[str], settings: Settings) -> CompositeTransport:
    """Open every leg of ``urls`` (local first) and combine them."""
    from alkpubsub.registry import open_transport

    if len(urls) < 2:
        raise ConfigError(f"a composite needs at least two URLs, got {list(urls)!r}")
    if has_policy(urls[0]):
        raise ConfigError(
            "composite_required/composite_timeout apply to targets, not to the local leg "
            f"{urls[0].split('?', 1)[0]!r}"
        )
    misplaced = sorted(set(settings.options) & set(OPTIONS))
    if misplaced:
        raise ConfigError(
            f"Settings.options {misplaced[0]!r} is not read: put composite_required and "
            "composite_timeout on each target's URL (or set Settings.composite_timeout)"
        )
    default = settings.composite_timeout or None
    split = [split_policy(url, default) for url in urls[1:]]
    # The composite's origin marks its own publishes (echoes are dropped by it);
    # each leg keeps a distinct one, so events its store writes (tx.publish)
    # are not taken for echoes.
    leg_settings = settings.model_copy(update={"origin": None})
    legs: list[Transport] = []
    try:
        for url in [urls[0], *(leg_url for leg_url, _ in split)]:
            legs.append(await open_transport(url, leg_settings))
        return CompositeTransport(
            legs[0], *legs[1:], origin=settings.origin, policies=[p for _, p in split]
        )
    except BaseException:
        for leg in legs:
            await leg.close()
        raise
