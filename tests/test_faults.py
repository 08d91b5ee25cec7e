"""Faults the field throws at a daemon left alone for months, against real components: a
real Mosquitto the tests stop, restart, freeze and replace with a black hole, the real
daemon process (killed, frozen with SIGSTOP, signalled), a real tmpfs that fills up or
goes read-only, and real corrupt files. What each fault costs is in docs/operations.md,
"Guarantees".

SIGSTOP/SIGCONT of a daemon stands for "has not got round to it yet" (reading its socket,
reconnecting), so that what happens before and after is decided by the test, not by a race.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from detector.ingest import loop_stop
from helpers import ROOT, Daemon, Listener, plant_messages, publish_all, sample, wait_for
from mqtt_broker import BrokerHandle, start_test_broker

OUTAGE_S = 30.0
CKPT = Path("checkpoints") / "route-plant-0.npz"


@pytest.fixture(scope="module")
def broker() -> Iterator[object]:
    handle = start_test_broker()
    yield handle
    handle.stop()


def own_mosquitto(conf_extra: str = "") -> BrokerHandle:
    """A broker of the test's own (it gets stopped or frozen); Mosquitto only."""
    handle = start_test_broker(conf_extra=conf_extra)
    if handle.kind != "mosquitto":
        handle.stop()
        pytest.skip("stopping, restarting or freezing the broker needs mosquitto")
    return handle


def docs(n: int, seed: int, fault_at: int | None = None) -> list[dict]:
    """``n`` plant readings (JSON objects, one second apart, ending now)."""
    return [json.loads(p) for _, p in plant_messages("x", n, seed, fault_at)]


def singles(stream: str, ds: list[dict]) -> list[tuple[str, bytes]]:
    return [(stream, json.dumps(d).encode()) for d in ds]


def metric(d: Daemon, name: str) -> float:
    return sample(d.metrics(), name)


def wait_metric(d: Daemon, name: str, value: float, what: str, at_least: bool = False) -> None:
    """Wait until the series ``name`` equals ``value`` (or reaches it, ``at_least``)."""
    wait_for(lambda: metric(d, name) >= value if at_least else metric(d, name) == value, what)


def wait_health(d: Daemon, code: int, what: str) -> None:
    wait_for(lambda: d.healthz() == code, what)


def scored(d: Daemon) -> float:
    return metric(d, "anomaly_detector_readings_total")


def reach(d: Daemon, n: int, what: str) -> None:
    """Wait until ``d`` has scored ``n`` readings, then check it is exactly ``n``."""
    wait_for(lambda: scored(d) >= n, f"{what}: {n} readings scored")
    assert scored(d) == n, what


def subscribed_listener(port: int, *filters: str) -> Listener:
    """A Listener known to be subscribed to ``filters``: its last subscription, to a probe
    topic, has delivered (the broker handles one client's SUBSCRIBEs in order)."""
    probe = f"probe/{os.getpid()}/{time.monotonic_ns()}"
    lst = Listener(port, [*filters, probe])
    publish_all(port, [(probe, b"probe")])
    wait_for(lambda: lst.on(probe), f"a listener subscribed to {filters}")
    return lst


def alerts(lst: Listener, prefix: str) -> list[dict]:
    return [json.loads(m.payload) for m in lst.on(prefix + "/")]


def freeze(*ds: Daemon) -> None:
    for d in ds:
        d.signal(signal.SIGSTOP)


def thaw(*ds: Daemon) -> None:
    for d in ds:
        d.signal(signal.SIGCONT)


# ---- 1. the broker away for 30 s ------------------------------------------------------
def test_broker_outage_with_and_without_persistent_session(tmp_path: Path) -> None:
    """One 30 s outage seen by two daemons: A with a persistent session (Mosquitto with
    persistence, so the session survives the broker's restart), B without, and with room
    for only 2 alerts while disconnected."""
    broker = own_mosquitto(conf_extra=f"persistence true\npersistence_location {tmp_path}/\n")
    backoff = "reconnect_min_s = 1\nreconnect_max_s = 2\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", broker.port, mqtt="persistent_session = true\n" + backoff,
               extra='[alerts]\ntopic_prefix = "alerts-a"\nstatus_topic = "status/a"\n')
    b = Daemon(tmp_path / "b", broker.port, mqtt=backoff,
               extra='[alerts]\ntopic_prefix = "alerts-b"\nstatus_topic = "status/b"\nmax_queued = 2\n')
    streams = [f"sensors/plant/out{i}" for i in range(4)]
    # Per stream: 100 normal readings, 30 from a fault on (20 faulty, 10 normal again),
    # 10 published while the daemons are away from the restarted broker, 10 after.
    data = {s: docs(150, seed=40 + i, fault_at=100) for i, s in enumerate(streams)}
    a.start()
    b.start()
    try:
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][:100])])
        reach(a, 400, "A before the outage")
        reach(b, 400, "B before the outage")
        alerts_before = sum(metric(a, f'anomaly_detector_alerts_total{{event="{e}"}}')
                            for e in ("anomaly_start", "anomaly_end"))
        assert metric(b, 'anomaly_detector_dropped_alerts_total{reason="queue_full"}') == 0

        # The faults reach the daemons' sockets while they are frozen; the broker goes
        # away before they read them: every alert they raise is raised while disconnected.
        witness = subscribed_listener(broker.port, "sensors/#")
        freeze(a, b)
        publish_all(broker.port, [(s, json.dumps(data[s][100:130]).encode()) for s in streams])
        wait_for(lambda: len(witness.on("sensors/")) == 4, "the faults delivered")
        size = sum(len(json.dumps(data[s][100:130])) for s in streams)
        for d in (a, b):  # the same delivery to the frozen daemons' sockets
            assert d.proc is not None
            wait_for(lambda: unread_bytes(d.proc.pid, broker.port) >= size, "the faults in a frozen daemon's socket")
        witness.close()
        down_at = time.monotonic()
        broker.stop()
        thaw(a, b)
        for d in (a, b):
            reach(d, 520, "faults scored while disconnected")
            wait_metric(d, "anomaly_detector_mqtt_connected", 0, "mqtt_connected 0")
            wait_health(d, 503, "/healthz 503")
            assert "broker disconnected" in d.logtext() or "disconnected from the broker" in d.logtext()
        raised = sum(metric(a, f'anomaly_detector_alerts_total{{event="{e}"}}')
                     for e in ("anomaly_start", "anomaly_end")) - alerts_before
        assert raised >= 3, "the faults should raise an alert per stream"
        dropped_b = metric(b, 'anomaly_detector_dropped_alerts_total{reason="queue_full"}')
        assert dropped_b == raised - 2  # B holds 2 alerts; the rest are counted
        assert metric(a, 'anomaly_detector_dropped_alerts_total{reason="queue_full"}') == 0
        assert "alert queue full" in b.logtext()

        # Back after 30 s; the daemons have not reconnected yet when 10 more readings per
        # stream are published: A's session holds them, B (clean session) never sees them.
        freeze(a, b)
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        broker.start()
        outage = time.monotonic() - down_at
        la = subscribed_listener(broker.port, "alerts-a/#", "status/a")
        lb = subscribed_listener(broker.port, "alerts-b/#", "status/b")
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][130:140])])
        thaw(a, b)
        for d in (a, b):
            wait_health(d, 200, "reconnected and resubscribed")
            assert metric(d, "anomaly_detector_mqtt_connected") == 1
        reach(a, 560, "A: readings published before it reconnected")
        wait_for(lambda: len(alerts(la, "alerts-a")) >= raised, "A's alerts delivered after reconnecting")
        wait_for(lambda: len(alerts(lb, "alerts-b")) >= 2, "B's 2 queued alerts delivered")
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][140:150])])
        reach(a, 600, "A: scoring resumed")
        reach(b, 560, "B: scoring resumed (what was published before it reconnected is lost)")
        # Every alert A raised is delivered, those raised while disconnected included; B
        # delivers the 2 it could hold. (Episodes ending after the reconnect add alerts.)
        def while_away(xs: list[dict]) -> list[dict]:
            return [x for x in xs if x["ts"] <= data[x["stream"]][129]["ts"]]

        total_a = sum(metric(a, f'anomaly_detector_alerts_total{{event="{e}"}}')
                      for e in ("anomaly_start", "anomaly_end")) - alerts_before
        wait_for(lambda: len(alerts(la, "alerts-a")) >= total_a, "every alert of A")
        got_a = alerts(la, "alerts-a")
        got_b = alerts(lb, "alerts-b")
        assert len(got_a) == total_a
        assert len(while_away(got_a)) == raised and {x["stream"] for x in while_away(got_a)} == set(streams)
        assert len(while_away(got_b)) == 2
        # The status is not an alert: "online" goes out however full the alert queue is.
        for lst, topic in ((la, "status/a"), (lb, "status/b")):
            assert any(m.payload == b"online" and not m.retain for m in lst.on(topic))
        la.close()
        lb.close()
    finally:
        thaw(a, b)
        codes = (a.stop(), b.stop())
        broker.stop()
    assert codes == (0, 0)
    print(f"\noutage {outage:.1f} s; alerts raised while disconnected {raised:.0f}, "
          f"B dropped {dropped_b:.0f} (max_queued 2)")


# ---- 2. SIGKILL mid-stream ----------------------------------------------------------
def test_sigkill_restores_the_last_checkpoint_and_the_session_keeps_what_came_meanwhile(
        tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, broker.port, mqtt="persistent_session = true", state="checkpoint_interval_s = 2.0")
    streams = ["sensors/plant/k1", "sensors/plant/k2"]
    data = {s: docs(300, seed=50 + i) for i, s in enumerate(streams)}
    ckpt = tmp_path / "state" / CKPT
    d.start()
    try:
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][:100])])
        reach(d, 200, "first batch")

        def holds(n: int) -> dict[str, np.ndarray] | None:
            """The checkpoint file's arrays once it holds the first ``n`` readings of each stream."""
            try:
                with np.load(ckpt) as z:
                    arrays = {k: z[k] for k in z.files}
            except OSError:
                return None
            last = dict(zip(arrays["streams"].tolist(), arrays["last_ts"].tolist()))
            return arrays if all(last.get(s) == data[s][n - 1]["ts"] for s in streams) else None

        wait_for(lambda: holds(100), "a checkpoint of the first batch")
        # Mid-stream: 50 more readings per stream scored, then SIGKILL.
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][100:150])])
        reach(d, 300, "second batch")
        # paho writes the last PUBACKs on its next pass: killed before that, the session
        # would give those readings again, and the restarted state would not be the saved one.
        time.sleep(0.5)
        d.kill()
        age = time.time() - ckpt.stat().st_mtime
        with np.load(ckpt) as z:
            saved = {k: z[k] for k in z.files}
        last = dict(zip(saved["streams"].tolist(), saved["last_ts"].tolist()))
        lost = sum(150 - 1 - [r["ts"] for r in data[s]].index(last[s]) for s in streams)
        assert 0 <= lost <= 100  # at most what came after the checkpoint we waited for

        # Restart: the state is the checkpoint's, array for array (the restarted daemon's
        # own periodic checkpoint writes back exactly what it restored).
        before = ckpt.stat().st_mtime_ns
        d.start()
        wait_for(lambda: "2 stream state(s) restored" in d.logtext(), "the state restored")
        wait_for(lambda: ckpt.stat().st_mtime_ns != before, "the restarted daemon's checkpoint")
        with np.load(ckpt) as z:
            again = {k: z[k] for k in z.files}
        assert scored(d) == 0  # nothing redelivered: the state can only be the checkpoint's
        assert metric(d, "anomaly_detector_streams") == 2  # counted before any reading comes
        assert sorted(again) == sorted(saved)
        for key in saved:
            np.testing.assert_array_equal(again[key], saved[key], err_msg=key)

        # Killed again; readings published while it is down wait in its session.
        d.kill()
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][150:250])])
        d.start()
        reach(d, 200, "readings published while the daemon was killed")
        # The same across a clean stop.
        assert d.stop() == 0
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][250:300])])
        d.start()
        reach(d, 100, "readings published while the daemon was stopped")
    finally:
        d.stop()
    print(f"\nSIGKILL: checkpoint {age:.1f} s old (interval 2 s), {lost} scored reading(s) not in it")


# ---- 3. disk full, state directory read-only ------------------------------------------
def test_a_clean_stop_mid_stream_with_a_persistent_session_loses_and_repeats_nothing(
        tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM while QoS 1 readings pour in: what arrives after the intake closed is left
    unacknowledged, so the broker gives it to the next start. Every reading is then scored
    exactly once across the two runs: none lost (acknowledged but dropped), none twice
    (they would be rejected as duplicates)."""
    d = Daemon(tmp_path, broker.port, mqtt="persistent_session = true", state="checkpoint_interval_s = 3600")
    stream = "sensors/plant/t1"
    data = docs(3000, seed=61)
    ckpt = tmp_path / "state" / CKPT
    d.start()
    msgs = singles(stream, data)

    stopping = threading.Event()

    def paced() -> None:  # ~2000 readings/s on one connection: still publishing when the stop comes
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        infos = []
        for i, (topic, payload) in enumerate(msgs):
            if i == 1000:  # the rest only once the stop is under way, however slow this machine
                stopping.wait(60)
            infos.append(c.publish(topic, payload, qos=1))
            if i % 20 == 19:
                time.sleep(0.01)
        for info in infos:
            info.wait_for_publish(timeout=60)
        loop_stop(c)
        c.disconnect()

    pub = threading.Thread(target=paced)
    try:
        pub.start()
        wait_for(lambda: scored(d) >= 300, "the stream under way")
        d.signal(signal.SIGTERM)  # mid-stream: the publisher goes on
        stopping.set()
        assert d.stop() == 0
        pub.join(120)
        with np.load(ckpt) as z:
            first_run = int(z["count"][0])
        assert 0 < first_run < len(data)
        d.start()
        wait_for(lambda: scored(d) + metric(d, 'anomaly_detector_invalid_readings_total{reason="duplicate"}')
                 >= len(data) - first_run, "the rest scored after the restart")
        assert scored(d) == len(data) - first_run
        text = d.metrics()
        assert sample(text, 'anomaly_detector_invalid_readings_total{reason="duplicate"}') == 0
        assert sample(text, 'anomaly_detector_invalid_readings_total{reason="out_of_order"}') == 0
    finally:
        stopping.set()
        pub.join(120)
        d.stop()
    print(f"\nclean stop mid-stream: {first_run} scored before, {len(data) - first_run} after, none lost")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that lets us)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the file system is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as fh:
        for size in (65536, 1):  # the last few bytes too
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass


def test_disk_full_and_read_only_state_fail_loudly_and_scoring_goes_on(
        tmp_path: Path, small_fs: Path, broker) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, broker.port, state="checkpoint_interval_s = 0.5")
    streams = [f"sensors/plant/disk{i}" for i in range(3)]
    data = {s: docs(160, seed=60 + i) for i, s in enumerate(streams)}
    ckpt = small_fs / CKPT
    d.start()
    n = 0

    def feed(k: int) -> None:
        nonlocal n
        publish_all(broker.port, [m for s in streams for m in singles(s, data[s][n: n + k])])
        n += k
        reach(d, n * len(streams), "scoring goes on")

    def holds_latest() -> bool:
        try:
            with np.load(ckpt) as z:
                last = dict(zip(z["streams"].tolist(), z["last_ts"].tolist()))
        except OSError:
            return False
        return all(last.get(s) == data[s][n - 1]["ts"] for s in streams)

    def remount(mode: str) -> None:
        # EBUSY while the daemon has a checkpoint open for writing: try again.
        wait_for(lambda: subprocess.run(["mount", "-o", f"remount,{mode}", str(small_fs)],
                                        capture_output=True).returncode == 0, f"remount {mode}")

    def tmp_files() -> list[str]:
        return [p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]

    try:
        feed(40)
        wait_for(holds_latest, "a first checkpoint")
        for fault in ("disk full", "read-only"):
            good = ckpt.read_bytes()
            failures = metric(d, "anomaly_detector_checkpoint_failures_total")
            errors = d.logtext().count("checkpoint failed")
            if fault == "disk full":
                fill(small_fs / "filler")
            else:
                remount("ro")
            feed(40)
            wait_metric(d, "anomaly_detector_checkpoint_failures_total", failures + 2, f"{fault}: failures counted",
                        at_least=True)
            assert d.logtext().count("checkpoint failed") > errors, f"{fault}: logged"
            line = [ln for ln in d.logtext().splitlines() if "checkpoint failed" in ln][-1]
            assert " ERROR " in line and ("No space left" in line or "Read-only" in line), line
            assert d.healthz() == 200
            assert ckpt.read_bytes() == good  # the previous checkpoint, whole
            assert tmp_files() == []  # no half-written file holding on to the space
            if fault == "disk full":
                (small_fs / "filler").unlink()
            else:
                remount("rw")
            wait_for(holds_latest, f"after {fault}: checkpoints succeed again")
        feed(40)
        wait_for(holds_latest, "checkpoints go on")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=False)
        code = d.stop()
    assert code == 0
    assert "Traceback" not in d.logtext()


# ---- 4. a corrupt model bundle and SIGHUP ---------------------------------------------
def test_corrupt_bundle_on_reload_keeps_the_old_model(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "plant"
    shutil.copytree(ROOT / "models" / "plant", bundle)
    d = Daemon(tmp_path, broker.port, models=f'[[models]]\nmatch = "sensors/plant/+"\npath = "{bundle}"\n')
    stream = "sensors/plant/hup"
    data = docs(200, seed=70)
    d.start()
    try:
        publish_all(broker.port, singles(stream, data[:50]))
        reach(d, 50, "before the reloads")
        info = [ln for ln in d.metrics().splitlines() if ln.startswith("anomaly_detector_model_info{")]
        corruptions = {"model.keras": b"PK\x03\x04 truncated", "weights.npz": b"\x93NUMPY garbage",
                       "manifest.json": b'{"format": "anomaly-detector-bundle", "format_ver'}
        for i, (name, junk) in enumerate(corruptions.items(), start=1):
            good = (bundle / name).read_bytes()
            (bundle / name).write_bytes(junk)
            d.signal(signal.SIGHUP)
            wait_metric(d, "anomaly_detector_reload_failures_total", i, f"{name}: counted")
            line = [ln for ln in d.logtext().splitlines() if "reload failed" in ln][-1]
            assert " ERROR " in line and str(bundle) in line, line
            publish_all(broker.port, singles(stream, data[50 * i: 50 * i + 50]))
            reach(d, 50 * i + 50, f"{name}: scoring goes on with the old model")
            assert [ln for ln in d.metrics().splitlines() if ln.startswith("anomaly_detector_model_info{")] == info
            assert metric(d, "anomaly_detector_streams") == 1
            (bundle / name).write_bytes(good)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.logtext(), "a good bundle reloads")
        assert metric(d, "anomaly_detector_reload_failures_total") == 3
    finally:
        code = d.stop()
    assert code == 0


# ---- 5. learn-from-stream fits that crash or hang ------------------------------------
def fit_processes(pid: int) -> list[int]:
    """The daemon's spawned fit processes (not multiprocessing's resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return out


def test_crashing_and_hanging_fits_are_counted_and_retried(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    """Two daemons side by side (a real fit takes 5-20 s here; the hang needs a timeout
    shorter than that): C's first fit crashes (SIGKILL, as from the OOM killer), its retry
    succeeds; H's fits hang (the test hook) and are killed at timeout_s, again and again."""
    small = "[model]\nhidden = 8\nbottleneck = 4\n[train]\nepochs = 2\nseq_len = 16\n"
    learn = "warmup_readings = 100\n"
    other = own_mosquitto()  # H's: each daemon learns only its own stream
    (tmp_path / "c").mkdir()
    (tmp_path / "h").mkdir()
    # C waits 30 s before its retry: the readings sent after the crash must reach it while
    # it is still learning, and a fast machine finishes a retry 2 s after the crash in ~5 s.
    c = Daemon(tmp_path / "c", broker.port, learn=learn + "retry_after_s = 30\ntimeout_s = 600", extra=small)
    h = Daemon(tmp_path / "h", other.port, learn=learn + "retry_after_s = 2\ntimeout_s = 3", extra=small)
    t0 = time.time() - 300
    noise = np.random.default_rng(8).normal(size=300)
    msgs = [("sensors/site/flow", json.dumps({"ts": t0 + t, "value": np.sin(t / 7.0) + 0.05 * noise[t]}).encode())
            for t in range(300)]
    fits = 'anomaly_detector_learn_fits_total{{result="{}"}}'
    learning = 'anomaly_detector_dropped_readings_total{reason="learning"}'
    c.start()
    h.start(env=dict(os.environ, DETECTOR_LEARN_TEST_HANG="1"))
    try:
        publish_all(broker.port, msgs[:100])
        publish_all(other.port, msgs[:100])
        assert c.proc is not None
        pid = c.proc.pid
        pids = wait_for(lambda: fit_processes(pid), "C's fit process")
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: metric(c, fits.format("failed")) == 1, "C: the crash counted")
        assert "killed by SIGKILL" in c.logtext()
        # Meanwhile both streams keep collecting, unscored.
        publish_all(broker.port, msgs[100:150])
        wait_metric(c, learning, 150, "C: readings collected while waiting to retry")
        assert scored(c) == 0 and c.healthz() == 200
        wait_for(lambda: metric(h, fits.format("timeout")) >= 2, "H: a hang, and its retry's, counted")
        assert "timed out after 3 s" in h.logtext()
        publish_all(other.port, msgs[100:150])
        wait_metric(h, learning, 150, "H: readings collected while its fits hang")
        assert scored(h) == 0 and h.healthz() == 200
        wait_for(lambda: metric(c, fits.format("ok")) == 1, "C: the retry succeeds", deadline=240)
        wait_for(lambda: "learned a model for sensors/site/flow" in c.logtext(), "C's learned model in use")
        publish_all(broker.port, msgs[150:200])
        reach(c, 50, "C: the stream scored by its learned model")
        assert metric(h, fits.format("ok")) == 0 and metric(h, fits.format("failed")) == 0
    finally:
        codes = (c.stop(), h.stop())
        other.stop()
    assert codes == (0, 0)
    assert "Traceback" not in c.logtext() + h.logtext()


def sockets_to(pid: int, port: int, state: str) -> list[list[str]]:
    """``pid``'s TCP sockets in ``state`` whose peer is 127.0.0.1:``port``, as ``ss`` columns
    (Recv-Q, Send-Q, local, peer, process)."""
    out = subprocess.run(["ss", "-Htnp", "state", state], capture_output=True, text=True, check=True).stdout
    return [cols for cols in map(str.split, out.splitlines())
            if cols[3:4] == [f"127.0.0.1:{port}"] and f"pid={pid}," in cols[-1]]


def unread_bytes(pid: int, port: int) -> int:
    """Bytes waiting in ``pid``'s TCP connections to ``port`` (its receive queues)."""
    return sum(int(cols[0]) for cols in sockets_to(pid, port, "established"))


# ---- 6. shutdown with the broker gone ---------------------------------------------------
def connecting(pid: int, port: int) -> bool:
    """``pid`` has a TCP connection to ``port`` waiting for the SYN's answer."""
    return bool(sockets_to(pid, port, "syn-sent"))


@pytest.mark.parametrize("fault", ["stopped", "hung", "black_hole"])
def test_shutdown_is_bounded_when_the_broker_is_gone(tmp_path: Path, fault: str) -> None:
    """stopped: the broker process ended, connection refused, the daemon retrying; hung:
    the broker frozen (SIGSTOP) with our connection open; black_hole: nothing answers a
    connection attempt (a full accept queue drops the SYN), so paho's reconnect blocks
    in connect() for its 5 s connect timeout."""
    timeout_s = 2.0
    broker = own_mosquitto()
    port = broker.port
    d = Daemon(tmp_path, port, mqtt="reconnect_min_s = 1\nreconnect_max_s = 1",
               worker=f"shutdown_timeout_s = {timeout_s}")
    hole: list[socket.socket] = []
    d.start()
    try:
        if fault == "hung":
            assert broker._proc is not None
            broker._proc.send_signal(signal.SIGSTOP)
        else:
            broker.stop()
            wait_for(lambda: metric(d, "anomaly_detector_mqtt_connected") == 0, "disconnected")
        if fault == "black_hole":
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            srv.listen(0)
            hole.append(srv)
            for _ in range(3):  # fill the accept queue; nobody ever accepts
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                hole.append(c)
            wait_for(lambda: d.proc is not None and connecting(d.proc.pid, port), "the daemon stuck in connect()")
        d.signal(signal.SIGTERM)
        assert d.proc is not None
        started = time.monotonic()
        # A loaded machine can stall the interpreter's own exit for seconds: the wall clock
        # only guards against a hang; the contract is judged on the daemon's log below.
        code = d.proc.wait(timeout=30.0)
        took = time.monotonic() - started
    finally:
        for s in hole:
            s.close()
        if fault == "hung" and broker._proc is not None:
            broker._proc.send_signal(signal.SIGCONT)
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        broker.stop()
    assert code == 0
    stopping, stopped = log_time(d.logtext(), ": stopping: draining"), log_time(d.logtext(), ": stopped")
    # black_hole without the bound blocks in paho's connect() for its 5 s timeout.
    assert stopped - stopping <= timeout_s + 0.5, f"stopping to stopped took {stopped - stopping:.2f} s"
    print(f"\nbroker {fault}: exit 0 {took:.2f} s after SIGTERM, {stopped - stopping:.2f} s from 'stopping' "
          f"to 'stopped' (shutdown_timeout_s {timeout_s})")


def log_time(text: str, marker: str) -> float:
    """The time (epoch seconds) of the first log line that is ``marker`` or starts with it
    after the logger's name."""
    for line in text.splitlines():
        if line.endswith(marker) or f"{marker} " in line:
            stamp = line[:23]  # asctime: 2026-11-25 06:34:33,123
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line {marker!r}")


# ---- 7. alerts the broker never acknowledged, refused subscriptions ----------------------
def test_alerts_not_acknowledged_at_shutdown_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # paho keeps unacknowledged QoS 1 alerts in memory only: a stop while the broker is away
    # loses them. That used to be silent, and alerts_total had counted them as published.
    from detector import config as config_mod
    from detector.ingest import MqttLink
    from detector.intake import Intake
    from detector.metrics import create

    broker = own_mosquitto()
    metrics = create()
    cfg = config_mod.parse({"mqtt": {"reconnect_min_s": 1, "reconnect_max_s": 1}})
    link = MqttLink(cfg, "127.0.0.1", broker.port, Intake(100), metrics)
    link.start()
    try:
        wait_for(link.subscribed.is_set, "subscribed")
        for i in range(2):  # delivered: not counted
            info = link.publish(f"anomalies/s{i}", b"{}")
            assert info is not None
            info.wait_for_publish(10)
        broker.stop()
        wait_for(lambda: not link.connected.is_set(), "disconnected")
        for i in range(3):
            assert link.publish(f"anomalies/s{i}", b"{}") is not None  # queued for the reconnect
    finally:
        with caplog.at_level(logging.WARNING, logger="detector.mqtt"):
            link.stop(2.0)
        broker.stop()
    dropped = metrics.registry.get_sample_value("anomaly_detector_dropped_alerts_total", {"reason": "shutdown"})
    assert dropped == 3
    assert "3 alert(s) not acknowledged by the broker at shutdown" in caplog.text


def test_a_broker_refusing_every_subscription_leaves_the_daemon_unhealthy() -> None:
    # An ACL that denies the filters (EMQX, HiveMQ, VerneMQ answer SUBACK 0x80; Mosquitto
    # 2.0 grants them and drops the messages, so the broker's answer is given here).
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from detector import config as config_mod
    from detector.ingest import MqttLink
    from detector.intake import Intake
    from detector.metrics import create

    cfg = config_mod.parse({"mqtt": {"topics": ["a/#", "b/#"]}})
    link = MqttLink(cfg, "127.0.0.1", 1, Intake(100), create())
    refused, granted = ReasonCode(PacketTypes.SUBACK, identifier=0x80), ReasonCode(PacketTypes.SUBACK, identifier=1)
    sent: list[tuple[str, bytes]] = []
    link.publish = lambda topic, payload, retain=False: sent.append((topic, payload))  # type: ignore[method-assign]
    link._on_subscribe(link.client, None, 1, [refused, refused])
    assert not link.subscribed.is_set() and not sent  # not "online", /healthz 503 "not subscribed yet"
    link._on_subscribe(link.client, None, 2, [granted, refused])  # one filter is something
    assert link.subscribed.is_set() and sent == [(cfg.alerts.status_topic, b"online")]


def test_alerts_in_flight_follow_an_mqtt5_brokers_receive_maximum() -> None:
    # paho ignores the CONNACK's Receive Maximum; 1,000 alerts in flight against a broker
    # that allows 5 is a protocol error it answers by disconnecting us.
    from detector import config as config_mod
    from detector.ingest import MAX_INFLIGHT, MqttLink
    from detector.intake import Intake
    from detector.metrics import create

    broker = own_mosquitto("max_inflight_messages 5\n")
    cfg = config_mod.parse({"mqtt": {"protocol": "5"}})
    link = MqttLink(cfg, "127.0.0.1", broker.port, Intake(100), create())
    link.start()
    try:
        wait_for(link.subscribed.is_set, "subscribed")
        assert link.client.max_inflight_messages == 5
        for i in range(50):  # a burst well over it is delivered, a few at a time
            assert link.publish(f"anomalies/s{i}", b"{}") is not None
        wait_for(lambda: link.unacknowledged() == 0, "every alert acknowledged")
        assert link.connected.is_set()
    finally:
        link.stop(2.0)
        broker.stop()
    plain = MqttLink(config_mod.parse({}), "127.0.0.1", 1, Intake(100), create())
    assert plain.client.max_inflight_messages == MAX_INFLIGHT
