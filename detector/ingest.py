"""The MQTT side: subscribe, decode on paho's network thread, enqueue; publish alerts.

paho calls ``on_message`` on its network thread: this module only decodes the payload
and puts readings on the bounded :class:`~detector.intake.Intake`; all model work
happens in the worker. An exception escaping a paho callback would silently end the
network thread, so every callback catches, counts and logs instead.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detector.config import Config
from detector.errors import InputError
from detector.intake import Intake, Item
from detector.metrics import Metrics
from detector.payloads import decode

log = logging.getLogger("detector.mqtt")


class RateLimitedLog:
    """At most one line per ``interval`` seconds per kind, with the count it stood for."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            more = self._suppressed.pop(kind, 0)
        log.warning("%s%s", msg, f" (+{more} more since the last such line)" if more else "")


def _password(cfg: Config) -> str | None:
    m = cfg.mqtt
    if m.password_file:
        path = cfg.resolve(m.password_file)
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as err:
            raise InputError(f"[mqtt] password_file {path}", f"cannot read: {err.strerror or err}") from None
    if m.password_env:
        if m.password_env not in os.environ:
            raise InputError("[mqtt] password_env", f"environment variable {m.password_env} is not set")
        return os.environ[m.password_env]
    return None


class ReadAheadClient(mqtt.Client):
    """A paho client that reads the socket 64 KiB at a time.

    paho reads every packet with about three ``recv`` calls and one ``select``. Each of
    those releases the GIL, and while the worker thread is scoring, the network thread then
    waits for the interpreter's switch interval to get it back (the "convoy effect"): the
    daemon received at a fifth of a bare subscriber's rate, with its network thread
    mostly waiting for the GIL. Serving paho's small reads from one large read, and
    draining what was read before going back to ``select``, makes that one wait per 64 KiB
    instead of three per message. Only paho's socket reads change: packets, callbacks,
    TLS and reconnects are paho's own.
    """

    READ_AHEAD = 65536
    MAX_PACKETS = 10_000  # per loop: then paho gets to write (PUBACKs, alerts) and ping

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, self.READ_AHEAD))
            if len(data) <= bufsize:
                return data  # b"" (connection closed) included
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        # Return only with the read-ahead buffer empty: paho's next select() cannot see
        # bytes we hold, and would sleep on them.
        rc = super().loop_read(max_packets)
        done = 1
        while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is not None and (
                self._rpos < len(self._rbuf) or done < self.MAX_PACKETS):
            before = (self._rbuf, self._rpos)
            rc = super().loop_read(1)
            done += 1
            if self._rpos >= len(self._rbuf) and before == (self._rbuf, self._rpos):
                break  # nothing more to read right now
        return rc

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # bytes of the old connection are not the new one's
        return super().reconnect()


class MqttLink:
    def __init__(self, cfg: Config, host: str, port: int, intake: Intake, metrics: Metrics,
                 protocol: str | None = None) -> None:
        m = cfg.mqtt
        self._cfg = cfg
        self._host, self._port = host, port
        self._intake = intake
        self._metrics = metrics
        self._v5 = (protocol or m.protocol) == "5"
        self._invalid_log = RateLimitedLog(cfg.log.invalid_interval_s)
        self._connect_fail_log = RateLimitedLog(60.0)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        kwargs = {} if self._v5 else {"clean_session": not m.persistent_session}
        self.client = ReadAheadClient(CallbackAPIVersion.VERSION2, client_id=m.client_id,
                                      protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311, **kwargs)
        status = cfg.alerts.status_topic
        self.client.will_set(status, b"offline", qos=1, retain=True)
        password = _password(cfg)
        if m.username or password is not None:
            self.client.username_pw_set(m.username or None, password)
        if m.tls:
            for key in ("ca_file", "cert_file", "key_file"):
                value = getattr(m, key)
                if value and not os.access(cfg.resolve(value), os.R_OK):
                    raise InputError(f"[mqtt] {key} {cfg.resolve(value)}", "missing or unreadable")
            self.client.tls_set(ca_certs=str(cfg.resolve(m.ca_file)) if m.ca_file else None,
                                certfile=str(cfg.resolve(m.cert_file)) if m.cert_file else None,
                                keyfile=str(cfg.resolve(m.key_file)) if m.key_file else None,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(max(1, m.reconnect_max_s)))
        # Alerts published while the broker is away wait in paho's queue; bounded so an
        # outage cannot grow memory without limit.
        self.client.max_queued_messages_set(10_000)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        kwargs: dict[str, object] = {}
        if self._v5:
            kwargs["clean_start"] = not self._cfg.mqtt.persistent_session
            if self._cfg.mqtt.persistent_session:
                # MQTT 5 ends a session at disconnect unless it is given an expiry: without
                # this, "persistent" sessions would lose every reading sent while we are down.
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0xFFFFFFFF  # never expires
                kwargs["properties"] = props
        self.client.connect_async(self._host, self._port, keepalive=self._cfg.mqtt.keepalive_s, **kwargs)
        self.client.loop_start()

    def stop_intake(self) -> None:
        """Stop taking readings (shutdown drains what is queued)."""
        try:
            self.client.unsubscribe(list(self._cfg.mqtt.topics))
        except Exception:  # best effort: the intake is closed right after anyway
            pass
        self._intake.close()

    def stop(self, timeout: float) -> None:
        """Publish ``offline`` (retained), disconnect, stop the network thread."""
        if self.connected.is_set():
            info = self.publish(self._cfg.alerts.status_topic, b"offline", retain=True)
            try:
                info.wait_for_publish(timeout=timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish offline status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()
        self._metrics.mqtt_connected.set(0)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def _stream_id(self, topic: str) -> str | None:
        """The stream id for a topic: ``[mqtt] stream_id`` with ``{topic}`` and the topic's
        levels ``{0}``, ``{1}``, ...; None when the topic has too few levels."""
        template = self._cfg.mqtt.stream_id
        if template == "{topic}":
            return topic
        try:
            return template.format(*topic.split("/"), topic=topic)
        except IndexError:
            return None

    # ---- paho callbacks (network thread: never raise) ---------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, props: object = None) -> None:
        try:
            if reason.is_failure:
                log.error("broker %s:%d refused the connection: %s", self._host, self._port, reason)
                return
            self.connected.set()
            self._metrics.mqtt_connected.set(1)
            log.info("connected to %s:%d", self._host, self._port)
            # Subscribing here, not once at start, is what makes a reconnect resubscribe.
            client.subscribe([(t, self._cfg.mqtt.qos) for t in self._cfg.mqtt.topics])
        except Exception:
            log.exception("error in on_connect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # Refused TCP, DNS or TLS failures end here, not in on_connect: say so, or an
        # unreachable broker would only show as "not subscribed".
        self._connect_fail_log.warning("connect", f"cannot connect to {self._host}:{self._port}; "
                                                  "retrying with back-off")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], props: object = None) -> None:
        try:
            failed = [str(r) for r in reasons if r.is_failure]
            if failed:
                log.error("subscription refused: %s", ", ".join(failed))
            self.publish(self._cfg.alerts.status_topic, b"online", retain=True)
            self.subscribed.set()
        except Exception:
            log.exception("error in on_subscribe")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, props: object = None) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self._metrics.mqtt_connected.set(0)
        if reason.is_failure:
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            received = time.time()
            stream = self._stream_id(msg.topic)
            if stream is None:
                self._metrics.invalid.labels(reason="bad_topic").inc()
                self._invalid_log.warning("bad_topic", f"topic {msg.topic!r} does not fit "
                                                       f"[mqtt] stream_id {self._cfg.mqtt.stream_id!r}")
                return
            readings, rejected = decode(stream, msg.payload, received, self._cfg.mqtt.max_payload_bytes)
            for r in rejected:
                self._metrics.invalid.labels(reason=r.reason).inc()
                self._invalid_log.warning(r.reason, f"invalid reading on {msg.topic!r}: {r.reason}: {r.detail}")
            if readings:
                dropped = self._intake.put([Item(r, received) for r in readings])
                if dropped:
                    self._metrics.dropped.labels(reason="queue_full").inc(dropped)
                    self._invalid_log.warning("queue_full", f"queue full: dropped {dropped} reading(s)")
        except Exception:
            self._metrics.invalid.labels(reason="internal_error").inc()
            log.exception("error handling a message on %r", getattr(msg, "topic", "?"))
