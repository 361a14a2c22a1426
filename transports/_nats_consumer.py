"""The JetStream consumer a ``nats+durable://`` subscription reads: its config,
creating it or bringing an existing one to our settings, and what it tells a
member about how many deliveries it may hold unacked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alkpubsub.capabilities import Start
from alkpubsub.errors import ConfigError
from alkpubsub.topics import compile_pattern

from ._nats_common import escape_name

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import ConsumerConfig, ConsumerInfo


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """The transport's settings that shape its consumers."""

    label: str  # the transport's name, for logs
    stream: str
    subjects: str  # the stream's subjects: the filter of a consumer without one
    ack_wait: float
    max_ack_pending: int
    prefetch: int
    max_deliveries: int
    inactive_threshold: float  # anonymous consumers are removed after this idle time


class Consumer:
    """A named (durable, explicit acks) or anonymous (ephemeral, no acks)
    consumer filtered by one pattern's subject."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        consumer: str | None,
        pattern: str,
        filter_subject: str,
        start: Start,
        log_once: Callable[..., None],
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.durable = consumer is not None
        if consumer is not None:
            self.name = escape_name(consumer)
        else:
            from nats.nuid import NUID

            self.name = "anon-" + NUID().next().decode()
        self.pattern = pattern
        self.filter_subject = filter_subject
        self.start = start
        self._log_once = log_once
        self.hold = settings.prefetch
        """Most deliveries a member holds unacked (set from the consumer's own limits)."""
        self.ack_wait = settings.ack_wait
        """The consumer's ack_wait as the server has it."""
        self.next_seq: int | None = None
        """Past the newest stream sequence seen, to re-create a lost consumer from."""

    def config(self) -> ConsumerConfig:
        """The consumer's config for creating it."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        settings, start = self.settings, self.start
        config = ConsumerConfig(filter_subject=self.filter_subject)
        if start == "new":
            config.deliver_policy = DeliverPolicy.NEW
        elif isinstance(start, int) and start > 1:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start
        else:
            config.deliver_policy = DeliverPolicy.ALL
        if self.durable:
            config.durable_name = self.name
            config.ack_policy = AckPolicy.EXPLICIT
            config.ack_wait = settings.ack_wait
            config.max_ack_pending = settings.max_ack_pending
            # One delivery past the limit, so a consumer that died holding the
            # event still sees it and can dead-letter it. Dead letters are never
            # dead-lettered again but redelivered: no limit where they are read.
            sees_dead = compile_pattern(self.pattern).sees_dead
            config.max_deliver = -1 if sees_dead else settings.max_deliveries + 1
        else:
            config.name = self.name
            config.ack_policy = AckPolicy.NONE
            config.inactive_threshold = settings.inactive_threshold
        return config

    async def ensure(self, js: JetStreamContext) -> None:
        """Create the consumer, or check that an existing one follows this pattern.

        A consumer that vanished after we read from it (deleted, or a memory
        stream lost in a restart) is re-created from the next sequence we have
        not seen, or from the start when the stream itself is new.
        """
        from nats.js.api import DeliverPolicy
        from nats.js.errors import BadRequestError, NotFoundError

        stream = self.settings.stream
        for _ in range(3):
            if self.durable or self.next_seq is not None:
                try:
                    info = await js.consumer_info(stream, self.name)
                except NotFoundError:
                    pass
                else:
                    self._check_filter(info.config.filter_subject or self.settings.subjects)
                    if self.durable:
                        info = await self._reconcile(js, info)
                    self._adopt(info)
                    return
            config = self.config()
            if self.next_seq is not None:
                state = (await js.stream_info(stream)).state
                if 1 < self.next_seq <= state.last_seq + 1:
                    config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                    config.opt_start_seq = self.next_seq
                else:
                    config.deliver_policy, config.opt_start_seq = DeliverPolicy.ALL, None
                self._log_once(
                    f"vanished:{self.name}",
                    "%s: consumer %s was gone; re-created from stream sequence %s",
                    self.settings.label, self.name, config.opt_start_seq or 1,
                )  # fmt: skip
            try:
                info = await js.add_consumer(stream, config)
            except BadRequestError:
                continue  # created meanwhile by another member with other settings
            self._adopt(info)
            return
        raise ConfigError(f"cannot create consumer {self.consumer!r} on stream {stream!r}")

    async def _reconcile(self, js: JetStreamContext, info: ConsumerInfo) -> ConsumerInfo:
        """Give an existing consumer this URL's ack_wait, max_ack_pending and
        max_deliver. Creating it applied them; for one made earlier (by an older
        version, or with other options) nothing would: nats-py's pull_subscribe
        does not reconcile, and a consumer left at max_ack_pending=1000 stalls.
        nats-server (2.9) updates these three in place when asked to create the
        consumer again. The last member to open sets them."""
        from nats.js.errors import APIError

        have, want = info.config, self.config()
        old = (have.ack_wait, have.max_ack_pending, have.max_deliver)
        new = (want.ack_wait, want.max_ack_pending, want.max_deliver)
        if old == new:
            return info
        config = have.evolve(
            ack_wait=want.ack_wait, max_ack_pending=want.max_ack_pending,
            max_deliver=want.max_deliver,
        )  # fmt: skip
        label, what = self.settings.label, "(ack_wait, max_ack_pending, max_deliver)"
        try:
            updated = await js.add_consumer(self.settings.stream, config)
        except APIError as exc:
            self._log_once(
                f"keep:{self.name}", "%s: consumer %s keeps %s=%s, the server refused %s: %s",
                label, self.name, what, old, new, exc,
            )  # fmt: skip
            return info
        self._log_once(
            f"update:{self.name}", "%s: consumer %s had %s=%s; set to %s",
            label, self.name, what, old, new,
        )  # fmt: skip
        return updated

    def _adopt(self, info: ConsumerInfo) -> None:
        """Hold limits from the consumer as the server has it: at most half its
        max_ack_pending, so one dead member never stops the others."""
        limit = info.config.max_ack_pending or 0
        prefetch = self.settings.prefetch
        self.hold = min(prefetch, max(1, limit // 2)) if limit > 0 else prefetch
        self.ack_wait = info.config.ack_wait or self.settings.ack_wait
        self.seen(info.delivered.stream_seq if info.delivered else 0)

    def _check_filter(self, have: str) -> None:
        if have != self.filter_subject:
            raise ConfigError(
                f"consumer {self.consumer!r} on stream {self.settings.stream!r} already "
                f"follows {have!r}, not {self.filter_subject!r} (pattern {self.pattern!r}); "
                "a consumer name follows one pattern: use another consumer name, or delete "
                "the consumer"
            )

    def seen(self, seq: int) -> None:
        """Note that stream sequence ``seq`` was delivered."""
        if self.next_seq is None or seq >= self.next_seq:
            self.next_seq = seq + 1
