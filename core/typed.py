"""Typed topics on top of any transport.

``PubSub(transport).topic("call:{request_id}", CallEvent)`` gives a handle
whose ``publish`` takes a model (and the template's fields) and whose
subscriptions yield models. Templates fill ``{name}`` placeholders, one per
segment; a subscription that leaves a placeholder out matches it with ``*``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

from .capabilities import Start
from .errors import ConfigError, InvalidTopic, PayloadError
from .event import Event
from .topics import SEPARATOR, compile_pattern, validate_topic
from .transport import DEFAULT_BUFFER, Subscription, Transport

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("alkpubsub")
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PubSub:
    """A typed facade over one transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def topic(self, template: str, model: type[M]) -> TypedTopic[M]:
        """A typed handle for ``template`` (e.g. ``"graph:created"`` or ``"call:{id}"``)."""
        return TypedTopic(self.transport, template, model)

    async def close(self) -> None:
        """Close the underlying transport."""
        await self.transport.close()


class TypedTopic(Generic[M]):
    """Publish and subscribe models of one type on a topic template."""

    def __init__(self, transport: Transport, template: str, model: type[M]) -> None:
        self.transport = transport
        self.template = template
        self.model = model
        # Not string.Formatter: it raises a bare ValueError on a stray brace.
        self.fields = _FIELD.findall(template)
        for segment in template.split(":"):
            if "{" in segment and not _FIELD.fullmatch(segment):
                raise ConfigError(
                    f"topic template {template!r}: a placeholder must fill a whole segment, "
                    f"as in 'call:{{request_id}}', not {segment!r}"
                )
        # Validate the literal part now, with placeholders filled by a sample value.
        compile_pattern(self._fill({f: "x" for f in self.fields}))

    def _fill(self, values: dict[str, str]) -> str:
        for name, value in values.items():
            # A ':' would spread one field over several segments, and the event
            # would miss subscribers that match that field with '*'.
            if SEPARATOR in value:
                raise InvalidTopic(
                    f"topic {self.template!r}: {name}={value!r} contains {SEPARATOR!r}; "
                    "a field fills exactly one segment"
                )
        return _FIELD.sub(lambda m: values[m.group(1)], self.template)

    def topic_for(self, **values: str) -> str:
        """The concrete topic for ``values``; every placeholder must be given."""
        missing = [f for f in self.fields if f not in values]
        extra = sorted(set(values) - set(self.fields))
        if missing or extra:
            raise ConfigError(
                f"topic {self.template!r} needs {self.fields or 'no fields'}; "
                f"missing {missing}, unexpected {extra}"
            )
        return validate_topic(self._fill({k: str(v) for k, v in values.items()}))

    def pattern_for(self, **values: str) -> str:
        """A pattern where omitted placeholders match any one segment."""
        extra = sorted(set(values) - set(self.fields))
        if extra:
            raise ConfigError(f"topic {self.template!r} has no field(s) {extra}")
        return self._fill({f: str(values.get(f, "*")) for f in self.fields})

    async def publish(
        self, item: M, *, headers: dict[str, str] | None = None, **values: str
    ) -> Event:
        """Publish ``item`` (validated against the model) to the topic for ``values``."""
        if not isinstance(item, self.model):
            try:
                item = self.model.model_validate(item)
            except ValidationError as exc:
                raise PayloadError(
                    f"payload for {self.template!r} is not a valid {self.model.__name__}: "
                    f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
                ) from None
        topic = self.topic_for(**values)
        return await self.transport.publish(topic, item.model_dump(mode="json"), headers=headers)

    def subscribe(
        self,
        *,
        consumer: str | None = None,
        start: Start = "new",
        buffer: int = DEFAULT_BUFFER,
        **values: str,
    ) -> TypedSubscription[M]:
        """Subscribe; yields models. Omitted fields match any value."""
        sub = self.transport.subscribe(
            self.pattern_for(**values), consumer=consumer, start=start, buffer=buffer
        )
        return TypedSubscription(sub, self.model)


class TypedSubscription(Generic[M]):
    """Yields validated models. ``current`` is the event behind the last one;
    ``ack()``/``nack()`` act on it. An event whose payload fails validation is
    counted in ``stats.malformed``, logged once, nacked (so a durable transport
    dead-letters it after ``max_deliveries``) and skipped."""

    def __init__(self, sub: Subscription, model: type[M]) -> None:
        self.subscription = sub
        self.model = model
        self.current: Event | None = None
        self._warned = False

    async def __aenter__(self) -> Self:
        await self.subscription.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.subscription.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> M:
        while True:
            event = await self.subscription.__anext__()
            try:
                item = self.model.model_validate(event.payload)
            except ValidationError as exc:
                self.subscription.stats.malformed += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "event %s on %r is not a valid %s (%s); skipped",
                        event.id,
                        event.topic,
                        self.model.__name__,
                        exc.errors()[0]["msg"],
                    )
                await self.subscription.nack(event)
                continue
            self.current = event
            return item

    async def get(self, timeout: float | None = None) -> M:
        """The next model, waiting at most ``timeout`` seconds."""

        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def ack(self) -> None:
        """Acknowledge the event behind the last model."""
        if self.current is not None:
            await self.subscription.ack(self.current)

    async def nack(self, *, delay: float = 0) -> None:
        """Ask for the event behind the last model to be delivered again."""
        if self.current is not None:
            await self.subscription.nack(self.current, delay=delay)

    @property
    def stats(self) -> Any:
        """The underlying subscription's stats."""
        return self.subscription.stats

    async def close(self) -> None:
        """Close the underlying subscription."""
        await self.subscription.close()
