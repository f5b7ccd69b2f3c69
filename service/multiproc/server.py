"""A split server (`front_workers` = N > 0): one inference process and N front processes on one port.

    supervisor (this module; `vqtok serve --front-workers N`)
      ├─ inference process  `python -m service.multiproc.server inference`: repository, runtimes, batchers (inference.py)
      └─ N front processes  `python -m service.multiproc.server front`: uvicorn + the FastAPI app on the connections
                            the supervisor hands over (or the shared listening socket), models reached
                            through front.py

The supervisor binds the port once. By default (`front_accept="balanced"`) it accepts every connection
itself and hands it to the fronts in turn (handoff.py: the kernel's own spreading over processes that
accept on one socket piles a burst of keep-alive connections onto a few fronts); with "shared" every
front accepts on the listening socket, as uvicorn's own `--workers` does. A child that exits while the
server runs is started again (`Restarts`): at once if it had run for a while, else after a delay that
doubles with each quick exit (0.5 s up to 30 s), so a child that cannot start does not spawn a Python
process five times a second; while the inference process is down the fronts answer 503. On
SIGTERM/SIGINT the fronts stop first (in-flight requests finish on the inference process), then the
inference process (it drains its queues), then every shared-memory segment of this server is removed,
including those of a killed front. SIGHUP reloads the models.

Children get their settings as JSON on stdin (API keys never show in `ps` or the environment).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from models.core.errors import CLIError

from ..settings import Settings
from . import handoff, ipc

log = logging.getLogger("vqtok.split")
_ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Restarts:
    """When to start an exited child again. A child that ran for `stable_s` or longer is started again at
    once; one that exited sooner waits `first_s`, then twice as long after each further quick exit, up
    to `max_s`. `now` is a monotonic clock (tests pass their own)."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0, stable_s: float = 30.0) -> None:
        self.first_s, self.max_s, self.stable_s = first_s, max_s, stable_s
        self.delay = 0.0
        self.started = 0.0

    def exited(self, now: float) -> float:
        """The child exited at `now`: the time to start it again."""
        quick = now - self.started < self.stable_s
        self.delay = min(self.max_s, max(self.first_s, 2 * self.delay)) if quick else 0.0
        return now + self.delay

    def start(self, now: float) -> None:
        self.started = now


class SplitServer:
    """The supervisor: `start()`, then `run()` (blocks, restarting children) or `watch_in_thread()`; `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server_id = f"{os.getpid()}.{next(_counter)}"
        self._dir = tempfile.mkdtemp(prefix="vqtok-split-")
        self.socket_path = os.path.join(self._dir, "inference.sock")
        self.sock: socket.socket | None = None
        self.front_socks: list[socket.socket] = []  # reuseport: each front's own listening socket, kept across its restarts
        self.acceptor: handoff.Acceptor | None = None
        self.inference: subprocess.Popen[bytes] | None = None
        self.fronts: list[subprocess.Popen[bytes] | None] = []
        self.restarts = 0
        self._backoff: dict[str | int, Restarts] = {}  # "inference", or a front's index
        self._due: dict[str | int, float] = {}  # the children waiting to be started again: when
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    # --- children ---

    def _spawn(self, role: str, extra: dict[str, Any], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.multiproc.server", role],
            stdin=subprocess.PIPE,
            pass_fds=pass_fds,
            env=env,
            cwd=str(_ROOT),
            start_new_session=True,  # Ctrl-C reaches the supervisor alone, which stops the children in order
        )
        config = {"settings": self.settings.model_dump(mode="json"), "socket": self.socket_path, "server_id": self.server_id, **extra}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        return proc

    def _spawn_inference(self) -> subprocess.Popen[bytes]:
        return self._spawn("inference", {})

    def _spawn_front(self, index: int) -> subprocess.Popen[bytes]:
        assert self.sock is not None
        if self.acceptor is None:
            fd = (self.front_socks[index] if self.front_socks else self.sock).fileno()
            return self._spawn("front", {"fd": fd, "index": index}, pass_fds=(fd,))
        parent, child = handoff.channel_pair()
        try:
            proc = self._spawn("front", {"channel": child.fileno(), "index": index}, pass_fds=(child.fileno(),))
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.acceptor.set_channel(index, parent)
        return proc

    def start(self) -> SplitServer:
        s = self.settings
        try:
            self.sock = _listen(s.host, s.port, reuse_port=s.front_accept == "reuseport")
            if s.front_accept == "reuseport":  # one socket a front, on the port the first one got
                port = self.sock.getsockname()[1]
                self.front_socks = [self.sock, *(_listen(s.host, port, reuse_port=True) for _ in range(s.front_workers - 1))]
        except OSError as exc:
            for sock in [self.sock, *self.front_socks]:
                if sock is not None:
                    sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise CLIError(f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from None
        if s.front_accept == "balanced":
            handoff.raise_open_files_limit()
            self.acceptor = handoff.Acceptor(self.sock, s.front_workers)
        now = time.monotonic()
        self._backoff = {key: Restarts() for key in ["inference", *range(s.front_workers)]}
        for restarts in self._backoff.values():
            restarts.start(now)
        try:
            self.inference = self._spawn_inference()
            self.fronts = []
            for i in range(s.front_workers):  # one by one, so a failure stops the ones already started
                self.fronts.append(self._spawn_front(i))
            if self.acceptor is not None:
                self.acceptor.start()
        except BaseException:
            self.stop()  # children, sockets, the acceptor and the run directory: nothing left behind
            raise
        log.info(
            "split server started",
            extra={
                "port": self.port,
                "fronts": s.front_workers,
                "inference_pid": self.inference.pid,
                "front_pids": [p.pid for p in self.fronts if p],
            },
        )
        return self

    def check(self) -> None:
        """Start again any child that exited, once its backoff (`Restarts`) has passed (called every 0.2 s
        by `run`/`watch_in_thread`). A child waiting to be started again is None meanwhile."""
        if self._stopping.is_set():
            return
        now = time.monotonic()
        children: list[tuple[str | int, subprocess.Popen[bytes] | None]] = [("inference", self.inference), *enumerate(self.fronts)]
        for key, proc in children:
            if proc is not None and proc.poll() is not None:
                due = self._backoff[key].exited(now)
                self._due[key] = due
                what = "the inference process" if key == "inference" else "a front process"
                log.error(
                    "%s exited; starting it again in %.1f s",
                    what,
                    due - now,
                    extra={"returncode": proc.returncode, **({} if key == "inference" else {"index": key})},
                )
                if key == "inference":
                    self.inference = None
                else:
                    self.fronts[int(key)] = None
        for key, due in list(self._due.items()):
            if now < due or self._stopping.is_set():
                continue
            del self._due[key]
            self._backoff[key].start(now)
            try:
                if key == "inference":
                    self.inference = self._spawn_inference()
                else:
                    self.fronts[int(key)] = self._spawn_front(int(key))
            except OSError as exc:  # no process or no socket pair (EMFILE, ...): try again after the backoff
                self._due[key] = self._backoff[key].exited(now)
                log.error("could not start a child process (%s); trying again in %.1f s", exc, self._due[key] - now)
                continue
            self.restarts += 1

    def watch_in_thread(self) -> SplitServer:
        def loop() -> None:
            while not self._stopping.wait(0.2):
                self.check()

        self._thread = threading.Thread(target=loop, name="split-supervisor", daemon=True)
        self._thread.start()
        return self

    def run(self) -> int:
        """Block until SIGTERM/SIGINT (SIGHUP: reload the models), restarting children; then stop."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload())
        while not stop.wait(0.2):
            self.check()
        self.stop()
        return 0

    def reload(self) -> None:
        if self.inference is not None and self.inference.poll() is None:
            self.inference.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        grace = math.ceil(self.settings.shutdown_timeout_s) + 5
        if self.acceptor is not None:
            self.acceptor.stop()  # no new connections; those the fronts hold finish there
            if self.sock is not None:
                self.sock.close()  # refused now, rather than waiting in the backlog while the fronts drain
        _terminate([p for p in self.fronts if p is not None], grace)
        if self.inference is not None:
            _terminate([self.inference], grace)
        for sock in [self.sock, *self.front_socks]:
            if sock is not None:
                sock.close()
        removed = ipc.sweep(self.server_id)
        if removed:
            log.warning("removed shared memory left by killed processes", extra={"segments": removed})
        shutil.rmtree(self._dir, ignore_errors=True)
        log.info("split server stopped")


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("child did not stop in time; killing it", extra={"pid": p.pid})
            p.kill()
            p.wait()


def serve(settings: Settings) -> int:
    """`vqtok serve --front-workers N`."""
    return SplitServer(settings).start().run()


# --- the children ---


def _front(settings: Settings, config: dict[str, Any]) -> None:
    import uvicorn

    from ..app import create_app, uvicorn_config
    from .front import remote_repository

    app = create_app(settings, repository=remote_repository(config["socket"], config["server_id"]))
    if "channel" in config:  # balanced: connections arrive from the supervisor
        handoff.handoff_server(uvicorn_config(app, settings), socket.socket(fileno=int(config["channel"]))).run()
        return
    sock = socket.socket(fileno=int(config["fd"]))
    uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])


def _exit_with_parent() -> None:
    """SIGTERM to this child when the supervisor is gone (killed: it could not stop its children)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_main(role: str) -> None:
    from .. import logs

    config = json.loads(sys.stdin.read())
    sys.stdin.close()
    _exit_with_parent()
    settings = Settings(**config["settings"])
    logs.configure(settings.log_format, settings.log_level)
    if role == "inference":
        from . import inference

        inference.main(settings, config["socket"])
    elif role == "front":
        _front(settings, config)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    child_main(sys.argv[1])
