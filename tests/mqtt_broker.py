"""A real MQTT broker for tests: Mosquitto when installed, else the embedded amqtt broker.

Import as `from mqtt_broker import start_test_broker` (pytest puts tests/ on sys.path).
DETECTOR_TEST_BROKER=embedded forces the fallback; =mosquitto makes a missing Mosquitto
an error instead of a silent fallback (for CI that must test against the real thing).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from detector.broker import EmbeddedBroker

HOST = "127.0.0.1"
ENV_CHOICE = "DETECTOR_TEST_BROKER"
SBIN_MOSQUITTO = "/usr/sbin/mosquitto"  # Debian's path, often not on a normal user's PATH


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str | None:
    if os.environ.get(ENV_CHOICE, "auto") == "embedded":
        return None
    found = shutil.which("mosquitto")
    if found is None and os.access(SBIN_MOSQUITTO, os.X_OK):
        found = SBIN_MOSQUITTO
    return found


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class BrokerHandle:
    """A running test broker. `restart()` keeps the port, so clients can reconnect."""

    def __init__(self, kind: str, port: int, exe: str | None = None, *, listener: str | None = None,
                 conf_extra: str = "") -> None:
        self.host = HOST
        self.port = port
        self.kind = kind  # "mosquitto" or "embedded"
        self._exe = exe
        # Mosquitto only: `listener` replaces the default plain anonymous listener (its
        # "{port}" is this handle's port); `conf_extra` lines are appended to the config.
        self._listener = listener
        self._conf_extra = conf_extra
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._embedded: EmbeddedBroker | None = None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "mosquitto.log" if self._dir else None

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id; None for the embedded broker (it runs in this process)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        if self.kind == "embedded":
            self._embedded = EmbeddedBroker(HOST, self.port)
            self._embedded.start(timeout)
            self.port = self._embedded.port
            return
        assert self._exe is not None
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="test-mosquitto-"))
        conf = self._dir / "mosquitto.conf"
        if self._listener is None:
            listener = [f"listener {self.port} {HOST}", "allow_anonymous true"]
        else:
            listener = [self._listener.replace("{port}", str(self.port))]
        conf.write_text("\n".join([
            *listener,
            "persistence false",
            # As deploy/mosquitto/mosquitto.conf: without it Nagle's algorithm and delayed
            # ACKs held readings and alerts for tens of milliseconds (publish -> alert p50
            # 24-35 ms, with it 5 ms; bench/RESULTS.md).
            "set_tcp_nodelay true",
            # Load tests publish bursts far above the default queue limit of 1000.
            "max_queued_messages 100000",
            f"log_dest file {self._dir / 'mosquitto.log'}",
            # Not "all": debug logs every PUBLISH, which would slow down load tests.
            # One type per line: Mosquitto ignores any further words on a log_type line.
            *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
            # As root, Mosquitto would switch to user "mosquitto", who cannot write the log.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            self._conf_extra,
            "",
        ]))
        log = self._dir / "mosquitto.log"
        seen = log.stat().st_size if log.exists() else 0
        with open(self._dir / "stderr.txt", "ab") as err:
            self._proc = subprocess.Popen([self._exe, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=err, stderr=err)
        atexit.register(self._kill)  # a test run that dies early must not leave brokers behind
        deadline = time.monotonic() + timeout
        # "running" is logged once the listener is bound: an accepting port alone could
        # belong to another process that took the port first.
        while not (self._logged_since(seen, " running") and _accepts(self.port)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"mosquitto did not start on {HOST}:{self.port}: {self._tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start on the same port (a broker outage of at least `down_for` s)."""
        if self._embedded is not None:
            self._embedded.stop()
        self._kill()
        time.sleep(down_for)
        self.start()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _logged_since(self, offset: int, text: str) -> bool:
        assert self._dir is not None
        try:
            with open(self._dir / "mosquitto.log", "rb") as fh:
                fh.seek(offset)
                return text.encode() in fh.read()
        except FileNotFoundError:
            return False

    def _tail(self) -> str:
        assert self._dir is not None
        text = ""
        for name in ("stderr.txt", "mosquitto.log"):
            path = self._dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-3:]) or "no output"

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_test_broker(timeout: float = 10.0, *, listener: str | None = None,
                      conf_extra: str = "") -> BrokerHandle:
    """A running broker on a free port. `listener` (Mosquitto config lines replacing the
    default `listener <port> 127.0.0.1` + `allow_anonymous true`; "{port}" in it is the
    port) and `conf_extra` (lines appended) need Mosquitto: without it they raise."""
    exe = find_mosquitto()
    if exe is None:
        if os.environ.get(ENV_CHOICE) == "mosquitto":
            raise RuntimeError(f"{ENV_CHOICE}=mosquitto but no mosquitto binary found")
        if listener is not None or conf_extra:
            raise RuntimeError("a custom broker config needs mosquitto, which is not installed")
        handle = BrokerHandle("embedded", 0)  # EmbeddedBroker binds port 0 itself: no race
        handle.start(timeout)
        return handle
    for attempt in range(3):
        # Another process may grab the free port before Mosquitto binds it; pick again.
        handle = BrokerHandle("mosquitto", free_port(), exe, listener=listener, conf_extra=conf_extra)
        try:
            handle.start(timeout)
            return handle
        except RuntimeError:
            handle.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
