"""anomaly-detector: a streaming LSTM-autoencoder anomaly detector for sensor data."""

__version__ = "0.1.0"
