"""The Keras LSTM autoencoder: one graph for training, its weights shared by the step.

The network is ``LSTM(hidden) -> Dense(bottleneck, tanh) -> Dense(features)``, run over
sequences. Two kinds, differing only in what the LSTM has seen when it reconstructs:

* ``forecast``: the reading at *t* is reconstructed from the state after *t-1*; the
  network never sees the reading it reconstructs, so it cannot copy it (a spike cannot
  reconstruct itself). Trained on inputs lagged by one row.
* ``reconstruct``: the state after *t* passes through the bottleneck; a classic
  autoencoder that relies on the bottleneck to avoid the identity.

Either way, streaming costs one LSTM cell step per reading with (h, c) carried per
stream; :mod:`detector.runtime` runs that step from these same weights.

TensorFlow is imported only here and in training: scoring never needs it.
"""

from __future__ import annotations

import os
from typing import Any

# TensorFlow's C++ logging prints harmless graph warnings on every fit; errors that
# matter still surface as Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402


def build(n_features: int, hidden: int, bottleneck: int) -> keras.Model:
    inputs = keras.Input(shape=(None, n_features), name="readings")
    seq = keras.layers.LSTM(hidden, return_sequences=True, name="lstm")(inputs)
    code = keras.layers.Dense(bottleneck, activation="tanh", name="code")(seq)
    out = keras.layers.Dense(n_features, name="out")(code)
    return keras.Model(inputs, out, name="lstm_autoencoder")


def export_weights(model: keras.Model) -> dict[str, Any]:
    """The arrays the numpy step needs, named as :mod:`detector.runtime` expects."""
    lstm = model.get_layer("lstm")
    kernel, recurrent, bias = (w.numpy() if hasattr(w, "numpy") else w for w in lstm.get_weights())
    code_k, code_b = model.get_layer("code").get_weights()
    out_k, out_b = model.get_layer("out").get_weights()
    return {"kernel": kernel, "recurrent_kernel": recurrent, "bias": bias,
            "code_kernel": code_k, "code_bias": code_b, "out_kernel": out_k, "out_bias": out_b}


def load(path: str) -> keras.Model:
    # safe_mode refuses lambda layers and other code hidden in the archive.
    return keras.saving.load_model(path, compile=False, safe_mode=True)
