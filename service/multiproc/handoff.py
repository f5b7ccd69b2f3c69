"""Connections handed to the fronts in turn (`front_accept="balanced"`, the default of a split server).

When every front accepts on one shared listening socket, the kernel wakes them all and whichever runs
first takes what is waiting: a burst of new connections lands mostly on one or two fronts, and a
keep-alive connection stays where it landed (`bench/front_accept_cpu.py` shows the spread). Then a
few fronts are saturated while the others and many of the host's cores sit idle, and single-image
throughput stops well short of the runtime's (BENCHMARKS.md).

Here the supervisor alone accepts, and passes each connection's file descriptor (SCM_RIGHTS over a Unix
socket pair, one per front: its channel) to the next front in turn; the front adopts it into its event
loop as an accepted connection of its uvicorn server. One hand-off per connection, none per request.

- A front gets connections once it says it is serving (one byte, "r", on its channel after its
  server's startup); while no front is, connections wait in the listen backlog.
- A front whose channel is closed (it exited) is dropped until the supervisor starts it again. A front
  whose channel is full, or a send that fails for another reason (e.g. too many descriptors in flight),
  is skipped for that connection only. With no front left to take it, the connection is closed.
- A front whose channel reaches end of file (the supervisor dropped it) or fails stops, and is started
  again; one that cannot take a descriptor (out of them) logs it and goes on.

A front told to stop (SIGTERM: a restart, a scale-down) loses no connection: it says it is going ("g");
the supervisor hands it nothing more and acknowledges ("G"); every connection that reached the front
but on which no byte has arrived yet — those still in the channel and those adopted but not started — it
hands back ("b" with the descriptor), and the supervisor hands each to another front; the requests in
progress finish where they are (uvicorn's graceful shutdown), and idle keep-alive connections are
closed, which a client sees before it sends on them (or retries: every route is idempotent). A front
that crashes takes what it held with it; those connections close, and clients retry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import select
import socket
import threading
import time
from typing import Any

log = logging.getLogger("vqtok.split")

READY = b"r"  # a front to the supervisor, on its channel: serving, send connections
GOING = b"g"  # a front to the supervisor: stopping, send nothing more
GOING_ACK = b"G"  # the supervisor to a going front: nothing more will be sent
HANDED_BACK = b"b"  # a front to the supervisor, with a descriptor: a connection it never started
_BATCH = 64  # descriptors one read of a channel takes at most
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ECONNREFUSED})
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, front end) of one front's channel; the front end is inheritable."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    child.set_inheritable(True)
    return parent, child


def raise_open_files_limit() -> None:
    """The soft limit on open descriptors up to the hard one: a descriptor in flight on a channel counts
    against the sender's limit (past it, sendmsg fails with ETOOMANYREFS), and every connection is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Throttled:
    """log.error at most once a second (an accept or send error can repeat for every connection)."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            log.error(msg, *args)


class Acceptor:
    """The supervisor's accept loop (a thread): every connection goes to the next ready front whose
    channel takes it. `channels[i]`: front i's supervisor end, or None while it has none; `ready[i]`:
    front i said it serves."""

    def __init__(self, listener: socket.socket, fronts: int) -> None:
        self.listener = listener
        self.channels: list[socket.socket | None] = [None] * fronts
        self.ready = [False] * fronts
        self.handed = [0] * fronts  # connections each front got, for tests and logs
        self.handed_back = 0  # connections going fronts gave back, handed on to others
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = _Throttled()

    def set_channel(self, index: int, channel: socket.socket | None) -> None:
        """Front `index`'s channel (a started front: not ready until it says so), or None."""
        with self._lock:
            old, self.channels[index] = self.channels[index], channel
            self.ready[index] = False
        if old is not None:
            old.close()  # connections queued in it and never read are closed with it

    def start(self) -> Acceptor:
        self.listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="split-acceptor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more connections are taken (those already handed stay with their fronts, which see their
        channels end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for i in range(len(self.channels)):
            self.set_channel(i, None)

    def _drop(self, index: int, channel: socket.socket) -> None:
        """Front `index` is gone (its channel ended or broke): nothing more for it until it is started again."""
        with self._lock:
            if self.channels[index] is channel:
                self.channels[index], self.ready[index] = None, False
                channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            poller = select.poll()  # rebuilt each turn: channels come and go with the fronts
            with self._lock:
                watched = {ch.fileno(): (i, ch) for i, ch in enumerate(self.channels) if ch is not None}
                serving = any(self.ready)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            if serving:  # with no front serving, connections wait in the backlog
                poller.register(self.listener.fileno(), select.POLLIN)
            for fd, _ in poller.poll(200):
                if fd in watched:
                    self._read_channel(*watched[fd])
                elif not self._stop.is_set():
                    self._accept_all()

    def _read_channel(self, index: int, channel: socket.socket) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(channel, _BATCH, _BATCH, _CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC:  # out of descriptors (EMFILE): connections handed back are lost
            self._error("connections handed back by front %d were lost: no file descriptor left (raise ulimit -n)", index)
        if not data and not fds:
            self._drop(index, channel)
            return
        if GOING in data:
            with self._lock:
                if self.channels[index] is channel:
                    self.ready[index] = False
            with contextlib.suppress(OSError):
                channel.send(GOING_ACK, _NOSIGNAL)
        elif READY in data:
            with self._lock:
                if self.channels[index] is channel:
                    self.ready[index] = True
        for fd in fds:  # connections a going front never started: to another front
            with socket.socket(fileno=fd) as conn:
                self.handed_back += 1
                self._hand(conn)

    def _accept_all(self) -> None:
        while not self._stop.is_set():  # everything waiting, so a burst costs one wake-up
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors (EMFILE, ENFILE), or a connection reset while queued
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    self._error("cannot accept a connection: %s", exc)
                    self._stop.wait(0.05)  # let some close; never let this thread die (the port would go deaf)
                return
            with conn:  # the front has its own descriptor once it is sent; this one closes here
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        with self._lock:
            n = len(self.channels)
            for k in range(n):
                i = (self._next + k) % n
                channel = self.channels[i]
                if channel is None or not self.ready[i]:
                    continue
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()], _NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    continue  # that front is behind on its channel: the next one
                except OSError as exc:
                    if exc.errno in _GONE:  # the front exited: until it is started again
                        self.channels[i], self.ready[i] = None, False
                        channel.close()
                    else:  # e.g. ETOOMANYREFS, ENOBUFS: this connection only, the front stays
                        self._error("cannot hand a connection to front %d: %s", i, exc)
                    continue
                self.handed[i] += 1
                self._next = i + 1
                return
        self._error("no front process can take a connection; closing it")


def handoff_server(config: Any, channel: socket.socket) -> Any:
    """A uvicorn.Server for `config` without a listening socket of its own: it adopts every connection
    the supervisor sends over `channel`, with the protocol uvicorn would have made for it."""
    import uvicorn

    channel.set_inheritable(False)

    class HandoffServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])
            if self.should_exit:
                return
            loop = asyncio.get_running_loop()
            cfg = self.config

            unstarted: set[Any] = set()  # protocols of adopted connections on which no byte has arrived
            self._unstarted = unstarted

            class Tracked(cfg.http_protocol_class):  # type: ignore[name-defined, misc]
                """uvicorn's protocol, telling which connections never started and which are mid-way through a
                request's head (uvicorn's graceful shutdown closes both as idle, losing what they carry)."""

                parsing = False  # a request's first bytes have arrived, its head is not complete yet
                closing = False  # shutdown came while parsing: answer that request, then close

                def connection_made(self, transport: Any) -> None:
                    unstarted.add(self)
                    super().connection_made(transport)

                def data_received(self, data: bytes) -> None:
                    unstarted.discard(self)
                    super().data_received(data)

                def connection_lost(self, exc: Exception | None) -> None:
                    unstarted.discard(self)
                    super().connection_lost(exc)

                def on_message_begin(self) -> None:
                    self.parsing = True
                    super().on_message_begin()

                def on_headers_complete(self) -> None:
                    super().on_headers_complete()
                    self.parsing = False
                    if self.closing and self.cycle is not None:
                        self.cycle.keep_alive = False

                def shutdown(self) -> None:
                    if self.parsing:  # its request is under way: it is answered, then the connection closes
                        self.closing = True
                        return
                    super().shutdown()

            def protocol() -> asyncio.Protocol:  # what uvicorn's own startup makes for each connection
                return Tracked(config=cfg, server_state=self.server_state, app_state=self.lifespan.state)  # type: ignore[no-any-return]

            self._adopting: set[asyncio.Task[Any]] = set()
            self._lost = _Throttled()
            self._going = False
            self._acked = asyncio.Event()
            channel.setblocking(False)
            loop.add_reader(channel.fileno(), self._receive, loop, protocol)
            try:
                channel.send(READY)
            except OSError as exc:
                self._end(loop, f"cannot tell the supervisor it serves ({exc})")

        def _end(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
            """No more connections will come: stop (the supervisor starts this front again)."""
            with contextlib.suppress(Exception):
                loop.remove_reader(channel.fileno())
            if not self.should_exit:
                log.info("front stops: %s", why)
                self.should_exit = True

        def _receive(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
            while True:
                try:
                    msg, fds, flags, _ = socket.recv_fds(channel, _BATCH, _BATCH, _CLOEXEC)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._end(loop, f"its connection channel failed ({exc})")
                    return
                if GOING_ACK in msg:
                    self._acked.set()
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    if self._going:
                        self._hand_back(conn)
                        continue
                    if self.should_exit:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    task = loop.create_task(self._adopt(loop, protocol, conn))
                    self._adopting.add(task)
                    task.add_done_callback(self._adopting.discard)
                if flags & socket.MSG_CTRUNC:  # out of descriptors (EMFILE): that client's connection is lost
                    self._lost("a connection handed to this front was lost: no file descriptor left (raise ulimit -n)")
                elif not msg and not fds:
                    self._end(loop, "the supervisor closed its connection channel")
                    return

        @staticmethod
        async def _adopt(loop: asyncio.AbstractEventLoop, protocol: Any, conn: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(protocol, conn)
            except Exception as exc:  # the client left before the front took it (OSError), or a bug: never the loop
                conn.close()
                if not isinstance(exc, OSError):
                    log.exception("cannot adopt a connection")

        def _hand_back(self, conn: socket.socket) -> None:
            """Give a connection that never started back to the supervisor (closed here: the supervisor's
            descriptor keeps it open, with whatever the client has sent since, unread)."""
            try:
                socket.send_fds(channel, [HANDED_BACK], [conn.fileno()], _NOSIGNAL)
            except OSError as exc:  # the channel is gone or full: the client sees it close, and retries
                self._lost("could not hand a connection back to the supervisor: %s", exc)
            conn.close()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            loop = asyncio.get_running_loop()
            if not self._going and channel.fileno() >= 0:
                self._going = True
                try:
                    channel.send(GOING)
                    await asyncio.wait_for(self._acked.wait(), 2.0)  # what was in the channel came back meanwhile
                except (OSError, asyncio.TimeoutError):
                    pass
                if self._adopting:  # connections received but not yet made into protocols: become `unstarted` first
                    await asyncio.wait(set(self._adopting), timeout=1.0)
                for proto in list(self._unstarted):
                    transport = proto.transport
                    sock = transport.get_extra_info("socket") if transport is not None else None
                    if sock is None or transport.is_closing():
                        continue
                    transport.pause_reading()
                    with contextlib.suppress(OSError):
                        socket.send_fds(channel, [HANDED_BACK], [sock.fileno()], _NOSIGNAL)
                    self.server_state.connections.discard(proto)
                    transport.close()  # this front's descriptor only: the supervisor's keeps the connection
            with contextlib.suppress(Exception):
                loop.remove_reader(channel.fileno())
            channel.close()
            await super().shutdown(sockets=sockets)

    return HandoffServer(config)
