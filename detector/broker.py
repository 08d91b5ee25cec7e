"""Embedded MQTT broker (amqtt) for `[mqtt] host = "embedded"` and the demo.

The broker runs its own asyncio loop in a daemon thread so the synchronous daemon and
paho clients use it like any external broker. amqtt speaks MQTT 3.1.1 only (clients must
use `protocol=MQTTv311`); QoS 0/1, retained messages and last wills work.

Limits worth knowing: state is in memory only (retained messages vanish on stop); every
client is anonymous, and amqtt queues nothing for offline persistent sessions
(clean_session=False) of anonymous clients; a subscriber receives each message at its
subscription QoS even when published at a lower one. Use Mosquitto where that matters.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from contextvars import ContextVar
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

# amqtt and the `transitions` state machine it uses log every connection and state
# change at INFO/DEBUG; the daemon's own log should not drown in them.
for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# True while amqtt handles a SUBSCRIBE packet in the current client's task.
_subscribing: ContextVar[bool] = ContextVar("subscribing", default=False)


def _config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # An explicit plugin list stops amqtt loading its entry-point plugins (deprecated
        # path, with the $SYS publisher and packet loggers); anonymous auth is all we need.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _check_bindable(host: str, port: int) -> None:
    """Fail fast with a one-line reason: amqtt logs a full traceback on a failed bind."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            # Same option amqtt's listener uses, so a port in TIME_WAIT is not reported busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as exc:
        why = "port in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise RuntimeError(f"embedded MQTT broker cannot listen on {host}:{port}: {why}") from None


def _broker_class() -> type:
    from amqtt.broker import Broker  # imported late: amqtt pulls in websockets, psutil

    class _Broker(Broker):  # type: ignore[misc]
        """Works around two amqtt 0.12 bugs (private hooks: pin amqtt to 0.12.x)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

        async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                   listener_name: str) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.connections[task] = writer
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                self.connections.pop(task, None)

        async def drop_connections(self, timeout: float) -> None:
            """amqtt's shutdown cancels each client's reader and waits for it, but on
            Python 3.11 asyncio.wait_for swallows a cancel that coincides with an arriving
            packet, and shutdown hangs. Closing the sockets first ends readers on EOF."""
            for writer in self.connections.values():
                writer.transport.abort()
            if self.connections:
                await asyncio.wait(list(self.connections), timeout=timeout)

        # amqtt also sends, on every CONNECT, the retained messages matching *any* client's
        # subscriptions, so e.g. a fresh daemon would get a dashboard's status topics.
        # MQTT sends retained messages only in answer to a SUBSCRIBE: enforce that.
        async def _handle_subscription(self, *args: Any, **kwargs: Any) -> None:
            token = _subscribing.set(True)
            try:
                await super()._handle_subscription(*args, **kwargs)
            finally:
                _subscribing.reset(token)

        async def _publish_retained_messages_for_subscription(self, *args: Any, **kwargs: Any) -> None:
            if _subscribing.get():
                await super()._publish_retained_messages_for_subscription(*args, **kwargs)

    return _Broker


class EmbeddedBroker:
    """In-process MQTT 3.1.1 broker; `port=0` picks a free port (read it from `.port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_timeout = 10.0
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._port if self._port is not None else self._requested_port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("embedded MQTT broker already started")
        _check_bindable(self.host, self._requested_port)
        self._ready.clear()
        self._error = None
        self._stop_event = asyncio.Event()  # binds to the broker's loop on first use
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            try:
                self.stop(timeout)
            except RuntimeError:
                pass  # the daemon thread is abandoned; the start failure is what matters
            raise RuntimeError(f"embedded MQTT broker did not start within {timeout:g} s")
        if self._error is not None:
            err, self._error = self._error, None
            self._thread.join(timeout)
            self._thread = None
            cause = err.__cause__ or err  # amqtt wraps the OSError in a BrokerError
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.host}:"
                               f"{self._requested_port}: {cause}") from None

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        self._stop_timeout = timeout
        if loop is not None and stop_event is not None:
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed meanwhile: the thread is ending anyway
                pass
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"embedded MQTT broker did not stop within {timeout:g} s")
        self._thread = None
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            # Runner.close() cancels whatever amqtt left behind before closing the loop.
            with asyncio.Runner() as runner:
                self._loop = runner.get_loop()
                runner.run(self._serve())
        except BaseException as exc:  # the thread must not die silently
            if self._ready.is_set():
                log.warning("embedded MQTT broker stopped with an error: %s", exc)
            else:
                self._error = exc  # reported by start()
        finally:
            self._loop = None
            self._ready.set()

    async def _serve(self) -> None:
        assert self._stop_event is not None
        broker = _broker_class()(_config(self.host, self._requested_port))
        await broker.start()
        try:
            server = broker._servers["default"].instance  # amqtt has no public bound-address API
            self._port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await broker.drop_connections(0.3 * self._stop_timeout)
            try:
                await asyncio.wait_for(broker.shutdown(), 0.4 * self._stop_timeout)
            except TimeoutError:
                log.warning("embedded MQTT broker shutdown timed out; cancelling its tasks")
