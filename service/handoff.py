"""Connections handed to the fronts in turn (`front_accept="balanced"`, the default of a split server).

When every front accepts on one shared listening socket, the kernel wakes them all and whichever runs
first takes what is waiting: a burst of new connections lands mostly on one or two fronts, and a
keep-alive connection stays where it landed. Measured on the CPU: 64 connections over 4 fronts held
25 / 3 / 23 / 13; on the H100 host, 12 fronts with 1-image requests stopped at 0.57-0.72 of raw while
the host had 9 of its 16 cores idle (the busiest fronts saturated, the others waited).

Here the supervisor alone accepts, and passes each connection's file descriptor (SCM_RIGHTS over a Unix
socket pair, one per front) to the next front in turn; the front adopts it into its event loop as an
accepted connection of its uvicorn server. One hand-off per connection, none per request. A front that
cannot take one (exited, or its channel full) is skipped; with none left the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import threading
from typing import Any

log = logging.getLogger("vqtok.split")

_BATCH = 64  # descriptors one read of a channel takes at most


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, front end) of one front's channel; the front end is inheritable."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    child.set_inheritable(True)
    return parent, child


class Acceptor:
    """The supervisor's accept loop (a thread): every connection goes to the next front whose channel
    takes it. `channels[i]` is front i's supervisor end, or None while it has none."""

    def __init__(self, listener: socket.socket, fronts: int) -> None:
        self.listener = listener
        self.channels: list[socket.socket | None] = [None] * fronts
        self.handed = [0] * fronts  # connections each front got, for tests and logs
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_channel(self, index: int, channel: socket.socket | None) -> None:
        with self._lock:
            old, self.channels[index] = self.channels[index], channel
        if old is not None:
            old.close()  # connections queued in it and never read are closed with it

    def start(self) -> Acceptor:
        self.listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="split-acceptor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more connections are taken (those already handed stay with their fronts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for i in range(len(self.channels)):
            self.set_channel(i, None)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            while not self._stop.is_set():  # everything waiting, so a burst costs one wake-up
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # out of descriptors (EMFILE, ENFILE), or a connection reset while queued
                    if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                        log.error("cannot accept a connection: %s", exc)
                        self._stop.wait(0.05)  # let some close; never let this thread die (the port would go deaf)
                    break
                with conn:  # the front has its own descriptor once it is sent; this one closes here
                    self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        with self._lock:
            n = len(self.channels)
            for k in range(n):
                i = (self._next + k) % n
                channel = self.channels[i]
                if channel is None:
                    continue
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()])
                except (BlockingIOError, InterruptedError):
                    continue  # that front is behind on its channel: the next one
                except OSError:  # the front is gone (EPIPE, ECONNRESET): until it is started again
                    self.channels[i] = None
                    channel.close()
                    continue
                self.handed[i] += 1
                self._next = i + 1
                return
        log.error("no front process can take a connection; closing it")


def handoff_server(config: Any, channel: socket.socket) -> Any:
    """A uvicorn.Server for `config` without a listening socket of its own: it adopts every connection
    the supervisor sends over `channel`, with the protocol uvicorn would have made for it."""
    import uvicorn

    class HandoffServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])
            if self.should_exit:
                return
            loop = asyncio.get_running_loop()
            cfg = self.config

            def protocol() -> asyncio.Protocol:  # what uvicorn's own startup makes for each connection
                return cfg.http_protocol_class(config=cfg, server_state=self.server_state, app_state=self.lifespan.state)  # type: ignore[call-arg]

            self._adopting: set[asyncio.Task[Any]] = set()
            channel.setblocking(False)
            loop.add_reader(channel.fileno(), self._receive, loop, protocol)

        def _receive(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
            while True:
                try:
                    _, fds, _, _ = socket.recv_fds(channel, _BATCH, _BATCH)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    fds = []
                if not fds:  # the supervisor is gone (EOF): its parent-watch thread stops this process
                    loop.remove_reader(channel.fileno())
                    return
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    if self.should_exit:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    task = loop.create_task(self._adopt(loop, protocol, conn))
                    self._adopting.add(task)
                    task.add_done_callback(self._adopting.discard)

        @staticmethod
        async def _adopt(loop: asyncio.AbstractEventLoop, protocol: Any, conn: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(protocol, conn)
            except OSError:  # the client left before the front took it
                conn.close()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(channel.fileno())
            channel.close()
            await super().shutdown(sockets=sockets)

    return HandoffServer(config)
