"""The ``anomaly-detector`` command line.

Every command exits 0 on success and 2 on bad usage or bad input, with one line on stderr
naming the file, row or key at fault (never a traceback for those).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from detector import __version__, config
from detector.errors import InputError

DEFAULT_CONFIG = Path("config.toml")


def _features(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of column names")
    return names


def whole_number(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``lo`` (to ``hi``), else one clear line."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r} must be " + (f"{lo} to {hi}" if hi is not None
                                                                       else f"> {lo - 1}"))
        return v
    return parse


_positive_int = whole_number(1)
seed = whole_number(0, 2**32 - 1)  # what numpy takes, as [train] seed


def _load_config(path: Path | None) -> config.Config:
    """``--config`` if given; else ./config.toml when present; else the defaults."""
    if path is None:
        return config.load(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return config.load(path)


def _overrides(cfg: config.Config, args: argparse.Namespace) -> config.Config:
    tc = cfg.train
    if getattr(args, "epochs", None) is not None:
        tc = replace(tc, epochs=args.epochs)
    if getattr(args, "seed", None) is not None:
        tc = replace(tc, seed=args.seed)
    return replace(cfg, train=tc)


def cmd_train(args: argparse.Namespace) -> int:
    from detector import train
    from detector.data import read_table

    cfg = _overrides(_load_config(args.config), args)
    tables = [read_table(p, args.features, args.time_column) for p in args.data]
    train.fit(tables, args.out, cfg, name=args.name)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from detector import replay

    if args.model is not None:  # they shape a fit, and --model has none: refused, not ignored
        for flag, value in (("--save-model", args.save_model), ("--epochs", args.epochs), ("--seed", args.seed)):
            if value is not None:
                raise InputError(flag, "only with --train-rows (--model scores with a trained bundle)")
    if args.out.is_dir():
        raise InputError(str(args.out), "is a directory; --out names the SCORES.csv file to write")
    cfg = _overrides(_load_config(args.config), args)
    replay.run(args.data, args.out, cfg, model=args.model, train_rows=args.train_rows,
               features=args.features, time_column=args.time_column, save_model=args.save_model)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from detector.worker import load_models

    path = args.config if args.config is not None else DEFAULT_CONFIG
    cfg = config.load(path)
    # The secrets and TLS files too, exactly as `run` reads them at start.
    from detector import ingest

    ingest._password(cfg)
    if cfg.mqtt.tls:
        ingest.tls_context(cfg)
    bundles = load_models(cfg)
    from detector.checkpoint import state_dir_problem

    state_dir = cfg.resolve(cfg.state.dir)
    problem = state_dir_problem(state_dir)
    if problem:
        raise InputError(f"[state] dir {state_dir}", problem)
    print(f"{path}: ok ({len(bundles)} model bundle(s) checked)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from detector.daemon import Daemon, setup_logging

    path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = config.load(path)
    setup_logging(cfg)
    return Daemon(cfg, path).run()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-detector",
        description="Streaming anomaly detection for sensor data with a stateful LSTM autoencoder.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--features", type=_features, metavar="A,B,...",
                        help="feature columns (default: every numeric column except the time "
                             "and label columns)")
        sp.add_argument("--time-column", metavar="COL",
                        help="time column (default: the first named like a time or holding dates)")
        sp.add_argument("--config", type=Path, metavar="FILE",
                        help="config file (default: ./config.toml if present, else built-in defaults)")
        sp.add_argument("--epochs", type=_positive_int, metavar="N",
                        help="maximum training epochs (early stopping may end sooner)")
        sp.add_argument("--seed", type=seed, metavar="N", help="random seed for training")

    t = sub.add_parser(
        "train", help="train a model bundle from CSV/Parquet files",
        description="Train the LSTM autoencoder on normal data and write a model bundle "
                    "(model.keras, manifest.json, weights.npz, report.txt, report.png).")
    t.add_argument("--data", type=Path, action="append", required=True, metavar="FILE",
                   help="training data, CSV (',' or ';') or Parquet; repeat for several files")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    t.add_argument("--name", help="model name in the manifest (default: the --out directory's name)")
    data_args(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "replay", help="stream a file through the engine and write SCORES.csv",
        description="Stream every row of a file, in order, through the streaming engine "
                    "(LSTM state carried) and write SCORES.csv: timestamp, features, error, "
                    "score, anomaly.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, metavar="DIR", help="a trained model bundle")
    src.add_argument("--train-rows", type=_positive_int, metavar="N",
                     help="learn from the stream: fit a fresh model on the first N rows, then "
                          "stream every row")
    r.add_argument("--data", type=Path, required=True, metavar="FILE", help="CSV or Parquet file")
    r.add_argument("--out", type=Path, required=True, metavar="SCORES.csv", help="output file")
    r.add_argument("--save-model", type=Path, metavar="DIR",
                   help="with --train-rows: keep the fitted bundle here")
    data_args(r)
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser(
        "run", help="run the daemon: MQTT in, alerts out, Prometheus metrics",
        description="Run the streaming detector as a service: subscribe to [mqtt] topics, score "
                    "every reading with the stream's model (first matching [[models]] entry, else "
                    "a model learned from the stream), publish anomaly_start/anomaly_end alerts on "
                    "[alerts] topic_prefix/<stream>, serve /metrics and /healthz. SIGTERM/SIGINT: "
                    "drain, checkpoint, exit 0; SIGHUP: reload config and models, keeping state.")
    d.add_argument("--config", type=Path, metavar="FILE",
                   help="config file (default: ./config.toml if present, else built-in defaults)")
    d.set_defaults(func=cmd_run)

    from detector import demo, evaluate, simulate

    ev = sub.add_parser(
        "evaluate", help="score SCORES.csv against labels: point F1/FAR/MAR and the NAB score",
        description="Compare replay output with labels (a label column of the data files, one per "
                    "--scores, matched row by row or by timestamp; or NAB windows JSON). Prints "
                    "precision/recall/F1/FAR/MAR per file and for all files concatenated, and the NAB "
                    "score for its three profiles (probationary period, scaled-sigmoid credit for the "
                    "earliest detection per window, one threshold per profile optimised over all "
                    "files, null detector = 0, perfect = 100).")
    evaluate.add_arguments(ev)
    ev.set_defaults(func=evaluate.run)

    dm = sub.add_parser(
        "demo", help="embedded broker + simulated plant + the daemon, alerts printed",
        description="Run everything in one process on loopback: an embedded MQTT broker, simulated "
                    "pumps with faults injected now and then, the daemon with the shipped model "
                    "(models/plant), and the alerts printed as they arrive. Ctrl-C stops it.")
    demo.add_arguments(dm)
    dm.set_defaults(func=demo.run)

    sm = sub.add_parser(
        "simulate", help="publish simulated sensor readings (load and fault generator)",
        description="Publish simulated pumps (temperature, pressure, flow, vibration) to an MQTT "
                    "broker at a fixed rate or flat out, injecting faults (spike, drift, stuck, "
                    "disagree) now and then and printing each one.")
    simulate.add_arguments(sm)
    sm.set_defaults(func=simulate.run)

    c = sub.add_parser("check-config", help="validate a config file and the model bundles it names",
                       description="Validate a config file: unknown keys, wrong types and "
                                   "out-of-range values are reported with the key named; every "
                                   "[[models]] bundle is loaded and checked.")
    c.add_argument("--config", type=Path, metavar="FILE", help="config file (default: ./config.toml)")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as err:
        print(f"anomaly-detector: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
