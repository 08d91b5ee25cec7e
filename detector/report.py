"""The training report written beside a bundle: ``report.txt`` and ``report.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from detector.bundle import Bundle


def write(out: Path, b: "Bundle", history: dict[str, list[float]], val_errors: np.ndarray) -> None:
    m = b.manifest
    tr = m["training"]
    cal = b.calibration
    lines = [
        f"model {m['name']} version {m['version']} ({m['kind']}, hidden {m['hidden']}, "
        f"bottleneck {m['bottleneck']}, smoothing {m['smoothing']})",
        f"features: {', '.join(m['features'])}",
        f"sources: {', '.join(tr['sources'])}",
        "data: " + json.dumps(tr["prep"]),
        f"rows: {tr['train_rows']} training, {tr['validation_rows']} validation; "
        f"{tr['windows']} windows of {tr['seq_len']} steps",
        f"epochs run: {tr['epochs_run']}; final loss {history['loss'][-1]:.5f}"
        + (f"; best val_loss {min(history['val_loss']):.5f}" if "val_loss" in history else ""),
        f"held-out error: p50 {np.median(val_errors):.4g}, p99 {np.quantile(val_errors, 0.99):.4g}, "
        f"max {np.max(val_errors):.4g}",
        "error at score 0.99 / 0.999 / 0.9999: "
        + " / ".join(f"{cal.error_at(s):.4g}" for s in (0.99, 0.999, 0.9999)),
        "step vs Keras, max abs diff: " + ", ".join(
            f"{k} {v:.2e}" for k, v in m["parity"].get("by_runtime", {}).items()),
        f"training took {tr['seconds']} s",
    ]
    (out / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, vals in history.items():
        ax1.plot(range(1, len(vals) + 1), vals, label=key)
    if all(v > 0 for vals in history.values() for v in vals):  # constant data trains to a loss of 0
        ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_title("training curve (MSE, scaled units)")
    ax1.legend()
    positive = val_errors[val_errors > 0]
    if len(positive):
        ax2.hist(np.log10(positive), bins=40, color="tab:blue", alpha=0.8)
    for s, style in ((0.99, ":"), (0.999, "--")):
        ax2.axvline(np.log10(max(cal.error_at(s), 1e-12)), color="tab:red", linestyle=style,
                    label=f"score {s}")
    ax2.set_xlabel("log10 held-out error")
    ax2.set_title("held-out error distribution")
    ax2.legend()
    fig.suptitle(f"{m['name']} {m['version']}")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    plt.close(fig)
