"""Learning from the stream: buffering, a fit in a spawned process, crashes, timeouts."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from detector import bundle, config, learn, plant
from detector.ring import Ring

DEADLINE_S = 600.0  # generous: a shared 2-core machine; nothing here asserts speed


@pytest.fixture(scope="module")
def tiny_cfg(small_cfg: config.Config) -> config.Config:
    return replace(small_cfg, model=replace(small_cfg.model, hidden=8, bottleneck=4),
                   train=replace(small_cfg.train, epochs=2, seq_len=32))


def feed(lr: learn.Learner, stream: str, n: int, seed: int = 0) -> None:
    times, values = plant.normal(n, seed=seed)
    for t, v in zip(times, values):
        lr.add(stream, float(t), v, plant.FEATURES)


def wait_results(lr: learn.Learner, count: int = 1) -> list[learn.FitResult]:
    got: list[learn.FitResult] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < count:
        assert time.monotonic() < deadline, f"no FitResult within {DEADLINE_S} s: {lr.stats}"
        got.extend(lr.poll())
        time.sleep(0.05)
    return got


def no_children() -> bool:
    deadline = time.monotonic() + 30
    while multiprocessing.active_children():  # also reaps finished ones
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_importing_learn_does_not_load_tensorflow() -> None:
    code = "import detector.learn, sys; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fit_from_stream(tmp_path: Path, tiny_cfg: config.Config, capfd: pytest.CaptureFixture[str]) -> None:
    stream = "sensors/pump 3/températur+e#1"
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=300)
    try:
        feed(lr, stream, 299)
        assert lr.stats["fits_started"] == 0 and lr.pending() == 1
        lr.add(stream, 1.0, np.zeros(4), plant.FEATURES)  # non-increasing ts: ignored
        for k in range(500):  # ids still collecting: poll() checks only the running fit
            lr.add(f"junk/{k}", 1.0, np.zeros(1), ["value"])
        feed(lr, stream, 400)  # the 300th reading starts the fit; the rest arrive while it runs
        assert lr.stats["fits_started"] == 1 and lr._fitting == {stream}
        [res] = wait_results(lr)
        assert res.error is None, res.error
        assert res.stream == stream and res.seconds > 0
        assert res.bundle_path is not None and res.bundle_path.parent == tmp_path and res.result == "ok"
        b = bundle.load(res.bundle_path, plant.FEATURES)
        assert b.features == plant.FEATURES
        assert b.manifest["training"]["prep"]["rows_in"] == 300
        log = tmp_path / f"{learn.safe_name(stream)}.log"
        assert "epoch 1/2" in log.read_text(encoding="utf-8")
        assert learn.find_learned(tmp_path, stream) == res.bundle_path
        assert learn.find_learned(tmp_path, stream + "x") is None
        assert "epoch" not in capfd.readouterr().err  # the child's output stays in its log
        assert lr.pending() == 500 and lr.stats["fits_ok"] == 1 and lr.poll() == [] and not lr._fitting
    finally:
        lr.close()
    assert no_children()


def test_failed_fit_is_reported_and_retried(tmp_path: Path, tiny_cfg: config.Config) -> None:
    # 10 readings are fewer than train.MIN_ROWS: train.fit raises in the child.
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=10, max_concurrent=1, retry_after_s=0.2)
    try:
        feed(lr, "a", 10)
        feed(lr, "b", 10)
        assert lr.stats["fits_started"] == 1  # "b" queued behind "a"
        assert lr.pending() == 2
        results = wait_results(lr, 3)
        assert all(r.bundle_path is None and r.error and r.result == "failed" for r in results)
        assert "usable rows" in str(results[0].error) and "\n" not in str(results[0].error)
        assert {r.stream for r in results} == {"a", "b"}  # both ran, and one was retried
        assert lr.stats["fits_failed"] >= 3 and lr.stats["fits_ok"] == 0
        assert lr.pending() == 2  # failed streams stay, with their readings, for a retry
        assert not any(p.is_dir() for p in tmp_path.iterdir())  # no half-written bundles
    finally:
        lr.close()
    assert lr.pending() == 0
    assert no_children()


def test_a_fit_that_cannot_start_is_a_failed_fit_retried(tmp_path: Path, tiny_cfg: config.Config,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # No process can be spawned (EAGAIN: a process limit reached): the reading that fills
    # the buffer must not raise into the worker's step, and the stream must stay queued.
    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(learn._SPAWN, "Process", no_process)
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=10, retry_after_s=0.2)
    try:
        feed(lr, "a", 10)
        [res] = lr.poll()
        assert res.bundle_path is None and res.result == "failed"
        assert res.error is not None and res.error.startswith("cannot start the fit process: BlockingIOError")
        assert lr.stats["fits_started"] == 0 and lr.stats["fits_failed"] == 1 and lr.pending() == 1
        monkeypatch.undo()  # processes can be spawned again: the retry starts the fit
        deadline = time.monotonic() + DEADLINE_S
        while lr.stats["fits_started"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            lr.poll()
    finally:
        lr.close()
    assert no_children()


def test_hanging_fit_is_killed(tmp_path: Path, tiny_cfg: config.Config,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_LEARN_TEST_HANG", "1")
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=50, timeout_s=2.0, retry_after_s=1e6)
    try:
        feed(lr, "hang", 50)
        [res] = wait_results(lr)
        assert res.bundle_path is None and "timed out" in (res.error or "") and res.result == "timeout"
        assert lr.stats["fits_timeout"] == 1 and lr.stats["fits_failed"] == 0
        assert lr.pending() == 1  # waiting for its retry, readings kept
        assert no_children()
        assert lr.poll() == [] and lr.stats["fits_started"] == 1  # retry not due yet
    finally:
        lr.close()


def test_fit_process_killed_is_a_crash(tmp_path: Path, tiny_cfg: config.Config,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_LEARN_TEST_HANG", "1")
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=50, retry_after_s=0.2)
    try:
        feed(lr, "oom", 50)
        [child] = multiprocessing.active_children()
        os.kill(int(child.pid or 0), signal.SIGKILL)  # as the OOM killer would
        [res] = wait_results(lr)
        assert res.bundle_path is None and "SIGKILL" in (res.error or "") and res.result == "failed"
        assert lr.stats["fits_failed"] == 1 and lr.stats["fits_timeout"] == 0
        deadline = time.monotonic() + 60
        while lr.stats["fits_started"] < 2:  # retried from the kept readings
            assert time.monotonic() < deadline
            lr.poll()
            time.sleep(0.05)
    finally:
        lr.close()
    assert no_children()


def test_close_terminates_running_fits(tmp_path: Path, tiny_cfg: config.Config,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_LEARN_TEST_HANG", "1")
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=50)
    feed(lr, "hang", 50)
    assert multiprocessing.active_children()
    lr.close(timeout=5.0)
    assert no_children() and lr.pending() == 0


def test_capacity_bounds_collecting_streams(tmp_path: Path, tiny_cfg: config.Config) -> None:
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=100, max_streams=3)
    for i in range(3):
        lr.add(f"s{i}", 1.0, np.ones(1), ["x"])
    lr.add("s0", 2.0, np.ones(1), ["x"])  # s0 is recent again: s1 is now the oldest
    for i in (3, 4):  # at capacity, the least recently added collecting stream makes room
        lr.add(f"s{i}", 1.0, np.ones(1), ["x"])
    assert lr.pending() == 3 and sorted(lr._streams) == ["s0", "s3", "s4"]
    assert lr.stats["evicted_capacity"] == 2 and lr.stats["dropped_capacity"] == 0
    lr.add("s0", 3.0, np.ones(1), ["x"])  # known streams still collect
    assert lr._streams["s0"].ring.n == 3
    lr.add("s0", 4.0, np.ones(2), ["x", "y"])  # a different feature list: not this stream's
    assert lr.stats["dropped_features"] == 1
    lr.close()


def test_buffer_is_bounded_and_keeps_the_latest(tmp_path: Path, tiny_cfg: config.Config) -> None:
    lr = learn.Learner(tiny_cfg, tmp_path, warmup_readings=5, max_concurrent=0)  # never fits
    for t in range(1, 13):
        lr.add("s", float(t), np.array([t * 10.0]), ["x"])
    times, values = lr._streams["s"].ring.ordered()
    assert times.tolist() == [8.0, 9.0, 10.0, 11.0, 12.0]
    assert values[:, 0].tolist() == [80.0, 90.0, 100.0, 110.0, 120.0]
    lr.close()


def test_ring_holds_the_last_readings_oldest_first() -> None:
    ring = Ring.empty(4, 2)
    assert len(ring) == 0 and ring.ordered()[0].tolist() == []
    for t in range(1, 4):  # not yet full
        ring.push(float(t), np.array([t, -t]))
    assert len(ring) == 3 and ring.ordered()[0].tolist() == [1.0, 2.0, 3.0]
    for t in range(4, 7):  # wrapped
        ring.push(float(t), np.array([t, -t]))
    times, values = ring.ordered()
    assert len(ring) == 4 and ring.n == 6 and times.tolist() == [3.0, 4.0, 5.0, 6.0]
    assert values.tolist() == [[3, -3], [4, -4], [5, -5], [6, -6]]
    full = Ring.full(times, values)
    assert len(full) == 4 and full.ordered()[0].tolist() == times.tolist()
    # A large ring grows with what it holds, keeping the order across each growth.
    big = Ring.empty(500, 2)
    assert len(big.times) < 500
    for t in range(1, 21):
        big.push(float(t), np.array([t, -t]))
    assert len(big.times) < 500 and big.ordered()[0].tolist() == [float(t) for t in range(1, 21)]
    for t in range(21, 1201):
        big.push(float(t), np.array([t, -t]))
    times, values = big.ordered()
    assert len(big.times) == 500 and times.tolist() == [float(t) for t in range(701, 1201)]
    assert values[:, 1].tolist() == [-float(t) for t in range(701, 1201)]


@pytest.mark.parametrize("ids", [["a/b", "a+b", "a#b", "a b", "a-b", "a_b", "a\\b"],
                                 ["température", "temperature", "温度", "溫度", "", ".", "..",
                                  "x" * 300, "x" * 301]])
def test_safe_names_are_distinct_and_safe(tmp_path: Path, ids: list[str]) -> None:
    names = [learn.safe_name(s) for s in ids]
    assert len(set(names)) == len(ids)
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,59}-[0-9a-f]{10}", n), n
        (tmp_path / n).mkdir()
    assert learn.safe_name("a/b") == learn.safe_name("a/b")  # stable across runs

