"""One recurrent step for a batch of streams: the LSTM cell and the decoder.

``numpy`` runs the step from the exported Keras weights with one matmul over ``[x, h]``
and few, in-place gate operations; ``onnx`` runs the same step as an ONNX graph in ONNX
Runtime; ``auto`` (the default) picks numpy for small batches and ONNX Runtime for large
ones. None of them needs TensorFlow, so the daemon starts fast and stays small. ``keras``
runs the step through the Keras layers themselves: slow, kept as the reference the others
are checked against.

The gate order and activations are Keras 3's ``LSTMCell``: ``z = x K + h R + b`` split
into input, forget, candidate and output gates; ``sigmoid`` on i, f, o and ``tanh`` on the
candidate and on the cell output.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    name: str
    hidden: int
    n_features: int

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance (h, c) by one reading per row of ``x`` (float32); returns new arrays
        (h, c, y) where ``y`` is the decoder's output for the new state."""
        ...


class NumpyRuntime:
    name = "numpy"

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        k = np.asarray(weights["kernel"], dtype=np.float32)
        r = np.asarray(weights["recurrent_kernel"], dtype=np.float32)
        self.n_features, four_h = k.shape
        self.hidden = hid = four_h // 4
        if r.shape != (hid, four_h):
            raise ValueError(f"recurrent kernel shape {r.shape} does not fit kernel {k.shape}")
        # sigmoid(v) = 0.5 * tanh(v / 2) + 0.5: with the i, f, o columns of the weights
        # halved, one tanh over all four gates serves them and the candidate, and one
        # multiply-add per column turns the gate columns into sigmoids. Few, large numpy
        # calls: what batch 1 pays for is the number of calls.
        half = np.ones(four_h, dtype=np.float32)
        half[: 2 * hid] = half[3 * hid:] = 0.5
        self.w = np.ascontiguousarray(np.vstack([k, r]) * half)
        self.b = np.asarray(weights["bias"], dtype=np.float32) * half
        self.gate_mul = half
        self.gate_add = np.where(half == 0.5, 0.5, 0.0).astype(np.float32)
        self.code_k = np.asarray(weights["code_kernel"], dtype=np.float32)
        self.code_b = np.asarray(weights["code_bias"], dtype=np.float32)
        self.out_k = np.asarray(weights["out_kernel"], dtype=np.float32)
        self.out_b = np.asarray(weights["out_bias"], dtype=np.float32)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, c = self.cell(x, h, c)
        return h, c, self.decode(h)

    def cell(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hid = self.hidden
        z = np.concatenate((x, h), axis=1, dtype=np.float32) @ self.w
        z += self.b
        np.tanh(z, out=z)
        z *= self.gate_mul
        z += self.gate_add
        c_new = z[:, hid: 2 * hid] * c
        z[:, :hid] *= z[:, 2 * hid: 3 * hid]
        c_new += z[:, :hid]
        h_new = np.tanh(c_new)
        h_new *= z[:, 3 * hid:]
        return h_new, c_new

    def decode(self, h: np.ndarray) -> np.ndarray:
        code = h @ self.code_k
        code += self.code_b
        np.tanh(code, out=code)
        y = code @ self.out_k
        y += self.out_b
        return y


class OnnxRuntime:
    """The same step as an ONNX graph (``step.onnx``) run by ONNX Runtime, whose
    vectorised tanh and sigmoid make large batches several times cheaper than numpy's."""

    name = "onnx"

    def __init__(self, model_bytes: bytes, hidden: int, n_features: int, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        self._run = self._sess.run
        self.hidden = hidden
        self.n_features = n_features

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h_new, c_new, y = self._run(None, {"x": np.ascontiguousarray(x, dtype=np.float32),
                                           "h": np.ascontiguousarray(h, dtype=np.float32),
                                           "c": np.ascontiguousarray(c, dtype=np.float32)})
        return h_new, c_new, y


class AutoRuntime:
    """numpy below ``min_batch`` streams, ONNX Runtime from there on.

    Measured on the development machine (bench/RESULTS.md): numpy wins at batch 1, where
    the cost is the number of calls, and ONNX Runtime wins from a few dozen streams up,
    where the cost is tanh and sigmoid over the gates. Both run the same weights.
    """

    min_batch = 16

    def __init__(self, small: NumpyRuntime, large: OnnxRuntime) -> None:
        self._small, self._large = small, large
        self.name = "auto"
        self.hidden, self.n_features = small.hidden, small.n_features

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self._large if len(x) >= self.min_batch else self._small).step(x, h, c)


class KerasRuntime:
    """The reference: the same step through the Keras layers (eager, slow)."""

    name = "keras"

    def __init__(self, keras_model: object) -> None:
        from detector.model import keras  # imports TensorFlow; only for this runtime

        self._ops = keras.ops
        self._lstm = keras_model.get_layer("lstm")
        self._code = keras_model.get_layer("code")
        self._out = keras_model.get_layer("out")
        self.hidden = int(self._lstm.units)
        self.n_features = int(self._out.units)

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        conv = self._ops.convert_to_tensor
        _, (h_new, c_new) = self._lstm.cell(conv(x.astype(np.float32)),
                                            [conv(h.astype(np.float32)), conv(c.astype(np.float32))])
        y = self._out(self._code(h_new))
        return tuple(np.asarray(self._ops.convert_to_numpy(v)) for v in (h_new, c_new, y))  # type: ignore[return-value]


def run_sequence(rt: Runtime, inputs: np.ndarray, h: np.ndarray | None = None,
                 c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step through ``inputs`` (streams, time, features) reading by reading, carrying state.

    Returns (outputs, h, c) where ``outputs[:, t]`` is the decoder's output after reading
    ``t``: what the Keras model gives for the whole sequence from the same initial state.
    """
    n, t_len, _ = inputs.shape
    if h is None:
        h = np.zeros((n, rt.hidden), dtype=np.float32)
    if c is None:
        c = np.zeros((n, rt.hidden), dtype=np.float32)
    out = np.empty((n, t_len, rt.n_features), dtype=np.float32)
    for t in range(t_len):
        h, c, out[:, t] = rt.step(inputs[:, t].astype(np.float32), h, c)
    return out, h, c
