"""The MQTT side: subscribe, enqueue each message's payload; publish alerts.

paho calls ``on_message`` on its network thread: this module only maps the topic to a
stream and puts the raw payload on the bounded :class:`~detector.intake.Intake`;
decoding and all model work happen in the worker. An exception escaping a paho callback
would silently end the network thread, so every callback catches, counts and logs
instead.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detector.config import Config
from detector.errors import InputError
from detector.intake import Intake, Raw
from detector.metrics import Metrics
from detector.payloads import item_count, oversize
from detector.ratelog import RateLimitedLog

log = logging.getLogger("detector.mqtt")

# QoS 1 alerts in flight at once (unacknowledged), unless the broker allows fewer.
MAX_INFLIGHT = 1000


def _password(cfg: Config) -> str | None:
    m = cfg.mqtt
    if m.password_file:
        path = cfg.resolve(m.password_file)
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as err:
            raise InputError(f"[mqtt] password_file {path}", f"cannot read: {err.strerror or err}") from None
        except UnicodeDecodeError:  # its message would quote the password's bytes
            raise InputError(f"[mqtt] password_file {path}", "not UTF-8 text") from None
    if m.password_env:
        if m.password_env not in os.environ:
            raise InputError("[mqtt] password_env", f"environment variable {m.password_env} is not set")
        return os.environ[m.password_env]
    return None


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # Without a callback OpenSSL asks for the passphrase on the terminal: a daemon would
    # hang (or fail obscurely) at start. Refuse instead.
    raise _EncryptedKey


def _readable(key: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:  # missing, a directory, no permission
        raise InputError(f"[mqtt] {key} {path}", f"cannot read: {err.strerror or err}") from None


def tls_context(cfg: Config) -> ssl.SSLContext:
    """TLS for ``[mqtt] tls``: the broker's certificate verified against ``ca_file`` (else
    the system CAs) and its host name checked; ``cert_file``/``key_file`` the client's.

    Every file is loaded here, at start, so a missing, unreadable or wrong one stops the
    start with one line naming its key and file instead of a reconnect loop (or, for an
    encrypted key, a passphrase prompt)."""
    m = cfg.mqtt
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if m.ca_file:
        ca = cfg.resolve(m.ca_file)
        _readable("ca_file", ca)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, ValueError) as err:
            raise InputError(f"[mqtt] ca_file {ca}", f"no PEM certificate in it ({err})") from None
    else:
        ctx.load_default_certs()
    if m.cert_file:  # config.py makes cert_file and key_file go together
        cert, key = cfg.resolve(m.cert_file), cfg.resolve(m.key_file)
        _readable("cert_file", cert)
        _readable("key_file", key)
        try:  # the certificate alone first, so a bad key is not blamed on it
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
        except (ssl.SSLError, ValueError) as err:
            raise InputError(f"[mqtt] cert_file {cert}", f"no PEM certificate in it ({err})") from None
        try:
            ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
        except _EncryptedKey:
            raise InputError(f"[mqtt] key_file {key}", "the key is encrypted; give an unencrypted key "
                                                       "readable by this service only") from None
        except (ssl.SSLError, ValueError) as err:
            raise InputError(f"[mqtt] key_file {key}", f"not the private key of cert_file {cert} ({err})") from None
    return ctx


def loop_stop(client: mqtt.Client) -> None:
    """``client.loop_stop()`` without paho's race (eclipse-paho/paho.mqtt.python#872): the
    network thread sets ``client._thread`` to None as it exits, so a ``loop_stop`` that
    comes between its own check of it and its ``join`` raises AttributeError. The thread
    has ended then, which is all a caller wants. It hit a CI run at the end of a test's
    publish (2026-11-25); after a DISCONNECT, when the thread exits by itself, more so."""
    try:
        client.loop_stop()
    except AttributeError:
        pass


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

    QoS 0 PUBLISH packets already in that buffer are also taken apart here and handed
    to ``on_qos0(topic, payload)`` (when set), without paho's per-packet machinery: that
    cost ~40 µs of interpreter time per message (a message object with its own Condition,
    a dozen calls), as much as scoring several readings. Anything else, including a
    packet not wholly read yet, an MQTT 5 PUBLISH with properties or a topic that is not
    UTF-8, goes through paho as before.
    """

    READ_AHEAD = 65536
    # Packets per loop_read before paho gets back to writing (alerts, PUBACKs) and pinging:
    # a steady inflow must not starve the other direction.
    MAX_PACKETS = 1000

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0
        self._exact = False  # past MAX_PACKETS: read only what the current packet needs
        self._got = 0  # bytes read from the socket in this loop_read
        self.on_qos0: Callable[[str, bytes], None] | None = None
        self.linger = 0.0  # seconds to let the socket fill after a read that found little

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        if self.on_qos0 is not None and self._in_packet["command"] == 0 and self._qos0_publishes():
            with self._msgtime_mutex:  # keepalive: the broker is alive
                self._last_bytes_received = mqtt.time_func()
            return mqtt.MQTT_ERR_SUCCESS
        return super()._packet_read()

    def _qos0_publishes(self) -> int:
        """Hand every whole QoS 0 PUBLISH at the head of the read-ahead buffer to
        ``on_qos0``; returns how many. Stops at the first packet paho must see."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        v5 = self._protocol == mqtt.MQTTv5
        handle = self.on_qos0
        assert handle is not None
        n = 0
        while pos < end and buf[pos] & 0xF6 == 0x30:  # PUBLISH, QoS 0 (retain and dup bits aside)
            i, length, shift = pos + 1, 0, 0
            while i < end and shift < 28:
                byte = buf[i]
                i += 1
                length |= (byte & 127) << shift
                shift += 7
                if byte < 128:
                    break
            else:
                break  # the length not wholly read yet, or malformed: paho's to judge
            stop = i + length
            if stop > end or length < 2:  # not wholly read yet, or malformed
                break
            start = i + 2 + (buf[i] << 8 | buf[i + 1])  # after the topic
            if start > stop or (v5 and (start >= stop or buf[start] != 0)):  # v5: no properties
                break
            try:
                topic = buf[i + 2:start].decode("utf-8")
            except UnicodeDecodeError:
                break
            pos = self._rpos = stop  # first: the handler must never see a packet twice
            handle(topic, buf[start + v5:stop])
            n += 1
        return n

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(bufsize if self._exact else max(bufsize, self.READ_AHEAD))
            self._got += len(data)
            if len(data) <= bufsize:
                return data  # b"" (connection closed) included
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:self._rpos]

    def _create_socket_connection(self) -> socket.socket:
        # Nagle's algorithm holds a small write (an alert, a PUBACK) while an earlier one is
        # unacknowledged, and the broker's delayed ACK can make that tens of milliseconds.
        sock = super()._create_socket_connection()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        # Return only with the read-ahead buffer empty: paho's next select() cannot see
        # bytes we hold, and would sleep on them.
        self._exact = False
        self._got = 0
        rc = super().loop_read(max_packets)
        done = 1
        while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(1)
            done += 1
            self._exact = done >= self.MAX_PACKETS
        if self.linger and rc == mqtt.MQTT_ERR_SUCCESS and 0 < self._got < self.READ_AHEAD:
            # A wake-up costs this thread ~150 µs at low rates (select, paho's loop, a cold
            # cache), more than the few messages it brings: let the next one bring more.
            time.sleep(self.linger)
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
        self._invalid_log = RateLimitedLog(log, cfg.log.invalid_interval_s)
        self._connect_fail_log = RateLimitedLog(log, 60.0)
        self.connected = threading.Event()
        self._refused = False
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
            self.client.tls_set_context(tls_context(cfg))
        self.client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(max(1, m.reconnect_max_s)))
        # Alerts published while the broker is away wait in paho's queue, at most [alerts]
        # max_queued of them (see publish()), so an outage cannot grow memory without limit.
        # paho's own bound sits above ours: the retained status is never refused.
        self._max_queued = cfg.alerts.max_queued
        self._unacked: set[int] = set()  # mids of alerts not yet acknowledged by the broker
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()  # from on_publish
        self._drop_log = RateLimitedLog(log, 60.0)
        self.client.max_queued_messages_set(self._max_queued + 16)
        # paho's default of 20 alerts in flight made a burst of alerts (one fault seen by a
        # hundred streams) wait for round trips behind the inflow: ~250 ms at 8k readings/s.
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_qos0 = self._on_qos0
        self.client.linger = cfg.worker.linger_ms / 1000.0
        self.client.manual_ack_set(True)

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
        """Publish ``offline`` (retained), disconnect and stop the network thread, within
        ``timeout`` seconds whatever the broker does. paho's ``loop_stop()`` waits for a
        connection attempt in progress (up to its 5 s connect timeout, or a TLS handshake)
        and for a hung broker to take our DISCONNECT, so it runs in a helper thread that
        gets the time left; past that the process exits without it (paho's network thread
        is a daemon thread) and the broker publishes the last will, ``offline``."""
        deadline = time.monotonic() + timeout
        if self.connected.is_set():
            info = self.client.publish(self._cfg.alerts.status_topic, b"offline", qos=1, retain=True)
            try:
                # A fifth of the budget stays for the disconnect itself.
                info.wait_for_publish(timeout=max(0.0, (deadline - time.monotonic()) * 0.8))
                published = info.is_published()
            except (RuntimeError, ValueError):
                published = False
            if not published:
                log.warning("offline status not acknowledged by the broker before disconnecting")
        # QoS 1 alerts the broker has not acknowledged (it is away, or was too slow) go with
        # the process: paho keeps them in memory only. Said and counted, not lost silently.
        lost = self.unacknowledged()
        if lost:
            self._metrics.dropped_alerts.labels(reason="shutdown").inc(lost)
            log.warning("%d alert(s) not acknowledged by the broker at shutdown: not delivered "
                        "(dropped_alerts_total{reason=\"shutdown\"})", lost)
        self.client.disconnect()
        stopper = threading.Thread(target=loop_stop, args=(self.client,), name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        if stopper.is_alive():
            log.warning("MQTT network thread still busy with the broker after the shutdown budget; "
                        "leaving it")
        self._metrics.mqtt_connected.set(0)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish at QoS 1; None when refused. Alerts (not retained; published from one
        thread, the worker) are refused once ``[alerts] max_queued`` of them wait for the
        broker's acknowledgement, which only happens when it is away or too slow, and
        each refusal is counted in ``dropped_alerts_total{reason="queue_full"}``. paho
        keeps the queued ones across reconnects and resends them. The retained status
        (one message at a time) is never refused."""
        if retain:
            return self.client.publish(topic, payload, qos=1, retain=True)
        if self.unacknowledged() < self._max_queued:
            info = self.client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:  # NO_CONN means queued: sent on reconnect
                self._unacked.add(info.mid)
                return info
        self._metrics.dropped_alerts.labels(reason="queue_full").inc()
        self._drop_log.warning("alert_queue_full", f"alert queue full ({self._max_queued} alerts waiting for "
                                                   f"the broker, [alerts] max_queued): dropped an alert on {topic!r}")
        return None

    def unacknowledged(self) -> int:
        """Alerts published and not yet acknowledged by the broker (the acknowledgements
        received so far are taken into account first)."""
        while True:
            try:
                self._unacked.discard(self._acks.get_nowait())
            except queue.Empty:
                return len(self._unacked)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode,
                    props: object = None) -> None:
        # Runs under paho's message lock: only hand the mid over, never wait for anything.
        self._acks.put(mid)

    def _stream_id(self, topic: str) -> str | None:
        """The stream id for a topic: ``[mqtt] stream_id`` with ``{topic}`` and the topic's
        levels ``{0}``, ``{1}``, ...; None when the topic has too few levels."""
        template = self._cfg.mqtt.stream_id
        if template == "{topic}":
            return topic
        try:
            return template.format(*topic.split("/"), topic=topic)
        except (IndexError, KeyError):  # too few levels (a KeyError only if the config check missed one)
            return None

    # ---- paho callbacks (network thread: never raise) ---------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, props: object = None) -> None:
        try:
            if reason.is_failure:
                self._refused = True  # on_disconnect follows: this line says it all
                log.error("broker %s:%d refused the connection: %s", self._host, self._port, reason)
                return
            # An MQTT 5 broker may allow fewer QoS 1 messages in flight than our 1,000; paho
            # does not read its Receive Maximum, and going over it is a protocol error the
            # broker answers by disconnecting us (in a burst of alerts, of all times). paho's
            # setter refuses a connected client only for fear of a change to or from 0 (no
            # limit), which this never is; its getter is what the tests check.
            receive_max = getattr(props, "ReceiveMaximum", None)
            valid = isinstance(receive_max, int) and receive_max > 0
            client._max_inflight_messages = min(MAX_INFLIGHT, receive_max) if valid else MAX_INFLIGHT
            self.connected.set()
            self._metrics.mqtt_connected.set(1)
            log.info("connected to %s:%d", self._host, self._port)
            # Subscribing here, not once at start, is what makes a reconnect resubscribe.
            client.subscribe([(t, self._cfg.mqtt.qos) for t in self._cfg.mqtt.topics])
        except Exception:
            log.exception("error in on_connect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # Refused TCP, DNS or TLS failures end here, not in on_connect: say so, or an
        # unreachable broker would only show as "not subscribed". paho calls this inside
        # its `except OSError`, so the error at hand is the reason (e.g. certificate
        # verify failed).
        err = sys.exc_info()[1]
        why = f" ({' '.join(str(err).split())[:200]})" if err is not None else ""
        self._connect_fail_log.warning("connect", f"cannot connect to {self._host}:{self._port}{why}; "
                                                  "retrying with back-off")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], props: object = None) -> None:
        try:
            failed = [str(r) for r in reasons if r.is_failure]
            if failed and len(failed) == len(reasons):
                # Nothing will ever arrive (an ACL denies every filter): not "online", and
                # /healthz stays 503 "not subscribed yet"; tried again at the next connect.
                log.error("every subscription refused by the broker (its ACL?): %s; nothing will be "
                          "scored", ", ".join(failed))
                return
            if failed:
                log.error("subscription refused for %d of %d topic filters: %s", len(failed), len(reasons),
                          ", ".join(failed))
            self.publish(self._cfg.alerts.status_topic, b"online", retain=True)
            self.subscribed.set()
        except Exception:
            log.exception("error in on_subscribe")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, props: object = None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        self._metrics.mqtt_connected.set(0)
        if self._refused:  # on_connect has logged why
            self._refused = False
        elif not was_connected:
            # Refused during the connect itself (a TLS 1.3 broker rejecting our missing
            # client certificate, bad credentials): a failed connect, rate-limited like one.
            self._connect_fail_log.warning("connect", f"cannot connect to {self._host}:{self._port} "
                                                      f"({reason}); retrying with back-off")
        elif reason.is_failure:
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # Acknowledged here, not by paho on arrival (manual_ack_set): a QoS 1 message that
        # arrives while we are stopping stays unacknowledged, so with a persistent session
        # the broker delivers it again to the next start instead of it being lost.
        ack = True
        try:
            ack = self._receive(msg.topic, msg.payload, msg.qos)
        except Exception:
            self._metrics.invalid.labels(reason="internal_error").inc()
            log.exception("error handling a message on %r", getattr(msg, "_topic", "?"))
        finally:
            if ack and msg.qos > 0:
                try:
                    client.ack(msg.mid, msg.qos)
                except Exception:  # a lost connection: the broker redelivers it anyway
                    pass

    def _on_qos0(self, topic: str, payload: bytes) -> None:
        """QoS 0 messages taken apart by :class:`ReadAheadClient` itself."""
        try:
            self._receive(topic, payload, 0)
        except Exception:
            self._metrics.invalid.labels(reason="internal_error").inc()
            log.exception("error handling a message on %r", topic)

    def _receive(self, topic: str, payload: bytes, qos: int) -> bool:
        """Queue one message's payload for the worker; False when it must not be
        acknowledged."""
        received = time.time()
        stream = self._stream_id(topic)
        if stream is None:
            self._metrics.invalid.labels(reason="bad_topic").inc()
            self._invalid_log.warning("bad_topic", f"topic {topic!r} does not fit "
                                                   f"[mqtt] stream_id {self._cfg.mqtt.stream_id!r}")
            return True
        too_large = oversize(payload, self._cfg.mqtt.max_payload_bytes)
        if too_large is not None:  # judged here: it must not take the queue's room
            self._metrics.invalid.labels(reason=too_large.reason).inc()
            self._invalid_log.warning(too_large.reason, f"invalid reading on {topic!r}: "
                                                        f"{too_large.reason}: {too_large.detail}")
            return True
        if self._intake.closed and qos > 0 and self._cfg.mqtt.persistent_session:
            return False  # redelivered after the restart: neither lost nor counted twice
        dropped = self._intake.put(Raw(stream, topic, payload, received))
        if dropped:
            # After the intake closed (a stop in progress) nothing is queued any more:
            # that is not an overload.
            reason = "shutdown" if self._intake.closed else "queue_full"
            n = sum(item_count(m.payload) for m in dropped)
            self._metrics.dropped.labels(reason=reason).inc(n)
            self._invalid_log.warning(reason, f"{'stopping' if reason == 'shutdown' else 'queue full'}: "
                                              f"dropped {n} reading(s)")
        return True
