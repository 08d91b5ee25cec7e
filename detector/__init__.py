"""anomaly-detector: a streaming LSTM-autoencoder anomaly detector for sensor data."""

import os

# ONNX Runtime (1.32) otherwise keeps a device id and an event cache under ~/.cache and
# ships an uploader; a daemon on a plant network has no business phoning home.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
