"""Command line: ``alkpubsub pub|sub|replay|stats|relay|hub|bench|doctor``.

Every command takes ``--url`` (repeat it for a composite) or reads
``ALKPUBSUB_URL``; the default is ``honker:///./alkpubsub.db``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .abilities import ConsumerStatsSource
from .config import Settings, redact_url
from .errors import ConfigError, PubSubError
from .event import Event
from .registry import connect
from .transport import Transport

if TYPE_CHECKING:
    from alkpubsub.hub import Grant


def _settings(args: argparse.Namespace) -> Settings:
    if args.url:
        return Settings.load(url=args.url if len(args.url) > 1 else args.url[0])
    return Settings.load()


def _print_event(event: Event) -> None:
    print(event.model_dump_json(exclude_none=True), flush=True)


def _start(text: str) -> int | str:
    return int(text) if text.isdigit() else text


async def cmd_pub(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.json)
    except json.JSONDecodeError as exc:
        print(f"error: JSON argument is not valid JSON ({exc}); quote it: '{{\"a\": 1}}'")
        return 2
    headers = dict(h.split("=", 1) for h in args.header or [])
    async with await connect(_settings(args)) as transport:
        event = await transport.publish(args.topic, payload, headers=headers)
        print(event.id)
    return 0


async def _tail(transport: Transport, args: argparse.Namespace, *, start: int | str) -> int:
    seen = 0
    sub = transport.subscribe(args.pattern, consumer=args.consumer, start=start)  # type: ignore[arg-type]
    async with sub:
        while args.count is None or seen < args.count:
            try:
                event = await sub.get(timeout=args.idle)
            except TimeoutError:
                if args.idle is not None:
                    break
                continue
            _print_event(event)
            await sub.ack(event)
            seen += 1
    return 0


async def cmd_sub(args: argparse.Namespace) -> int:
    async with await connect(_settings(args)) as transport:
        return await _tail(transport, args, start=_start(args.start))


async def cmd_replay(args: argparse.Namespace) -> int:
    args.idle = args.idle if args.idle is not None else 1.0
    async with await connect(_settings(args)) as transport:
        return await _tail(transport, args, start=_start(args.start))


async def cmd_stats(args: argparse.Namespace) -> int:
    async with await connect(_settings(args)) as transport:
        if not isinstance(transport, ConsumerStatsSource):
            print(f"{transport.name}: no named consumers (ephemeral transport)")
            return 0
        rows = await transport.consumer_stats()
        if not rows:
            print(f"{transport.name}: no consumers yet")
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.as_dict().items()))
        await _print_relays(transport)
    return 0


async def _print_relays(transport: Transport) -> None:
    """The counters outbox relays on this Honker file persisted beside it."""
    from alkpubsub.storage.outbox_relay import StoreBacked
    from alkpubsub.storage.relay_stats import read_stats

    if not isinstance(transport, StoreBacked):
        return
    store = await transport.open_store()
    now = time.time()
    for record in read_stats(store.path):
        fields = ["consumer", "active", "pid", "forwarded", "duplicates", "retried", "refused"]
        fields += ["batches", "lag", "target"]
        line = [f"relay={record.get('consumer')}"]
        line += [f"{k}={record.get(k)}" for k in fields[1:] if record.get(k) is not None]
        updated = record.get("updated_at")
        if isinstance(updated, (int, float)):
            line.append(f"updated={max(now - updated, 0):.1f}s_ago")
        if record.get("gone"):
            line.append("(its process is gone)")
        if record.get("last_error"):
            line.append(f"last_error={record['last_error']!r}")
        print("  ".join(line))


async def cmd_relay(args: argparse.Namespace) -> int:
    import signal

    from alkpubsub.storage.outbox_relay import OutboxRelay

    source_url, target_url = getattr(args, "from"), args.to
    source = await connect(source_url)
    try:
        target = await connect(target_url)
    except BaseException:
        await source.close()
        raise

    def state(active: bool, detail: str) -> None:
        print(f"relay {args.consumer}: {detail}", flush=True)

    relay = OutboxRelay(
        source,
        target,
        pattern=args.pattern,
        consumer=args.consumer,
        batch=args.batch,
        on_state=state,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"relay {args.consumer}: {redact_url(source_url)} -> {redact_url(target_url)} "
        f"(pattern {args.pattern!r}, batch {args.batch}, pid {os.getpid()})",
        flush=True,
    )
    try:
        await relay.run(stop=stop, limit=args.count)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stats = relay.stats
        print(
            f"relay {args.consumer}: stopped; forwarded={stats.forwarded} "
            f"duplicates={stats.duplicates} refused={stats.refused} retried={stats.retried} "
            f"batches={stats.batches}",
            flush=True,
        )
        await source.close()
        await target.close()
    return 0


HUB_TOKENS_ENV = "ALKPUBSUB_HUB_TOKENS"
"""Token specs for ``alkpubsub hub``, separated by whitespace or newlines."""


def _hub_token_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(where it came from, spec)`` for every token given to ``alkpubsub hub``."""
    specs = [(f"--token #{i}", spec) for i, spec in enumerate(args.token or [], 1)]
    for path in args.tokens_file or []:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--tokens-file {path}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                specs.append((f"{path} line {number}", line))
    env = os.environ.get(HUB_TOKENS_ENV, "")
    specs += [(f"{HUB_TOKENS_ENV} #{i}", s) for i, s in enumerate(env.split(), 1)]
    return specs


def hub_grants(args: argparse.Namespace) -> dict[str, Grant]:
    """The ``{token: Grant}`` table of ``alkpubsub hub``; :class:`ConfigError`
    naming the spec's origin (never the token) when one is malformed."""
    from alkpubsub.hub import grants_from_spec

    table: dict[str, Grant] = {}
    origin: dict[str, str] = {}
    for where, spec in _hub_token_specs(args):
        token, eq, rest = spec.partition("=")
        if not eq or not token or not rest or rest.startswith(";"):
            raise ConfigError(f"{where}: write TOKEN=TENANT[;pub=P,P...][;sub=P,P...]")
        try:
            [(token, grant)] = grants_from_spec([spec]).items()
        except PubSubError as exc:
            # The messages name the tenant or pattern at fault, never the token.
            raise ConfigError(f"{where}: {str(exc).removeprefix('--token ')}") from None
        if token in table:
            raise ConfigError(f"{where} repeats the token of {origin[token]}")
        if len(token) < 16:
            raise ConfigError(
                f"{where}: a hub token needs at least 16 characters (secrets.token_urlsafe())"
            )
        table[token], origin[token] = grant, where
    if not table:
        raise ConfigError(
            f"no tokens: give --token=TOKEN=TENANT[;pub=..][;sub=..], --tokens-file PATH "
            f"or {HUB_TOKENS_ENV}"
        )
    return table


def _listen(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: write HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


async def cmd_hub(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    try:
        import uvicorn

        from alkpubsub.hub import Hub, tokens
    except ImportError as exc:
        raise ConfigError(
            f"alkpubsub hub needs the 'ws' extra ({exc.name} is missing): "
            "pip install 'alkpubsub[ws]'"
        ) from None

    from .config import parse_url
    from .registry import resolve

    url = args.url or os.environ.get("ALKPUBSUB_URL")
    if not url:
        raise ConfigError(
            "give the backend with --url (or ALKPUBSUB_URL), with {tenant} in it, "
            "e.g. 'honker+durable:///data?tenant={tenant}'"
        )
    host, port = _listen(args.listen)
    table = hub_grants(args)
    resolve(parse_url(url.replace("{tenant}", "check")).scheme)  # a bad scheme fails now
    hub = Hub(url, auth=tokens(table), slow_timeout=args.slow_timeout)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the hub's own handlers below: close the hub first, then stop

    config = uvicorn.Config(
        hub,
        host=host,
        port=port,
        ws="websockets-sansio",
        lifespan="off",
        log_level=args.log_level,
        access_log=False,
    )
    from alkpubsub.hub.logs import SERVER_LOGGERS, protect

    protect(SERVER_LOGGERS)
    server = Server(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def stop(signame: str) -> None:
        # Stop listening first: a spoke reconnecting now gets "connection
        # refused" and retries, instead of reaching a hub that is closing.
        for listener in server.servers:
            listener.close()
        print(f"hub: {signame}: closing {hub.connections} spoke connection(s) (4503)", flush=True)
        try:
            await hub.close()
        finally:
            server.should_exit = True

    def on_signal(sig: signal.Signals) -> None:
        if stopping:
            server.force_exit = True  # a second signal: stop now
            return
        stopping.append(asyncio.create_task(stop(sig.name)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    tenants = sorted({grant.tenant for grant in table.values()})

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way of saying it could not start
            raise ConfigError(f"the hub did not start on {args.listen} (see above)") from None

    try:
        serving = asyncio.create_task(serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has only a flag)
            await asyncio.sleep(0.01)
        if serving.done():
            await serving  # raises why it did not start
            raise ConfigError(f"the hub did not start on {args.listen}")
        bound = [s.getsockname()[:2] for srv in server.servers for s in srv.sockets]
        where = ", ".join(f"ws://{h if ':' not in h else f'[{h}]'}:{p}" for h, p in bound)
        print(
            f"hub: serving {redact_url(url)} on {where} "
            f"({len(table)} token(s), tenants {', '.join(tenants)}; pid {os.getpid()})",
            flush=True,
        )
        await serving
        for task in stopping:
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await hub.close()
    print("hub: stopped", flush=True)
    return 0


async def measure(transport: Transport, count: int) -> dict[str, float]:
    """Publish->receive throughput and 1-in-flight latency on ``transport``."""
    topic = f"alkpubsub:bench:{time.monotonic_ns()}"
    async with transport.subscribe(topic, buffer=count + 1) as sub:
        t0 = time.perf_counter()
        await transport.publish_many([(topic, {"i": i}) for i in range(count)])
        for _ in range(count):
            await sub.get(timeout=30)
        rate = count / (time.perf_counter() - t0)
        samples = []
        for i in range(min(count, 1000)):
            t1 = time.perf_counter()
            await transport.publish(topic, {"i": i})
            await sub.get(timeout=30)
            samples.append(time.perf_counter() - t1)
    samples.sort()
    return {
        "events_per_s": rate,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


async def cmd_bench(args: argparse.Namespace) -> int:
    async with await connect(_settings(args)) as transport:
        result = await measure(transport, args.count)
    print(
        f"{transport.name}: {result['events_per_s']:,.0f} events/s publish->receive, "
        f"latency p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us"
    )
    print("(for figures next to the raw clients, run `make bench` in a checkout)")
    return 0


async def cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from .config import parse_url
    from .registry import resolve

    ok = True
    for url in settings.urls:
        print(f"url: {redact_url(url)}")
        try:
            resolve(parse_url(url).scheme)
            print("  transport module: ok")
        except PubSubError as exc:
            print(f"  transport module: FAILED: {exc}")
            ok = False
    if not ok:
        return 1
    try:
        async with await connect(settings) as transport:
            print(f"  connected: {transport.name}")
            print(f"  capabilities: {', '.join(transport.capabilities.names()) or 'none'}")
            result = await measure(transport, 50)
            print(f"  publish->receive: ok, p50 {result['p50_us']:.0f} us")
    except PubSubError as exc:
        print(f"  FAILED: {type(exc).__name__}: {exc}")
        return 1
    print("all good")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    top = argparse.ArgumentParser(prog="alkpubsub", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", action="append", help="transport URL (repeat for a composite); ALKPUBSUB_URL"
    )
    cmds = top.add_subparsers(dest="command", required=True)

    p = cmds.add_parser("pub", parents=[common], help="publish one event")
    p.add_argument("topic")
    p.add_argument("json", help="payload as JSON text")
    p.add_argument("--header", action="append", metavar="K=V")
    p.set_defaults(run=cmd_pub)

    for name, run, help_text, default_start in (
        ("sub", cmd_sub, "print events as they arrive (tail)", "new"),
        ("replay", cmd_replay, "print stored events from a position", "earliest"),
    ):
        p = cmds.add_parser(name, parents=[common], help=help_text)
        p.add_argument("pattern", nargs="?", default=">")
        p.add_argument("--consumer", help="durable consumer name (progress is saved)")
        p.add_argument("--start", default=default_start, help="new | earliest | OFFSET")
        p.add_argument("--count", type=int, help="stop after N events")
        p.add_argument("--idle", type=float, help="stop after S seconds without events")
        p.set_defaults(run=run)

    p = cmds.add_parser("stats", parents=[common], help="consumers, offsets and lag")
    p.set_defaults(run=cmd_stats)

    p = cmds.add_parser("relay", help="forward committed events to a broker (outbox relay)")
    p.add_argument("--from", required=True, help="durable source, e.g. honker+durable:///app.db")
    p.add_argument("--to", required=True, help="target, e.g. nats+durable://host:4222")
    p.add_argument("--pattern", default=">")
    p.add_argument("--consumer", default="outbox-relay", help="the relay's durable consumer")
    p.add_argument("--batch", type=int, default=256, help="events per forwarded batch")
    p.add_argument("--count", type=int, help="stop after N events")
    p.set_defaults(run=cmd_relay)

    p = cmds.add_parser(
        "hub",
        help="serve a transport per tenant to ws:// spokes (docs/hub.md)",
        description="Serve one transport per tenant over WebSocket to ws:// spokes; "
        "SIGTERM or SIGINT closes every spoke connection with 4503 (they reconnect) "
        "and stops. Tokens are never printed.",
    )
    p.add_argument(
        "--url",
        help="backend with {tenant} in it, e.g. 'honker+durable:///data?tenant={tenant}'; "
        "ALKPUBSUB_URL",
    )
    p.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT (default %(default)s)")
    p.add_argument(
        "--token",
        action="append",
        metavar="TOKEN=TENANT[;pub=P,..][;sub=P,..]",
        help="a token and what it may do (patterns default to >); repeat it. Prefer "
        f"--tokens-file or {HUB_TOKENS_ENV}, which keep tokens off the command line",
    )
    p.add_argument(
        "--tokens-file",
        action="append",
        metavar="PATH",
        help="token specs, one per line (# comments)",
    )
    p.add_argument(
        "--slow-timeout",
        type=float,
        default=10.0,
        help="seconds a spoke may stay behind before it is disconnected (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default %(default)s)",
    )
    p.set_defaults(run=cmd_hub)

    p = cmds.add_parser("bench", parents=[common], help="measure this deployment")
    p.add_argument("--count", type=int, default=10_000)
    p.set_defaults(run=cmd_bench)

    p = cmds.add_parser("doctor", parents=[common], help="check configuration and connectivity")
    p.set_defaults(run=cmd_doctor)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alkpubsub`` command."""
    args = parser().parse_args(argv)
    try:
        return int(asyncio.run(args.run(args)))
    except PubSubError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
