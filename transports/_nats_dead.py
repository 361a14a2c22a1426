"""Dead letters of ``nats+durable://``: an event that used up its deliveries,
or a message that is not one, stored at ``dead:<topic>`` (subject
``<stream>.dead.<topic>``) through :func:`alkpubsub.deadletter.dead_letter`,
with the dead letter's deterministic id as ``Nats-Msg-Id`` so that burying
again after a crash is deduplicated by the server."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from alkpubsub.deadletter import dead_letter
from alkpubsub.errors import ConnectionLost, PayloadError, PublishError
from alkpubsub.event import Event
from alkpubsub.topics import is_dead_letter
from alkpubsub.transport import Subscription

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from .nats_durable import NatsDurableTransport

log = logging.getLogger("alkpubsub.nats")


async def bury(
    transport: NatsDurableTransport,
    sub: Subscription,
    msg: Msg,
    *,
    reason: str,
    deliveries: int,
    event: Event | None = None,
    topic: str | None = None,
) -> None:
    """Store the dead letter of ``event`` (or of the raw message, arrived on
    ``topic``) at ``dead:<topic>`` (:func:`alkpubsub.deadletter.dead_letter`),
    then ack the original. Its id is deterministic and is its ``Nats-Msg-Id``:
    burying again after a crash is deduplicated by the server."""
    seq = msg.metadata.sequence.stream
    letter, body = dead_letter(
        topic=event.topic if event is not None else topic or "",
        reason=reason,
        origin=transport.origin,
        event=event,
        raw=None if event is not None else msg.data,
        deliveries=deliveries,
        consumer=sub.consumer,
        offset=seq,
    )
    subject = transport.subject(letter.topic)
    try:
        try:
            await transport.writer.store(subject, letter.envelope(body), letter.id)
        except PayloadError:
            # Too large for the stream with its reasons: keep the reasons.
            letter = letter.model_copy(
                update={
                    "payload": None,
                    "headers": {**letter.headers, "x-dead-payload": "dropped: too large"},
                }
            )
            await transport.writer.store(subject, letter.envelope(b"null"), letter.id)
    except (PublishError, ConnectionLost, PayloadError) as exc:
        # Left unacked: redelivered after ack_wait and buried then.
        log.error("%s: cannot dead-letter %s (%s); will retry", transport.name, seq, exc)
        return
    await msg.ack()
    sub.stats.dead_lettered += 1
    transport.log_once(
        "dead", "%s: stream sequence %s went to %s (%s)", transport.name, seq, letter.topic,
        letter.headers["x-dead-reason"],
    )  # fmt: skip


async def bury_malformed(
    transport: NatsDurableTransport,
    sub: Subscription,
    msg: Msg,
    topic: str | None,
    detail: str,
    kind: str = "envelope",
) -> None:
    """Count a message that is not an event; dead-letter its raw text when named.
    ``topic`` is the topic of the subject it arrived on (None: not a topic's)."""
    transport.report_malformed(sub, kind, f"on {msg.subject!r}: {detail}")
    if sub.consumer is None:
        return
    if topic is not None and is_dead_letter(topic):
        # A dead letter is never dead-lettered again; garbage on a dead-letter
        # subject can never become an event: end it (counted, logged).
        await msg.term()
        return
    await bury(
        transport, sub, msg, reason=f"malformed: {detail}", deliveries=msg.metadata.num_delivered,
        topic=topic,
    )  # fmt: skip
