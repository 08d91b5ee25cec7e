"""Learn from the stream: collect a new stream's first readings, fit its model elsewhere.

A stream that no ``[[models]]`` entry maps collects its first ``warmup_readings``
readings here; then :func:`detector.train.fit` runs for it in a separate *spawned*
process (one per fit), so TensorFlow never loads into the daemon and a long fit never
stalls scoring. The worker calls :meth:`Learner.add` for unmodelled readings and
:meth:`Learner.poll` every loop, and hot-swaps each finished bundle in.

Failure policy: a fit that raises, or whose process dies (OOM killer, segfault), or that
runs past ``timeout_s`` (then it is killed) is reported as a :class:`FitResult` with an
error, counted, and retried after ``retry_after_s``. Meanwhile the stream keeps its
buffer, which keeps sliding forward, so a retry sees the latest readings, not the same bad
ones. Not thread-safe: one thread (the worker) owns a Learner.

Test-only hook: ``DETECTOR_LEARN_TEST_HANG=1`` in the environment makes the fit process
sleep forever instead of training, to exercise the timeout. Never set it in production.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import traceback
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from detector.config import Config
from detector.ring import Ring

_SPAWN = multiprocessing.get_context("spawn")  # never fork: the daemon has threads


@dataclass(frozen=True)
class FitResult:
    stream: str
    bundle_path: Path | None  # None when the fit failed
    error: str | None  # one line, when failed
    seconds: float
    result: str = "ok"  # "ok", "failed" (raised, or the process died) or "timeout" (killed)


def safe_name(stream: str) -> str:
    """A filesystem-safe, collision-free directory name: readable slug + hash of the id
    (the slug alone maps ``a/b`` and ``a+b`` to the same text)."""
    ascii_ = unicodedata.normalize("NFKD", stream).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_).strip("-_")[:60].rstrip("-_") or "stream"
    return f"{slug}-{hashlib.sha256(stream.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def find_learned(models_dir: Path, stream: str) -> Path | None:
    """The newest complete bundle learned for ``stream``, so a restarted daemon need not
    learn again; the exact pattern keeps another stream's bundles out."""
    safe = safe_name(stream)
    pat = re.compile(re.escape(safe) + r"-(\d{8}T\d{6}Z)(?:-(\d+))?")
    best: tuple[str, int] | None = None
    found: Path | None = None
    for p in Path(models_dir).glob(safe + "-*"):
        m = pat.fullmatch(p.name)
        if m and (p / "manifest.json").is_file() and (best is None or (m[1], int(m[2] or 1)) > best):
            best, found = (m[1], int(m[2] or 1)), p
    return found


@dataclass
class _Stream:
    features: list[str]
    ring: Ring  # bounded memory whatever the stream sends
    last_ts: float = -np.inf
    last_add: float = 0.0
    state: str = "collecting"
    retry_at: float = 0.0
    proc: Any = None
    conn: Connection | None = None
    out: Path | None = None
    started: float = 0.0
    reply: tuple[str | None, str | None] | None = field(default=None, repr=False)


class Learner:
    def __init__(self, cfg: Config, models_dir: Path, warmup_readings: int, max_concurrent: int = 1,
                 timeout_s: float = 600.0, retry_after_s: float = 300.0,
                 max_streams: int = 1000) -> None:
        self.cfg, self.models_dir = cfg, Path(models_dir)
        self.warmup, self.max_concurrent = int(warmup_readings), int(max_concurrent)
        self.timeout_s, self.retry_after_s, self.max_streams = timeout_s, retry_after_s, max_streams
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._streams: dict[str, _Stream] = {}
        # Streams still collecting, least recently added first: at capacity the first one
        # makes room, so a flood of junk ids cannot lock real streams out of learning.
        self._collecting: OrderedDict[str, None] = OrderedDict()
        self._queue: list[str] = []  # full buffers waiting for a free fit slot, FIFO
        # Streams whose fit runs: what poll() checks after every batch. A scan of every
        # stream held cost ~300 ms per batch once a flood of unrouted ids filled the learner.
        self._fitting: set[str] = set()
        self._done: list[FitResult] = []
        self._next_sweep = 0.0
        self.stats: dict[str, int] = dict.fromkeys(
            ("fits_started", "fits_ok", "fits_failed", "fits_timeout", "dropped_capacity", "evicted_capacity",
             "dropped_features", "evicted_idle"), 0)

    def add(self, stream: str, ts: float, values: np.ndarray, features: list[str]) -> None:
        st = self._streams.get(stream)
        now = time.monotonic()
        if st is None:
            if not self._make_room(now):
                self.stats["dropped_capacity"] += 1
                return
            nf = len(features)
            st = _Stream(list(features), Ring.empty(self.warmup, nf))
            self._streams[stream] = st
            self._collecting[stream] = None
        elif st.state == "collecting":
            self._collecting.move_to_end(stream)
        if st.state == "fitting" or not (np.isfinite(ts) and ts > st.last_ts):
            return
        if list(features) != st.features:  # a model has one feature list; keep the first
            self.stats["dropped_features"] += 1
            return
        st.ring.push(ts, np.asarray(values, dtype=np.float64).reshape(-1))
        st.last_ts, st.last_add = float(ts), now
        if st.state == "collecting" and st.ring.n >= self.warmup:
            st.state = "waiting"
            self._collecting.pop(stream, None)
            self._queue.append(stream)
            self._pump(now)

    def refit(self, stream: str, times: np.ndarray, values: np.ndarray, features: list[str]) -> bool:
        """Fit a stream that already has a model again, on ``times``/``values`` (its recent
        normal readings, chosen by :mod:`detector.refit`); the result comes from
        :meth:`poll` like a first fit's, failures are counted and retried the same way.
        False when a fit for the stream is already waiting or running, or the learner is
        full."""
        now = time.monotonic()
        if stream in self._streams or not self._make_room(now):
            return False
        self._streams[stream] = _Stream(list(features), Ring.full(times, values), last_ts=float(times[-1]),
                                        last_add=now, state="waiting")
        self._queue.append(stream)
        self._pump(now)
        return True

    def poll(self) -> list[FitResult]:
        now = time.monotonic()
        for sid in list(self._fitting):
            self._check(sid, self._streams[sid], now)
        self._pump(now)
        out, self._done = self._done, []
        return out

    def pending(self) -> int:
        return len(self._streams)

    def close(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        fitting = [self._streams[sid] for sid in self._fitting]
        for st in fitting:
            st.proc.terminate()
        for st in fitting:
            st.proc.join(max(0.0, deadline - time.monotonic()))
            if st.proc.is_alive():  # ignored SIGTERM (stuck in native code): no more asking
                st.proc.kill()
                st.proc.join(1.0)
            self._discard(st, keep_complete=True)  # one finished but not yet polled
        self._streams.clear()
        self._fitting.clear()
        self._collecting.clear()
        self._queue.clear()

    # ---- internals --------------------------------------------------------------------
    def _make_room(self, now: float) -> bool:
        """Room for one more stream: at capacity, idle streams go first, then the least
        recently added stream still collecting (counted); False when every stream held
        is a fit waiting or running."""
        if len(self._streams) < self.max_streams or self._sweep_idle(now):
            return True
        if not self._collecting:
            return False
        oldest, _ = self._collecting.popitem(last=False)
        del self._streams[oldest]
        self.stats["evicted_capacity"] += 1
        return True

    def _sweep_idle(self, now: float) -> bool:
        """Forget collecting streams silent for idle_timeout_s, so dead ids cannot hold the
        capacity for ever; at most once a minute, as a flood of new ids calls this a lot."""
        if now < self._next_sweep:
            return False
        self._next_sweep = now + 60.0
        idle = [s for s, st in self._streams.items() if st.state == "collecting"
                and now - st.last_add > self.cfg.engine.idle_timeout_s]
        for s in idle:
            del self._streams[s]
            self._collecting.pop(s, None)
        self.stats["evicted_idle"] += len(idle)
        return bool(idle)

    def _pump(self, now: float) -> None:
        running = len(self._fitting)
        for sid in list(self._queue):
            if running >= self.max_concurrent:
                break
            st = self._streams[sid]
            if st.retry_at <= now:
                self._queue.remove(sid)
                running += self._start(sid, st, now)

    def _start(self, sid: str, st: _Stream, now: float) -> bool:
        """Start ``sid``'s fit process; False when it could not be started (no process,
        memory or file descriptor left): that counts as a failed fit, retried later."""
        base = f"{safe_name(sid)}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        out, k = self.models_dir / base, 1
        while out.exists():  # a quick retry within the same second
            k += 1
            out = self.models_dir / f"{base}-{k}"
        times, values = st.ring.ordered()
        pipe = None
        try:
            pipe = recv, send = _SPAWN.Pipe(duplex=False)
            proc = _SPAWN.Process(target=_child, name=f"learn {safe_name(sid)}", daemon=True,
                                  args=(sid, times, values, st.features, self.cfg, out, send,
                                        self.models_dir / f"{safe_name(sid)}.log"))
            proc.start()
        except Exception as err:  # noqa: BLE001 -- EAGAIN, ENOMEM, EMFILE: the scoring must go on
            for end in pipe or ():
                end.close()
            st.started, st.conn, st.proc, st.out = now, None, None, None
            self.stats["fits_failed"] += 1
            self._fail(sid, st, now, f"cannot start the fit process: {type(err).__name__}: {err}", "failed")
            return False
        send.close()  # our copy closed, so the child's death reads as EOF here
        st.state, st.proc, st.conn, st.out, st.started, st.reply = "fitting", proc, recv, out, now, None
        self._fitting.add(sid)
        self.stats["fits_started"] += 1
        return True

    def _check(self, sid: str, st: _Stream, now: float) -> None:
        assert st.conn is not None
        try:
            if st.reply is None and st.conn.poll():
                st.reply = st.conn.recv()
        except (EOFError, OSError):
            pass  # died without a word: reported below from its exit code
        if st.reply is not None:
            st.proc.join(2.0)  # the child exits right after replying
        elif st.proc.is_alive():
            if now - st.started <= self.timeout_s:
                return
            st.proc.kill()
            st.proc.join(2.0)
            self.stats["fits_timeout"] += 1
            return self._fail(sid, st, now, f"fit timed out after {self.timeout_s:g} s; killed", "timeout")
        path, error = st.reply if st.reply is not None else (None, _died(st.proc.exitcode))
        if st.proc.is_alive():
            st.proc.kill()
        if error is None and path is not None:
            self.stats["fits_ok"] += 1
            self._done.append(FitResult(sid, Path(path), None, now - st.started))
            self._discard(st, keep_complete=True)
            del self._streams[sid]
            self._fitting.discard(sid)
            return
        self.stats["fits_failed"] += 1
        self._fail(sid, st, now, error or "fit failed", "failed")

    def _fail(self, sid: str, st: _Stream, now: float, error: str, result: str) -> None:
        self._done.append(FitResult(sid, None, error, now - st.started, result))
        self._fitting.discard(sid)
        self._discard(st, keep_complete=False)
        st.state, st.retry_at, st.proc = "waiting", now + self.retry_after_s, None
        self._queue.append(sid)

    @staticmethod
    def _discard(st: _Stream, keep_complete: bool) -> None:
        """Release a finished fit's pipe and process handles (fds would leak otherwise) and
        its bundle directory unless it is complete (the manifest is written last)."""
        if st.conn is not None:
            st.conn.close()
        if st.proc is not None and not st.proc.is_alive():
            st.proc.close()
        if st.out is not None and not (keep_complete and (st.out / "manifest.json").is_file()):
            shutil.rmtree(st.out, ignore_errors=True)  # the stream's .log stays for diagnosis


def _died(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"fit process killed by {name}{hint}"
    return f"fit process exited with code {code} without a result"


def _log(msg: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def _child(stream: str, times: np.ndarray, values: np.ndarray, features: list[str],
           cfg: Config, out: Path, conn: Connection, log_path: Path) -> None:
    """Entry of the fit process. Everything it prints, TensorFlow's C++ logging included,
    goes to the stream's log (one per stream, rewritten by each attempt, so a stream that
    fails every retry does not fill the disk), not to fds 1 and 2: the daemon's journal."""
    result: tuple[str | None, str | None]
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            os.nice(10)  # scoring first: the daemon's worker shares these cores
        except OSError:
            pass
        if os.environ.get("DETECTOR_LEARN_TEST_HANG") == "1":  # test-only, see module doc
            while True:
                time.sleep(3600)
        try:
            from detector import train
            from detector.data import Table

            table = Table(f"stream {stream!r}", list(features), values, times,
                          [str(t) for t in times.tolist()], "ts")
            train.fit([table], out, cfg, name=safe_name(stream), log=_log)
            result = (str(out), None)
        except BaseException as err:  # noqa: BLE001 -- any failure becomes a reply
            traceback.print_exc()
            result = (None, " ".join(f"{type(err).__name__}: {err}".split())[:300])
        conn.send(result)
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: TensorFlow's atexit work can hang or crash
