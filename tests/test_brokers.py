"""Checks that tests/brokers.py really starts, stops, kills and restarts brokers.

Everything here talks to the servers over raw sockets (RESP / NATS text
protocol) so these tests do not depend on the client libraries under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# "brokers", not "tests.brokers": tests/conftest.py imports it under this
# name, and a second import under another name would be a separate module
# with its own classes (pytest.raises(BrokerError) would then miss).
import brokers
import pytest
from brokers import (
    HOST,
    BrokerError,
    BrokerServer,
    NatsServer,
    RedisReplyError,
    RedisServer,
    redis_call,
    require_binary,
)

SYSTEM_REDIS_PORT = 6379
SYSTEM_NATS_PORT = 4222
TESTS_DIR = Path(__file__).resolve().parent


def _process_gone(pid: int) -> bool:
    """True when no process with ``pid`` exists any more (we reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _process_dead(pid: int) -> bool:
    """Like _process_gone, but for processes we are not the parent of.

    An orphan is re-parented to init, and a container init may not reap it
    promptly; a zombie no longer runs, so it counts as dead.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(") ", 1)[1].startswith(("Z", "X"))


def _wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _port_refuses(port: int) -> bool:
    """True when nothing accepts TCP connections on ``port``."""
    try:
        socket.create_connection((HOST, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def _nats_request(
    server: NatsServer, subject: str, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send one request over the raw NATS protocol and return the JSON reply."""
    body = json.dumps(payload).encode() if payload is not None else b""
    inbox = f"_INBOX.{uuid.uuid4().hex}"
    with socket.create_connection((HOST, server.port), timeout=5.0) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"INFO ")
        sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
            + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(body)}\r\n".encode()
            + body
            + b"\r\n"
        )
        while True:
            line = stream.readline()
            assert line, "server closed the connection"
            if line.startswith(b"-ERR"):
                raise AssertionError(line.decode())
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                reply: dict[str, Any] = json.loads(stream.read(size + 2)[:-2])
                return reply


# -- Redis ---------------------------------------------------------------------


def test_redis_answers_ping_on_its_own_port(redis_server: RedisServer) -> None:
    """Expect a private redis-server (never the system one on 6379) that answers PING."""
    assert redis_server.port != SYSTEM_REDIS_PORT
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.is_running
    assert redis_call(redis_server.port, "PING") == "PONG"
    info = redis_call(redis_server.port, "INFO", "server")
    assert isinstance(info, bytes)
    assert f"process_id:{redis_server.pid}".encode() in info
    assert f"tcp_port:{redis_server.port}".encode() in info


def test_redis_data_survives_restart_with_appendonly(redis_server: RedisServer) -> None:
    """Expect a key written before restart() to be readable afterwards (AOF on)."""
    port, old_pid = redis_server.port, redis_server.pid
    assert redis_call(port, "SET", "brokers:k", "v") == "OK"

    redis_server.restart()

    assert redis_server.port == port
    assert redis_server.pid != old_pid
    assert redis_call(port, "GET", "brokers:k") == b"v"


def test_redis_appendfsync_is_applied(tmp_path: Path) -> None:
    """Expect the appendfsync setting to reach the server (default everysec)."""
    with RedisServer(base_dir=tmp_path / "default") as server:
        assert server.call("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"everysec"]
    with RedisServer(base_dir=tmp_path / "always", appendfsync="always") as server:
        assert server.call("CONFIG", "GET", "appendfsync") == [b"appendfsync", b"always"]
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(base_dir=tmp_path / "bad", appendfsync="sometimes")


def test_redis_without_appendonly_forgets_data_on_restart(tmp_path: Path) -> None:
    """Expect appendonly=False (and no RDB saves) to start empty after restart."""
    with RedisServer(appendonly=False, base_dir=tmp_path) as server:
        assert server.call("SET", "brokers:volatile", "v") == "OK"
        server.restart()
        assert server.call("GET", "brokers:volatile") is None


def test_redis_kill_then_start(redis_server: RedisServer) -> None:
    """Expect kill() to SIGKILL the process and start() to bring it back on the same port."""
    port, pid = redis_server.port, redis_server.pid
    assert pid is not None
    redis_server.kill()

    assert not redis_server.is_running
    assert _process_gone(pid)
    assert _port_refuses(port)

    redis_server.start()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert redis_call(port, "PING") == "PONG"


def test_redis_restart_with_downtime_refuses_meanwhile(redis_server: RedisServer) -> None:
    """Expect restart(downtime) to keep the port closed during the downtime."""
    port = redis_server.port
    started = time.monotonic()
    redis_server.stop()
    assert _port_refuses(port)
    redis_server.restart(downtime=0.2)
    assert time.monotonic() - started >= 0.2
    assert redis_call(port, "PING") == "PONG"


def test_redis_password_required(tmp_path: Path) -> None:
    """Expect -NOAUTH for an unauthenticated PING and +PONG after AUTH."""
    with RedisServer(password="s3cret pass", base_dir=tmp_path) as server:
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            redis_call(server.port, "PING")
        with pytest.raises(RedisReplyError, match="WRONGPASS"):
            redis_call(server.port, "PING", password="wrong")
        assert redis_call(server.port, "PING", password="s3cret pass") == "PONG"
        assert server.url == f"redis://:s3cret%20pass@127.0.0.1:{server.port}/0"


def test_redis_session_server_is_shared(redis_server_session: RedisServer) -> None:
    """Expect the session server to be up and usable with test-specific keys."""
    key = f"brokers:session:{uuid.uuid4().hex}"
    assert redis_server_session.port != SYSTEM_REDIS_PORT
    assert redis_server_session.call("SET", key, "1") == "OK"
    assert redis_server_session.call("DEL", key) == 1


# -- NATS ----------------------------------------------------------------------


def test_nats_info_reports_jetstream(nats_server: NatsServer) -> None:
    """Expect a private nats-server whose INFO line says "jetstream":true and healthz is ok."""
    assert nats_server.port != SYSTEM_NATS_PORT
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    info = nats_server.info()
    assert info["jetstream"] is True
    assert info["port"] == nats_server.port
    status, body = nats_server.healthz()
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"


def test_nats_restart_same_port_keeps_jetstream_data(nats_server: NatsServer) -> None:
    """Expect restart() on the same port with the file-backed stream and its message intact."""
    port, old_pid = nats_server.port, nats_server.pid
    created = _nats_request(
        nats_server,
        "$JS.API.STREAM.CREATE.BROKERS",
        {"name": "BROKERS", "subjects": ["brokers.>"], "storage": "file"},
    )
    assert "error" not in created, created
    ack = _nats_request(nats_server, "brokers.one", {"n": 1})
    assert ack == {"stream": "BROKERS", "seq": 1}

    nats_server.restart()

    assert nats_server.port == port
    assert nats_server.pid != old_pid
    assert nats_server.info()["jetstream"] is True
    state = _nats_request(nats_server, "$JS.API.STREAM.INFO.BROKERS")["state"]
    assert state["messages"] == 1


def test_nats_kill_then_start(nats_server: NatsServer) -> None:
    """Expect kill() to SIGKILL nats-server and start() to bring JetStream back on that port."""
    port, pid = nats_server.port, nats_server.pid
    assert pid is not None
    nats_server.kill()
    assert not nats_server.is_running
    assert _process_gone(pid)
    assert _port_refuses(port)

    nats_server.start()
    assert nats_server.port == port
    assert nats_server.info()["jetstream"] is True


@pytest.mark.parametrize(
    ("auth", "connect_fields", "url_auth"),
    [
        ({"user": "alice", "password": "pw"}, {"user": "alice", "pass": "pw"}, "alice:pw@"),
        ({"token": "tok"}, {"auth_token": "tok"}, "tok@"),
    ],
    ids=["user-password", "token"],
)
def test_nats_auth_required(
    tmp_path: Path, auth: dict[str, str], connect_fields: dict[str, str], url_auth: str
) -> None:
    """Expect an unauthenticated CONNECT to be refused and a credentialed one to get PONG."""

    def connect(fields: dict[str, Any]) -> bytes:
        with socket.create_connection((HOST, server.port), timeout=5.0) as sock:
            stream = sock.makefile("rb")
            info = json.loads(stream.readline()[5:])
            assert info["auth_required"] is True
            sock.sendall(b"CONNECT " + json.dumps({"verbose": False, **fields}).encode())
            sock.sendall(b"\r\nPING\r\n")
            return stream.readline()

    with NatsServer(base_dir=tmp_path, **auth) as server:  # type: ignore[arg-type]
        assert connect({}).startswith(b"-ERR 'Authorization Violation'")
        assert connect(connect_fields) == b"PONG\r\n"
        assert server.url == f"nats://{url_auth}127.0.0.1:{server.port}"


def test_nats_session_server_is_shared(nats_server_session: NatsServer) -> None:
    """Expect the session server to be up with JetStream enabled."""
    assert nats_server_session.port != SYSTEM_NATS_PORT
    assert nats_server_session.info()["jetstream"] is True


# -- lifecycle common to both ----------------------------------------------------


@pytest.mark.parametrize("server_cls", [RedisServer, NatsServer], ids=["redis", "nats"])
def test_stop_leaves_no_process(server_cls: type[BrokerServer], tmp_path: Path) -> None:
    """Expect stop() to end the process, close the port, and be safe to repeat."""
    server = server_cls(base_dir=tmp_path)
    server.start()
    pid, port = server.pid, server.port
    assert pid is not None and server.is_running

    server.stop()

    assert _process_gone(pid)
    assert not server.is_running and server.pid is None
    assert _port_refuses(port)
    server.stop()  # idempotent
    server.close()
    assert tmp_path.exists(), "close() must not delete a caller-provided directory"


def test_close_removes_owned_temp_dir() -> None:
    """Expect a server without base_dir to create and then remove its own temp dir."""
    server = RedisServer(appendonly=False)
    with server:
        data_dir = server.data_dir
        assert server.log_path.exists()
    assert not data_dir.exists()


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    """Expect a server that exits at once to raise BrokerError quoting its log."""
    server = RedisServer(base_dir=tmp_path, extra_args=["--no-such-directive", "x"])
    with pytest.raises(RuntimeError, match="no-such-directive"):
        server.start()
    assert not server.is_running


def test_require_binary_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expect a missing binary to skip without CI and to fail with CI=true."""
    missing = "alkpubsub-no-such-broker"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{missing} not installed: apt-get install"):
        require_binary(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{missing} not installed: apt-get install"):
        require_binary(missing)
    assert require_binary("redis-server").endswith("redis-server")


def test_first_start_moves_off_a_busy_port(tmp_path: Path) -> None:
    """Expect a port stolen before the first start to be replaced by a fresh one."""
    server = RedisServer(appendonly=False, base_dir=tmp_path)
    stolen = server.port
    with socket.create_server((HOST, stolen)), server:
        assert server.port != stolen
        assert server.call("PING") == "PONG"


def test_restart_waits_for_its_port_to_free_up(redis_server: RedisServer) -> None:
    """Expect restart() to keep the same port, retrying while it is briefly busy."""
    port = redis_server.port
    redis_server.stop()
    blocker = socket.create_server((HOST, port))
    threading.Timer(0.5, blocker.close).start()

    redis_server.start()

    assert redis_server.port == port
    assert redis_server.call("PING") == "PONG"


def test_restart_gives_up_when_its_port_stays_busy(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expect a clear BrokerError, not a silent port change, if the port never frees up."""
    monkeypatch.setattr(brokers, "PORT_RETRY_TIMEOUT", 0.3)
    port = redis_server.port
    redis_server.stop()
    with socket.create_server((HOST, port)), pytest.raises(BrokerError, match="already in use"):
        redis_server.start()
    assert redis_server.port == port and not redis_server.is_running


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_servers_do_not_outlive_their_python_process(how: str) -> None:
    """Expect no leak: atexit stops servers on normal exit, PDEATHSIG on SIGKILL."""
    code = (
        "import sys, time\n"
        "from brokers import RedisServer\n"
        "s = RedisServer(appendonly=False).start()\n"
        "print(s.pid, s.data_dir, flush=True)\n"
        "if sys.argv[1] == 'sigkill':\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, how], cwd=TESTS_DIR, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    pid_text, data_dir = child.stdout.readline().split(maxsplit=1)
    server_pid = int(pid_text)
    if how == "sigkill":
        child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=15) in (0, -signal.SIGKILL)
    assert _wait_until(lambda: _process_dead(server_pid)), f"redis-server {server_pid} leaked"
    if how == "exit":
        assert not Path(data_dir.strip()).exists(), "atexit must remove owned temp dirs"
    else:
        # Nothing runs in a SIGKILLed interpreter; the temp dir is ours to remove.
        shutil.rmtree(data_dir.strip(), ignore_errors=True)
