"""A split server (`front_workers` = N > 0): one inference process and N front processes on one port.

    supervisor (this module; `vqtok serve --front-workers N`)
      ├─ inference process  `python -m service.split engine`: repository, runtimes, batchers (engine.py)
      └─ N front processes  `python -m service.split front`: uvicorn + the FastAPI app on the connections
                            the supervisor hands over (or the shared listening socket), models reached
                            through remote.py

The supervisor binds the port once. By default (`front_accept="balanced"`) it accepts every connection
itself and hands it to the fronts in turn (handoff.py: the kernel's own spreading over processes that
accept on one socket piles a burst of keep-alive connections onto a few fronts); with "shared" every
front accepts on the listening socket, as uvicorn's own `--workers` does. A child that
exits while the server runs is started again: a front at once, the inference process after a second;
meanwhile the fronts answer 503. On SIGTERM/SIGINT the fronts stop first (in-flight requests finish on
the inference process), then the inference process (it drains its queues), then every shared-memory
segment of this server is removed, including those of a killed front. SIGHUP reloads the models.

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

from . import handoff, ipc
from .settings import Settings

log = logging.getLogger("vqtok.split")
_ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class SplitServer:
    """The supervisor: `start()`, then `run()` (blocks, restarting children) or `watch_in_thread()`; `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server_id = f"{os.getpid()}.{next(_counter)}"
        self._dir = tempfile.mkdtemp(prefix="vqtok-split-")
        self.socket_path = os.path.join(self._dir, "engine.sock")
        self.sock: socket.socket | None = None
        self.acceptor: handoff.Acceptor | None = None
        self.engine: subprocess.Popen[bytes] | None = None
        self.fronts: list[subprocess.Popen[bytes] | None] = []
        self.restarts = 0
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
            [sys.executable, "-m", "service.split", role],
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

    def _spawn_engine(self) -> subprocess.Popen[bytes]:
        return self._spawn("engine", {})

    def _spawn_front(self, index: int) -> subprocess.Popen[bytes]:
        assert self.sock is not None
        if self.acceptor is None:
            fd = self.sock.fileno()
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
            self.sock = _listen(s.host, s.port)
        except OSError as exc:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise CLIError(f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from None
        if s.front_accept == "balanced":
            handoff.raise_open_files_limit()
            self.acceptor = handoff.Acceptor(self.sock, s.front_workers)
        self.engine = self._spawn_engine()
        self.fronts = [self._spawn_front(i) for i in range(s.front_workers)]
        if self.acceptor is not None:
            self.acceptor.start()
        log.info(
            "split server started",
            extra={
                "port": self.port,
                "fronts": s.front_workers,
                "engine_pid": self.engine.pid,
                "front_pids": [p.pid for p in self.fronts if p],
            },
        )
        return self

    def check(self) -> None:
        """Start again any child that exited (called every 0.2 s by `run`/`watch_in_thread`)."""
        if self._stopping.is_set():
            return
        if self.engine is not None and self.engine.poll() is not None:
            log.error("the inference process exited; starting it again", extra={"returncode": self.engine.returncode})
            self.restarts += 1
            time.sleep(1.0)  # a crash loop must not spin
            if not self._stopping.is_set():
                self.engine = self._spawn_engine()
        for i, front in enumerate(self.fronts):
            if front is not None and front.poll() is not None and not self._stopping.is_set():
                log.error("a front process exited; starting it again", extra={"returncode": front.returncode, "index": i})
                self.restarts += 1
                self.fronts[i] = self._spawn_front(i)

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
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGHUP)

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
        if self.engine is not None:
            _terminate([self.engine], grace)
        if self.sock is not None:
            self.sock.close()
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

    from .app import create_app, uvicorn_config

    app = create_app(settings, engine_socket=config["socket"], server_id=config["server_id"])
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
    from . import logs

    config = json.loads(sys.stdin.read())
    sys.stdin.close()
    _exit_with_parent()
    settings = Settings(**config["settings"])
    logs.configure(settings.log_format, settings.log_level)
    if role == "engine":
        from . import engine

        engine.main(settings, config["socket"])
    elif role == "front":
        _front(settings, config)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    child_main(sys.argv[1])
