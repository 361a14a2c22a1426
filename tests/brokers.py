"""Throwaway real Redis and NATS servers for tests.

Every server object owns one ``redis-server`` / ``nats-server`` process bound
to ``127.0.0.1`` on a free port with its own data directory, so tests never
touch the system-wide instances on 6379/4222 and can stop, kill and restart
their broker freely.

The ``redis_server``, ``redis_server_session``, ``nats_server`` and
``nats_server_session`` fixtures are registered by importing them in
tests/conftest.py (``from brokers import ...``) or by loading this file as a
plugin (``pytest_plugins = [...]``).  Pick one module name and use it
everywhere: importing it as both ``brokers`` and ``tests.brokers`` creates two
copies with distinct classes and settings.  :class:`RedisServer` and
:class:`NatsServer` can also be used directly (they are context managers).

Only the standard library and pytest are used: readiness checks and the
helpers below speak RESP / the NATS text protocol over raw sockets, so this
module works before (and independently of) the client libraries under test.

There are no asserts here, so assertion rewriting is switched off with the
marker PYTEST_DONT_REWRITE: when test modules import this file before pytest
loads it as a plugin, pytest would otherwise warn "already imported".
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeAlias
from urllib.parse import quote

import pytest

__all__ = [
    "HOST",
    "BrokerError",
    "BrokerServer",
    "NatsServer",
    "RedisReplyError",
    "RedisServer",
    "RespConnection",
    "RespValue",
    "free_port",
    "in_ci",
    "nats_server",
    "nats_server_session",
    "redis_call",
    "redis_server",
    "redis_server_session",
    "require_binary",
]

HOST = "127.0.0.1"
"""Address every test broker binds to (never the wildcard address)."""

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# How long start() keeps retrying when the port is still held by something
# else, e.g. the previous incarnation during a restart or a racing test.
PORT_RETRY_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 30

_INSTALL_HINTS: dict[str, str] = {
    "redis-server": "apt-get install redis-server",
    "nats-server": "apt-get install nats-server",
}
# Debian installs nats-server into /usr/sbin, which is often not on a
# non-root user's PATH.
_EXTRA_BIN_DIRS = "/usr/sbin:/usr/local/sbin:/sbin"


class BrokerError(RuntimeError):
    """A broker process could not be started or never became ready."""


class RedisReplyError(Exception):
    """Redis answered with an error reply such as ``-NOAUTH ...``."""


class _PortBusy(Exception):
    """The server exited because its port was taken; start() may retry."""


def in_ci() -> bool:
    """Return True when running under CI (``CI=true``), where nothing may skip."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_binary(name: str) -> str:
    """Return the path of the executable ``name`` or end the current test.

    A missing broker binary skips the test locally but fails it under CI, so
    a broken CI image cannot silently turn the broker suites into skips.
    """
    path = shutil.which(name) or shutil.which(name, path=_EXTRA_BIN_DIRS)
    if path is not None:
        return path
    hint = _INSTALL_HINTS.get(name, f"apt-get install {name}")
    message = f"{name} not installed: {hint}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on :data:`HOST` that was free a moment ago.

    Another process can grab it before the broker binds it; start() copes by
    picking a new port when the first bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- RESP (Redis protocol) -------------------------------------------------

RespValue: TypeAlias = str | int | bytes | list["RespValue"] | None
"""A decoded RESP2 reply: simple string, integer, bulk bytes, array or nil."""


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    # Always send the multi-bulk form so arguments may contain spaces/CRLF.
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: Any) -> RespValue:
    line: bytes = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply: {line!r}")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisReplyError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data: bytes = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed mid-reply")
        return data[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply: {line!r}")


class RespConnection:
    """Minimal blocking Redis connection over a raw socket (RESP2 only).

    Meant for readiness probes and for tests that must check broker state
    without going through the client library under test.
    """

    def __init__(
        self,
        port: int,
        *,
        host: str = HOST,
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._stream = self._sock.makefile("rb")
        if password is not None:
            self.call("AUTH", password)

    def call(self, *args: str | bytes | int) -> RespValue:
        """Send one command and return its decoded reply.

        Raises :class:`RedisReplyError` for ``-ERR``-style replies.
        """
        self._sock.sendall(_encode_command(args))
        return _read_reply(self._stream)

    def close(self) -> None:
        """Close the socket."""
        self._stream.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def redis_call(
    port: int,
    *args: str | bytes | int,
    password: str | None = None,
    host: str = HOST,
    timeout: float = 2.0,
) -> RespValue:
    """Open a connection, run one command, close; return the decoded reply."""
    with RespConnection(port, host=host, password=password, timeout=timeout) as conn:
        return conn.call(*args)


# -- process management ------------------------------------------------------

# Strong references so atexit can still reach servers a test forgot to stop,
# and the temp dirs of servers that were never close()d.
_LIVE: set[BrokerServer] = set()
_OWNED_DIRS: set[Path] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        # The interpreter is exiting: one stubborn server must not keep the
        # others alive.
        with contextlib.suppress(Exception):
            server.stop(timeout=3.0)
    # Only after the stops: a server still running would write into them.
    with _LIVE_LOCK:
        dirs = list(_OWNED_DIRS)
        _OWNED_DIRS.clear()
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_stop_all_at_exit)


def _pdeathsig_prefix() -> list[str]:
    """Argv prefix that makes the kernel SIGTERM the broker if we die.

    atexit does not run when pytest itself is SIGKILLed (e.g. a CI timeout),
    and start_new_session=True shields the broker from the terminal's ^C, so
    without this a crashed run would leak servers.  setpriv execs the broker,
    so the pid stays the broker's.  The death signal fires when the *thread*
    that forked exits, so it is only armed from the main thread; brokers
    started from worker threads rely on atexit and fixture finalizers.
    """
    if not sys.platform.startswith("linux"):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path=_EXTRA_BIN_DIRS)
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class BrokerServer(ABC):
    """One throwaway broker process on a private port and data directory.

    The port and directory stay fixed for the object's lifetime, so
    :meth:`restart` and :meth:`kill` + :meth:`start` bring the broker back
    at the same URL with its persisted data.
    """

    binary_name: ClassVar[str]
    log_name: ClassVar[str]

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare (but do not start) the server.

        ``base_dir`` holds data and the log; when omitted a temp dir is made
        and removed again by :meth:`close`.  ``extra_args`` are appended to
        the server's command line.
        """
        self._binary = binary or require_binary(self.binary_name)
        if base_dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"alkpubsub-{self.binary_name}-"))
            self._owns_dir = True
            with _LIVE_LOCK:
                _OWNED_DIRS.add(self._dir)
        else:
            self._dir = Path(base_dir)
            self._dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self.start_timeout = start_timeout
        self.extra_args: list[str] = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._log_offset = 0
        # Until the first successful start a busy port is swapped for a new
        # one; afterwards the port is part of the server's identity (URL).
        self._ports_pinned = False
        self._pick_ports()

    # -- to be provided by subclasses --

    @abstractmethod
    def _pick_ports(self) -> None:
        """Choose fresh free port(s) for the next start."""

    @abstractmethod
    def _command(self) -> list[str]:
        """Return the server argv (without any wrapper)."""

    @abstractmethod
    def _probe(self, pid: int) -> bool:
        """Return True once the process ``pid`` serves clients; may raise OSError."""

    @property
    @abstractmethod
    def port(self) -> int:
        """Client port."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Client URL, including credentials when the server requires them."""

    # -- public API --

    @property
    def data_dir(self) -> Path:
        """Directory holding the server's data files, log and ports file."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server log; stdout/stderr of every incarnation is appended to it."""
        return self._dir / self.log_name

    @property
    def pid(self) -> int | None:
        """Pid of the current process, or None when not started/stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """True while the process exists (it may have died on its own)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and block until it serves clients.

        Idempotent while running.  Raises :class:`BrokerError` (with the tail
        of the log) if it exits early or is not ready within
        ``start_timeout`` seconds.
        """
        with self._lock:
            if self.is_running:
                return self
            self._forget_process()
            port_deadline = time.monotonic() + PORT_RETRY_TIMEOUT
            while True:
                proc = self._spawn()
                try:
                    self._wait_ready(proc)
                except _PortBusy as busy:
                    self._forget_process()
                    if time.monotonic() >= port_deadline:
                        raise BrokerError(str(busy)) from None
                    if not self._ports_pinned:
                        self._pick_ports()
                    time.sleep(0.1)
                    continue
                except BaseException:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait()
                    self._forget_process()
                    raise
                self._ports_pinned = True
                return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully: SIGTERM, wait, then SIGKILL after ``timeout`` seconds.

        A graceful stop lets Redis fsync its AOF and NATS close its stores.
        No-op when not running.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait()
            self._forget_process()

    def kill(self) -> None:
        """SIGKILL the server (and any child it forked) to simulate a crash.

        Data files are kept; :meth:`start` afterwards recovers from them.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._forget_process()

    def restart(self, downtime: float = 0.0) -> Self:
        """Stop gracefully, stay down ``downtime`` seconds, start on the same port."""
        with self._lock:
            self.stop()
            if downtime > 0:
                time.sleep(downtime)
            return self.start()

    def close(self) -> None:
        """Stop the server and delete its data dir if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            with _LIVE_LOCK:
                _OWNED_DIRS.discard(self._dir)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the log (all incarnations)."""
        return _tail(self._read_log(0), lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.url} {state} dir={self._dir}>"

    # -- internals --

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._dir.mkdir(parents=True, exist_ok=True)
        argv = [*_pdeathsig_prefix(), *self._command()]
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n=== tests/brokers.py: starting {' '.join(argv)}\n".encode())
            log.flush()
            # The log file, not a pipe: nobody drains a pipe, and a full one
            # would block the broker mid-test.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                log = self._read_log(self._log_offset)
                if "address already in use" in log.lower():
                    raise _PortBusy(
                        f"{self.binary_name} could not bind port {self.port} "
                        f"within {PORT_RETRY_TIMEOUT:.0f}s; log tail:\n{_tail(log)}"
                    )
                raise BrokerError(
                    f"{self.binary_name} exited with code {code} before becoming "
                    f"ready on port {self.port}; log {self.log_path} tail:\n{_tail(log)}"
                )
            try:
                if self._probe(proc.pid):
                    return
            except (OSError, RedisReplyError, ValueError):
                pass  # not listening yet / still loading its data
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"{self.binary_name} (pid {proc.pid}) not ready on port "
                    f"{self.port} after {self.start_timeout:.0f}s; log {self.log_path} "
                    f"tail:\n{_tail(self._read_log(self._log_offset))}"
                )
            time.sleep(_POLL_INTERVAL)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # Only valid while the leader is unreaped: that keeps the pgid from
        # being recycled.  The group also holds e.g. Redis' AOF-rewrite child.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _forget_process(self) -> None:
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


_PROCESS_ID = re.compile(rb"^process_id:(\d+)\r?$", re.MULTILINE)


class RedisServer(BrokerServer):
    """A private ``redis-server`` on 127.0.0.1.

    ``appendonly`` (default True) keeps data across :meth:`restart`, e.g.
    Streams and consumer groups; RDB snapshots are always off (``save ""``)
    so persistence behaviour depends on that one switch only.

    ``appendfsync`` (default ``everysec``, Redis's own default) says when the
    AOF is fsynced. With ``everysec`` Redis may reply before it has even
    written a command to the AOF while a background fsync is running (it
    postpones the write up to 2 s), so a SIGKILL can lose acknowledged writes;
    ``always`` writes and fsyncs before replying.
    """

    binary_name = "redis-server"
    log_name = "redis.log"

    def __init__(
        self,
        *,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        password: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare the server; ``password`` sets ``requirepass``."""
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync={appendfsync!r}: use 'always', 'everysec' or 'no'")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self._port = 0
        super().__init__(
            base_dir=base_dir, binary=binary, start_timeout=start_timeout, extra_args=extra_args
        )

    @property
    def port(self) -> int:
        """Client port."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self._port}/0"

    def client(self, timeout: float = 2.0) -> RespConnection:
        """Open a raw, already authenticated RESP connection to this server."""
        return RespConnection(self._port, password=self.password, timeout=timeout)

    def call(self, *args: str | bytes | int) -> RespValue:
        """Run one command on a fresh raw connection and return the reply."""
        return redis_call(self._port, *args, password=self.password)

    def _pick_ports(self) -> None:
        self._port = free_port()

    def _command(self) -> list[str]:
        argv = [
            self._binary,
            "--port", str(self._port),
            "--bind", HOST,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def _probe(self, pid: int) -> bool:
        # Short timeout: a stranger that accepts but never answers must not
        # delay noticing that our own process already exited; a timeout just
        # means another poll.
        with self.client(timeout=0.25) as conn:
            # While replaying the AOF Redis already accepts connections but
            # answers -LOADING; RedisReplyError keeps us polling.
            if conn.call("PING") != "PONG":
                return False
            # Make sure it is *our* process answering, not another broker that
            # grabbed the port while ours is failing to bind.
            info = conn.call("INFO", "server")
        match = _PROCESS_ID.search(info) if isinstance(info, bytes) else None
        return match is not None and int(match.group(1)) == pid


class NatsServer(BrokerServer):
    """A private ``nats-server`` on 127.0.0.1, JetStream on by default.

    JetStream stores live under ``data_dir/js`` and survive restarts.  A
    monitoring port is always opened because ``/healthz`` is the reliable
    signal that JetStream finished recovering its streams.
    """

    binary_name = "nats-server"
    log_name = "nats.log"

    def __init__(
        self,
        *,
        jetstream: bool = True,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare the server; use either ``user``+``password`` or ``token``."""
        if token is not None and (user is not None or password is not None):
            raise ValueError("NatsServer takes either user/password or token, not both")
        if (user is None) != (password is None):
            raise ValueError("NatsServer needs both user and password")
        self.jetstream = jetstream
        self.user = user
        self.password = password
        self.token = token
        self._port = 0
        self._monitor_port = 0
        super().__init__(
            base_dir=base_dir, binary=binary, start_timeout=start_timeout, extra_args=extra_args
        )

    @property
    def port(self) -> int:
        """Client port."""
        return self._port

    @property
    def monitor_port(self) -> int:
        """HTTP monitoring port (``/healthz``, ``/varz``, ``/jsz``...)."""
        return self._monitor_port

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:MPORT``."""
        return f"http://{HOST}:{self._monitor_port}"

    @property
    def url(self) -> str:
        """``nats://[user:pass@|token@]127.0.0.1:PORT``."""
        if self.user is not None and self.password is not None:
            auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
        elif self.token is not None:
            auth = f"{quote(self.token, safe='')}@"
        else:
            auth = ""
        return f"nats://{auth}{HOST}:{self._port}"

    def info(self, timeout: float = 2.0) -> dict[str, Any]:
        """Connect and return the server's ``INFO {...}`` greeting as a dict."""
        with socket.create_connection((HOST, self._port), timeout=timeout) as sock:
            line = sock.makefile("rb").readline()
        if not line.startswith(b"INFO "):
            raise ConnectionError(f"expected INFO greeting, got {line!r}")
        info: dict[str, Any] = json.loads(line[5:])
        return info

    def healthz(self, timeout: float = 2.0) -> tuple[int, str]:
        """Return ``(status, body)`` of ``GET /healthz`` on the monitoring port."""
        query = "?js-enabled=true" if self.jetstream else ""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz{query}", timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def _pick_ports(self) -> None:
        self._port = free_port()
        self._monitor_port = free_port()
        while self._monitor_port == self._port:
            self._monitor_port = free_port()

    def _command(self) -> list[str]:
        argv = [
            self._binary,
            "-a", HOST,
            "-p", str(self._port),
            "-m", str(self._monitor_port),
            "-n", f"alkpubsub-test-{self._port}",
            "-l", str(self.log_path),
            # nats-server writes <name>_<pid>.ports once it listens, which
            # proves the ports belong to our pid rather than a stranger.
            "--ports_file_dir", str(self._dir),
        ]  # fmt: skip
        if self.jetstream:
            argv += ["-js", "-sd", str(self._dir / "js")]
        if self.user is not None and self.password is not None:
            argv += ["--user", self.user, "--pass", self.password]
        elif self.token is not None:
            argv += ["--auth", self.token]
        return argv + self.extra_args

    def _probe(self, pid: int) -> bool:
        if not any(self._dir.glob(f"*_{pid}.ports")):
            return False
        # /healthz reports JetStream health too (200 only once stores are
        # recovered); js-enabled=true also turns "JetStream off" into a 503.
        status, _body = self.healthz(timeout=1.0)
        if status != 200:
            return False
        return bool(self.info(timeout=1.0).get("jetstream", False)) == self.jetstream


# -- pytest fixtures -----------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh Redis (AOF on) for this test alone; safe to kill/restart."""
    with RedisServer(base_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis shared by the whole session.

    Tests must use their own key/stream names and must not stop, kill,
    restart or FLUSHALL it.
    """
    with RedisServer(base_dir=tmp_path_factory.mktemp("redis-session")) as server:
        yield server


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A fresh NATS + JetStream for this test alone; safe to kill/restart."""
    with NatsServer(base_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One NATS + JetStream shared by the whole session.

    Tests must use their own subjects/stream names and must not stop, kill
    or restart it.
    """
    with NatsServer(base_dir=tmp_path_factory.mktemp("nats-session")) as server:
        yield server
