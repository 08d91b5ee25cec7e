"""``anomaly-detector evaluate``: point metrics and the NAB score of SCORES.csv files.

Point metrics compare the ``anomaly`` flag with row labels, all files concatenated (SKAB's
outlier protocol): precision, recall, F1, FAR = FP/(FP+TN), MAR = FN/(FN+TP). Labels come
from a label column of a data file (matched row by row, or by timestamp when the row
counts differ) or from NAB-style windows JSON (a row is positive inside a window).

The NAB score is an independent implementation of the published scorer (numenta/NAB,
read at ``nab/sweeper.py`` — ``scaledSigmoid``, ``calcSweepScore``, ``calcScoreByThreshold``,
``_getProbationaryLength`` — ``nab/optimizer.py`` (corpus-wide threshold: best of the
sweep), ``nab/runner.py`` (``normalize``), ``nab/util.py`` (``getProbationPeriod``) and the
older ``nab/scorer.py``). The rules it reproduces:

- the first ``min(floor(0.15 n), 0.15 * 5000)`` rows of a file are probationary: ignored;
- a row is a detection when its score is >= the threshold;
- ``scaled_sigmoid(x) = 2 / (1 + exp(5x)) - 1`` (and -1 for x >= 3). Inside a window of
  ``w`` rows ending at row ``e``, row ``i`` sits at ``x = -(e - i + 1) / w``; a window's
  credit is that of its *earliest* detection, ``tpWeight * S(x) / S(-1)`` (1 at the first
  row, ~0 at the last); a window with no detection costs ``fnWeight`` instead;
- a detection outside windows costs ``fpWeight * S((i - e) / (w - 1))`` measured from the
  end ``e`` of the previous window (near 0 right after it, 0.987 fpWeight one window
  length later, the full fpWeight from three on) and the full fpWeight before any window;
- one threshold per profile for the whole corpus, the one that maximises the summed raw
  score (ties: the highest threshold); all rows above every score = the null detector;
- ``100 * (S - S_null) / (S_perfect - S_null)`` with ``S_null = -fnWeight * windows`` (what
  the never-firing null detector scores) and ``S_perfect = tpWeight * windows``.
Windows from a label column are its runs of consecutive positive rows (as NAB's
optimizer derives them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.data import Table, parse_time, read_table
from detector.errors import InputError

PROFILES: dict[str, dict[str, float]] = {  # NAB's config/profiles.json
    "standard": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11},
}
LABEL_NAMES = ("anomaly", "label", "is_anomaly", "labels")


def probation_rows(n: int) -> int:
    return int(min(math.floor(0.15 * n), 0.15 * 5000))


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0)


@dataclass
class Series:
    """One SCORES file with its labels."""
    path: str
    table: Table
    score: np.ndarray
    flag: np.ndarray  # bool
    label: np.ndarray  # bool
    windows: list[tuple[int, int]]  # row ranges, inclusive, sorted, disjoint


def point_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    pred, label = pred.astype(bool), label.astype(bool)
    tp, fp = int(np.sum(pred & label)), int(np.sum(pred & ~label))
    fn, tn = int(np.sum(~pred & label)), int(np.sum(~pred & ~label))
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"rows": len(pred), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": prec,
            "recall": rec, "F1": 2 * prec * rec / max(prec + rec, 1e-12),
            "FAR": fp / max(fp + tn, 1), "MAR": fn / max(fn + tp, 1)}


def onsets(flag: np.ndarray) -> np.ndarray:
    """The first row of every run of flags."""
    flag = flag.astype(bool)
    return flag & ~np.concatenate([[False], flag[:-1]])


def mask(n: int, windows: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for s, e in windows:
        m[s:e + 1] = True
    return m


def runs(label: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], label.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), (np.flatnonzero(d == -1) - 1).tolist()))


def nab_terms(n: int, windows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: TP credit if detected in a window, FP factor (<= 0) outside, window index."""
    idx = np.arange(n)
    credit, penalty, win = np.zeros(n), np.full(n, -1.0), np.full(n, -1)
    for k, (s, e) in enumerate(windows):
        w = e - s + 1
        credit[s:e + 1] = scaled_sigmoid(-(e - idx[s:e + 1] + 1) / w) / scaled_sigmoid(-1.0)
        win[s:e + 1], penalty[s:e + 1] = k, 0.0
        nxt = windows[k + 1][0] if k + 1 < len(windows) else n
        # NAB divides by w - 1, undefined for a one-row window: treat it as two rows.
        penalty[e + 1:nxt] = scaled_sigmoid((idx[e + 1:nxt] - e) / max(w - 1, 1))
    return credit, penalty, win


def nab_file(f: Series, threshold: float, cost: dict[str, float]) -> dict[str, Any]:
    """One file's raw score at a threshold, with what was detected and missed."""
    n, p = len(f.score), probation_rows(len(f.score))
    credit, penalty, win = nab_terms(n, f.windows)
    det = (f.score >= threshold) & (np.arange(n) >= p)
    raw, wins = 0.0, []
    for s, e in f.windows:
        if e < p:
            continue  # entirely probationary: NAB never sees it
        hit = np.flatnonzero(det[s:e + 1])
        first = s + int(hit[0]) if hit.size else None
        raw += cost["tpWeight"] * credit[first] if first is not None else -cost["fnWeight"]
        tt = f.table.time_text
        wins.append({"start": tt[s], "end": tt[e], "rows": e - s + 1,
                     "detected": None if first is None else tt[first],
                     "credit": None if first is None else round(float(credit[first]), 4)})
    fp = det & (win < 0)
    raw += cost["fpWeight"] * float(penalty[fp].sum())
    return {"raw": raw, "probation": p, "windows": wins, "fp_rows": int(fp.sum()),
            "fp_runs": len(runs(fp))}


def nab_corpus(files: list[Series], profiles: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Sweep every threshold over the whole corpus at once, per profile; see module doc."""
    score, credit, penalty, win, offset = [], [], [], [], 0
    for f in files:
        c, pen, w = nab_terms(len(f.score), f.windows)
        keep = np.arange(len(f.score)) >= probation_rows(len(f.score))
        score.append(f.score[keep])
        credit.append(c[keep])
        penalty.append(pen[keep])
        win.append(np.where(w[keep] >= 0, w[keep] + offset, -1))
        offset += len(f.windows)
    s, c, pen, w = (np.concatenate(a) for a in (score, credit, penalty, win))
    n_windows = len(np.unique(w[w >= 0]))
    order = np.argsort(-s, kind="stable")
    s, c, pen, w = s[order], c[order], pen[order], w[order]
    # Lowering the threshold past a window row adds credit only if it beats that window's
    # earliest detection so far (the first detection also refunds fnWeight).
    d_credit, first = np.zeros(len(s)), np.zeros(len(s))
    best = np.full(offset, -1.0)
    for k in np.flatnonzero(w >= 0):
        if c[k] > best[w[k]]:
            first[k] = best[w[k]] < 0
            d_credit[k] = c[k] - max(best[w[k]], 0.0)
            best[w[k]] = c[k]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    thresholds = np.concatenate([[np.inf], s[ends]])
    out: dict[str, Any] = {"windows": n_windows, "profiles": {}}
    for name, cost in profiles.items():
        gain = cost["tpWeight"] * d_credit + cost["fnWeight"] * first
        gain += cost["fpWeight"] * np.where(w < 0, pen, 0.0)
        null, perfect = -cost["fnWeight"] * n_windows, cost["tpWeight"] * n_windows
        raw = null + np.concatenate([[0.0], np.cumsum(gain)[ends]])
        b = int(np.argmax(raw))  # first maximum = highest threshold among ties
        per_file = [nab_file(f, thresholds[b], cost) for f in files]
        out["profiles"][name] = {
            "threshold": None if b == 0 else float(thresholds[b]), "raw": float(raw[b]),
            "null": null, "perfect": perfect,
            "score": None if n_windows == 0 else 100 * (raw[b] - null) / (perfect - null),
            "files": per_file}
    return out


def _read_scores(path: Path) -> tuple[Table, np.ndarray, np.ndarray]:
    t = read_table(path)
    if "score" not in t.features:
        raise InputError(str(path), "no numeric 'score' column (expected SCORES.csv from replay)")
    if "anomaly" not in t.labels:
        raise InputError(str(path), "no 'anomaly' column of 0/1 flags (expected SCORES.csv from replay)")
    score = t.values[:, t.features.index("score")]
    bad = np.flatnonzero(~np.isfinite(score))
    if bad.size:
        raise InputError(f"{path}:{bad[0] + 2}", "score is empty or not finite")
    return t, score, t.labels["anomaly"] > 0


def _read_label_column(path: Path, column: str | None, time_column: str | None) -> Table:
    for name in [column] if column else LABEL_NAMES:
        try:
            return read_table(path, [name], time_column)
        except InputError as err:
            if not err.problem.startswith("feature column(s) not found"):
                raise
    raise InputError(str(path), f"no label column {column or ' / '.join(LABEL_NAMES)!r} "
                                "(name it with --label-column)")


def _labels_from_table(path: Path, t: Table, lab: Table) -> np.ndarray:
    y: np.ndarray = np.nan_to_num(lab.values[:, 0]) > 0
    if len(lab) == len(t) and (not (lab.time_column and t.time_column) or np.array_equal(lab.times, t.times)):
        return y
    pos = {v: i for i, v in enumerate(lab.times.tolist())}
    rows = [pos.get(v) for v in t.times.tolist()]
    if lab.time_column is None or None in rows:
        raise InputError(str(path), f"{len(t)} scored rows, {len(lab)} label rows in {lab.source}, "
                                    "and the timestamps do not all match")
    return y[np.array(rows)]


def _window_key(path: Path, windows: dict[str, Any], nab_keys: dict[str, str], source: str) -> str:
    key = nab_keys.get(str(path), nab_keys.get(path.name))
    if key is not None:
        if key not in windows:
            raise InputError(source, f"unknown window key {key!r} (given for {path})")
        return key
    hits = [k for k in windows if k == str(path) or Path(k).name == path.name]
    if len(hits) != 1:
        why = "no window key matches" if not hits else f"several window keys match ({', '.join(hits)})"
        raise InputError(source, f"{why} file name {path.name!r} (map it with --nab-key {path.name}=KEY)")
    return hits[0]


def _windows_to_rows(t: Table, limits: Any, where: str) -> list[tuple[int, int]]:
    out = []
    for lim in limits:
        try:
            a, b = (parse_time(str(v)) for v in lim)
        except (TypeError, ValueError):
            raise InputError(where, f"window {lim!r} is not a pair of times") from None
        # A mask, not a binary search: real files have clock steps backwards (NAB's
        # machine_temperature does); like NAB, the window spans its first to last row.
        inside = np.flatnonzero((t.times >= a) & (t.times <= b))
        if not inside.size:
            raise InputError(where, f"window {lim!r} matches no rows of {t.source}")
        out.append((int(inside[0]), int(inside[-1])))
    return runs(mask(len(t), out))  # sorted, overlapping windows merged


def load(scores: list[Path], labels: list[Path], label_column: str | None = None,
         nab_keys: dict[str, str] | None = None, time_column: str | None = None) -> list[Series]:
    nab_keys = nab_keys or {}
    if len(labels) not in (1, len(scores)):
        raise InputError("--labels", f"{len(labels)} label files for {len(scores)} scores files "
                                     "(give one windows JSON, or one label file per --scores)")
    windows: Any = None
    if labels[0].suffix.lower() == ".json":
        try:
            windows = json.loads(labels[0].read_text(encoding="utf-8"))
        except OSError as err:
            raise InputError(str(labels[0]), f"cannot read: {err.strerror or err}") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(str(labels[0]), f"not valid JSON: {err}") from None
        if not isinstance(windows, (dict, list)):
            raise InputError(str(labels[0]), "expected {file: [[start, end], ...]} or [[start, end], ...]")
    files = []
    for i, p in enumerate(scores):
        t, score, flag = _read_scores(p)
        if windows is not None:
            key = _window_key(p, windows, nab_keys, str(labels[0])) if isinstance(windows, dict) else None
            lims = windows if key is None else windows[key]
            if not isinstance(lims, list):
                raise InputError(str(labels[0]), f"key {key!r}: expected a list of [start, end] windows")
            win = _windows_to_rows(t, lims, f"{labels[0]}: key {key!r}" if key else str(labels[0]))
            label = mask(len(t), win)
        else:
            lp = labels[0] if len(labels) == 1 else labels[i]
            label = _labels_from_table(p, t, _read_label_column(lp, label_column, time_column))
            win = runs(label)
        files.append(Series(str(p), t, score, flag, label, win))
    return files


def evaluate(files: list[Series], profiles: dict[str, dict[str, float]] | None = None,
             skip_rows: int | str = 0) -> dict[str, Any]:
    """Point metrics per file and in total (rows after ``skip_rows``, or the NAB probation),
    and the NAB score per profile, plus the NAB score of the alerts as given: the rows where
    a run of ``anomaly`` flags starts."""
    skips = [probation_rows(len(f.score)) if skip_rows == "probation" else int(skip_rows) for f in files]
    per = [point_metrics(f.flag[k:], f.label[k:]) for f, k in zip(files, skips)]
    total = point_metrics(np.concatenate([f.flag[k:] for f, k in zip(files, skips)]),
                          np.concatenate([f.label[k:] for f, k in zip(files, skips)]))
    profiles = profiles or PROFILES
    nab = nab_corpus(files, profiles)
    # The daemon acts on its flags, not on a threshold tuned afterwards: score its alerts
    # (anomaly_start = the first flag of a run; the rest of the run is the same episode).
    std = profiles.get("standard", next(iter(profiles.values())))
    flagged = [nab_file(Series(f.path, f.table, onsets(f.flag).astype(float), f.flag, f.label, f.windows),
                        0.5, std) for f in files]
    null, perfect = -std["fnWeight"] * nab["windows"], std["tpWeight"] * nab["windows"]
    raw = sum(d["raw"] for d in flagged)
    as_flagged = {"threshold": None, "raw": raw, "null": null, "perfect": perfect,
                  "score": None if not nab["windows"] else 100 * (raw - null) / (perfect - null)}
    return {"skip_rows": skip_rows, "point": total, "nab": nab, "nab_flags": as_flagged,
            "files": [{"file": f.path, "skipped": k, "point": m} for f, k, m in zip(files, skips, per)]}


def format_report(r: dict[str, Any]) -> str:
    names = [Path(f["file"]).name for f in r["files"]]
    wide = max([14, *map(len, names)])
    lines = [f"point metrics: 'anomaly' flag vs labels (first rows of each file left out: {r['skip_rows']})",
             f"{'file':{wide}} {'rows':>7} {'labelled':>8} {'flagged':>8} {'prec':>6} {'recall':>6} "
             + f"{'F1':>6} {'FAR':>7} {'MAR':>7}"]
    for name, m in [*zip(names, (f["point"] for f in r["files"])), ("TOTAL", r["point"])]:
        lines.append(f"{name:{wide}} {m['rows']:7d} {m['tp'] + m['fn']:8d} {m['tp'] + m['fp']:8d} "
                     f"{m['precision']:6.3f} {m['recall']:6.3f} {m['F1']:6.3f} "
                     f"{m['FAR'] * 100:6.1f}% {m['MAR'] * 100:6.1f}%")
    nab = r["nab"]
    lines += ["", f"NAB score ('score' column, {nab['windows']} windows, probationary rows not scored, "
                  + "one threshold per profile over all files):",
              f"{'profile':22} {'threshold':>10} {'raw':>9} {'null':>7} {'perfect':>7} {'score':>7}"]
    rows = [(k, v) for k, v in nab["profiles"].items()] + [("alerts: flag onsets (standard)", r["nab_flags"])]
    for k, v in rows:
        th = "flags" if v is r["nab_flags"] else ("none" if v["threshold"] is None else f"{v['threshold']:.9g}")
        sc = "n/a" if v["score"] is None else f"{v['score']:.1f}"
        lines.append(f"{k:22} {th:>10} {v['raw']:9.3f} {v['null']:7.1f} {v['perfect']:7.1f} {sc:>7}")
    std_name = "standard" if "standard" in nab["profiles"] else next(iter(nab["profiles"]))
    lines += ["", f"NAB per file (detections at the {std_name} threshold; raw score per profile, "
                  + "each at its own threshold):",
              f"{'file':{wide}} {'probation':>9} {'windows':>7} {'detected':>8} {'FP rows':>7} {'FP runs':>7} "
              + " ".join(f"{k.replace('reward_', '')[:12]:>12}" for k in nab["profiles"])]
    for i, name in enumerate(names):
        d = nab["profiles"][std_name]["files"][i]
        raws = " ".join(f"{v['files'][i]['raw']:12.3f}" for v in nab["profiles"].values())
        lines.append(f"{name:{wide}} {d['probation']:9d} {len(d['windows']):7d} "
                     f"{sum(w['detected'] is not None for w in d['windows']):8d} {d['fp_rows']:7d} "
                     f"{d['fp_runs']:7d} {raws}")
        for w in d["windows"]:
            got = "MISSED" if w["detected"] is None else f"first detection {w['detected']} (credit {w['credit']:.3f})"
            lines.append(f"    window {w['start']} .. {w['end']} ({w['rows']} rows): {got}")
    return "\n".join(lines)


def plot(files: list[Series], report: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per file: series (z-scored), score with the standard threshold, flags; the
    label windows shaded, the probationary period greyed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    prof = report["nab"]["profiles"].get("standard") or next(iter(report["nab"]["profiles"].values()))
    written: list[Path] = []
    for f in files:
        t = f.table
        x = t.times.astype("datetime64[s]") if t.time_column else np.arange(len(t))
        cols = [j for j, n in enumerate(t.features) if n not in ("error", "score")]
        fig, axes = plt.subplots(3, 1, figsize=(12, 6.5), sharex=True, height_ratios=[3, 2, 1])
        for j in cols[:8]:
            v = t.values[:, j]
            axes[0].plot(x, (v - np.nanmean(v)) / (np.nanstd(v) or 1.0), lw=0.6, label=t.features[j])
        axes[1].plot(x, f.score, lw=0.6, color="k")
        if prof["threshold"] is not None:
            axes[1].axhline(prof["threshold"], color="tab:red", lw=0.8, ls="--", label="NAB standard threshold")
            axes[1].legend(loc="upper left", fontsize=7)
        axes[2].fill_between(x, f.flag.astype(float), step="mid", color="tab:red", alpha=0.7)
        p = probation_rows(len(t))
        for ax in axes:
            for s, e in f.windows:
                ax.axvspan(x[s], x[e], color="tab:orange", alpha=0.2, lw=0)
            if p:
                ax.axvspan(x[0], x[p - 1], color="grey", alpha=0.15, lw=0)
        axes[0].set_title(f"{f.path}: series (z-scored), score, flags; labels shaded, probation grey",
                          fontsize=9)
        if len(cols) > 1:
            axes[0].legend(loc="upper left", fontsize=6, ncol=4)
        axes[1].set_ylabel("score"), axes[2].set_ylabel("flag")
        name = out / f"{Path(f.path).stem}.png"
        k = 1
        while name in written:
            name, k = out / f"{Path(f.path).stem}_{k}.png", k + 1
        fig.tight_layout()
        fig.savefig(name, dpi=80)
        plt.close(fig)
        written.append(name)
    return written


def load_profiles(path: Path) -> dict[str, dict[str, float]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        out = {name: {k: float(p["CostMatrix"][k]) for k in ("tpWeight", "fnWeight", "fpWeight")}
               for name, p in raw.items()}
    except OSError as err:
        raise InputError(str(path), f"cannot read: {err.strerror or err}") from None
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        raise InputError(str(path), "expected NAB profiles JSON: {name: {\"CostMatrix\": "
                                    "{tpWeight, fnWeight, fpWeight}}}") from None
    if not out:
        raise InputError(str(path), "no profiles")
    return out


def _key_map(text: str) -> tuple[str, str]:
    scores, sep, key = text.partition("=")
    if not sep or not scores or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SCORES=KEY")
    return scores, key


def _skip(text: str) -> int | str:
    if text == "probation" or (text.isdigit() and int(text) >= 0):
        return text if text == "probation" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a row count or 'probation'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--scores", type=Path, action="append", required=True, metavar="SCORES.csv",
      help="replay output (timestamp, ..., score, anomaly); repeat for several files")
    a("--labels", type=Path, action="append", required=True, metavar="LABELS",
      help="a windows JSON ({file: [[start, end], ...]}, NAB's format, or one list of windows), "
           "or data files with a label column, one per --scores in the same order")
    a("--label-column", metavar="COL", help=f"label column (default: the first of {', '.join(LABEL_NAMES)})")
    a("--time-column", metavar="COL", help="time column of the label files (default: detected)")
    a("--nab-key", type=_key_map, action="append", default=[], metavar="SCORES=KEY",
      help="windows JSON key for a scores file (default: the key whose file name matches)")
    a("--profiles", type=Path, metavar="FILE", help="NAB profiles JSON (default: NAB's three profiles)")
    a("--skip-rows", type=_skip, default=0, metavar="N|probation",
      help="leave the first N rows of each file (e.g. the training rows) out of the point "
           "metrics; 'probation' = NAB's probationary period (default: 0)")
    a("--plot", type=Path, metavar="DIR", help="write one PNG per file here")
    a("--json", type=Path, metavar="OUT", help="write the full results as JSON here")


def run(args: argparse.Namespace) -> int:
    try:
        files = load(args.scores, args.labels, args.label_column, dict(args.nab_key), args.time_column)
        report = evaluate(files, load_profiles(args.profiles) if args.profiles else None, args.skip_rows)
        print(format_report(report))
        for dest, write in ((args.json, lambda: args.json.write_text(json.dumps(report, indent=1) + "\n")),
                            (args.plot, lambda: plot(files, report, args.plot))):
            if dest is not None:
                try:
                    write()
                except OSError as err:
                    raise InputError(str(dest), f"cannot write: {err.strerror or err}") from None
    except InputError as err:
        print(f"anomaly-detector: error: {err}", file=sys.stderr)
        return 2
    return 0
