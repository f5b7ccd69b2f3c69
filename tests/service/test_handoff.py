"""The supervisor's accept loop (service/multiproc/handoff.py) on real sockets: connections go in turn to the fronts
that said they serve, a front that is gone is dropped, a full or failing channel is skipped for one
connection only; and a front whose channel the supervisor closes stops and is started again.

(The spread over real front processes, and a killed front: tests/service/test_split.py.)"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.multiproc import handoff
from tests.helpers import SplitServerThread
from tests.service.conftest import cpu_settings

_Fronts = tuple[handoff.Acceptor, list[socket.socket], int]


@pytest.fixture
def fronts() -> Iterator[_Fronts]:
    """An Acceptor on a localhost listener with two channels; the fronts' ends, the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    acceptor = handoff.Acceptor(listener, 2)
    ends = []
    for i in range(2):
        parent, child = handoff.channel_pair()
        child.settimeout(5)
        acceptor.set_channel(i, parent)
        ends.append(child)
    acceptor.start()
    try:
        yield acceptor, ends, listener.getsockname()[1]
    finally:
        acceptor.stop()
        listener.close()
        for end in ends:
            end.close()


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _received(end: socket.socket) -> socket.socket | None:
    """The connection handed over on a front's end, or None when nothing comes within a moment."""
    end.settimeout(0.5)
    try:
        msg, fds, _, _ = socket.recv_fds(end, 16, 4)
    except (TimeoutError, BlockingIOError):
        return None
    assert msg == b"c" and len(fds) == 1
    return socket.socket(fileno=fds[0])


def _peer_port(conn: socket.socket) -> int:
    return int(conn.getpeername()[1])


def _all_serve(acceptor: handoff.Acceptor, ends: list[socket.socket]) -> None:
    """Every front says it serves; returns once the acceptor has heard them all."""
    for end in ends:
        end.send(handoff.READY)
    assert _until(lambda: all(acceptor.ready))


def _close(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def test_connections_wait_until_a_front_serves_then_go_in_turn(fronts: _Fronts) -> None:
    acceptor, ends, port = fronts
    first = socket.create_connection(("127.0.0.1", port))
    assert _received(ends[0]) is None and _received(ends[1]) is None  # nobody serves: it waits in the backlog
    ends[0].send(handoff.READY)
    got = _received(ends[0])
    assert got is not None and _peer_port(got) == first.getsockname()[1]
    ends[1].send(handoff.READY)
    assert _until(lambda: all(acceptor.ready))
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    taken = [_received(ends[i % 2]) for i in range(4)]  # 1, 0, 1, 0 ... in turn, after front 0 took the first
    assert all(t is not None for t in taken)
    assert sorted(_peer_port(t) for t in taken if t) == sorted(c.getsockname()[1] for c in clients)
    # the acceptor counts a hand-off just after its send, so a front may hold the last one before it is counted
    assert _until(lambda: sum(acceptor.handed) == 5)
    assert acceptor.handed == [3, 2] or acceptor.handed == [2, 3]
    _close(first, got, *clients, *taken)


def test_a_front_that_is_gone_is_dropped_and_the_others_take_its_share(fronts: _Fronts) -> None:
    acceptor, ends, port = fronts
    _all_serve(acceptor, ends)
    ends[1].close()  # the front exited
    assert _until(lambda: acceptor.channels[1] is None)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    taken = [_received(ends[0]) for _ in range(3)]
    assert all(t is not None for t in taken) and acceptor.handed[1] == 0
    _close(*clients, *taken)


def test_a_full_channel_is_skipped_for_that_connection_only(fronts: _Fronts) -> None:
    acceptor, ends, port = fronts
    _all_serve(acceptor, ends)
    channel = acceptor.channels[1]
    assert channel is not None
    with acceptor._lock:  # fill front 1's channel with bytes it has not read (the acceptor is idle meanwhile)
        while True:
            try:
                channel.send(b"x" * 65536)
            except BlockingIOError:
                break
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    taken = [_received(ends[0]) for _ in range(2)]
    assert all(t is not None for t in taken)
    assert acceptor.channels[1] is channel and acceptor.ready[1]  # kept: only behind
    _close(*clients, *taken)


def test_a_send_that_fails_otherwise_skips_the_front_but_keeps_it(fronts: _Fronts, monkeypatch: pytest.MonkeyPatch) -> None:
    acceptor, ends, port = fronts
    _all_serve(acceptor, ends)
    real, refused = socket.send_fds, acceptor.channels[1]

    def send_fds(sock: socket.socket, *args: object) -> int:
        if sock is refused:  # the supervisor past its open-files limit, for descriptors in flight
            raise OSError(errno.ETOOMANYREFS, "Too many references: cannot splice")
        return real(sock, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "send_fds", send_fds)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    taken = [_received(ends[0]) for _ in range(3)]
    assert all(t is not None for t in taken)
    assert acceptor.channels[1] is refused and acceptor.ready[1] and acceptor.handed[1] == 0
    monkeypatch.setattr(socket, "send_fds", real)
    more = socket.create_connection(("127.0.0.1", port))
    got = _received(ends[1]) or _received(ends[0])
    assert got is not None
    _close(*clients, *taken, more, got)


def test_a_front_whose_channel_the_supervisor_closes_stops_and_is_started_again(model_repo: Path) -> None:
    s = SplitServerThread(cpu_settings(model_repo, default_model="fsq4", front_workers=2)).start()
    try:
        acceptor = s.server.acceptor
        assert acceptor is not None and _until(lambda: all(acceptor.ready))
        old = s.server.fronts[0]
        assert old is not None
        acceptor.set_channel(0, None)  # as if the supervisor had given up on it
        assert _until(lambda: old.poll() is not None, 30), "the front kept running without a channel"
        assert _until(lambda: s.server.fronts[0] is not old and acceptor.ready[0], 60)
        before = list(acceptor.handed)
        for _ in range(4):
            assert httpx.get(f"{s.url}/healthz", timeout=10).status_code == 200  # a new connection each
        assert _until(lambda: [a - b for a, b in zip(acceptor.handed, before, strict=True)] == [2, 2])  # counted after each send
    finally:
        s.stop()
