"""Export the streaming step (LSTM cell + decoder) as an ONNX graph for ONNX Runtime.

Built directly from the Keras weights with ``onnx.helper``: the graph is small and fixed
(``step(x, h, c) -> (h, c, y)``), so writing it is simpler and more predictable than a
generic converter, and it is checked against Keras for parity when the bundle is written.
"""

from __future__ import annotations

import numpy as np

OPSET = 17


def step_model(weights: dict[str, np.ndarray]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = np.asarray(weights["kernel"], dtype=np.float32)
    r = np.asarray(weights["recurrent_kernel"], dtype=np.float32)
    f_in, four_h = k.shape
    hid = four_h // 4
    inits = [
        numpy_helper.from_array(np.vstack([k, r]), "W"),
        numpy_helper.from_array(np.asarray(weights["bias"], dtype=np.float32), "b"),
        numpy_helper.from_array(np.asarray(weights["code_kernel"], dtype=np.float32), "Kc"),
        numpy_helper.from_array(np.asarray(weights["code_bias"], dtype=np.float32), "bc"),
        numpy_helper.from_array(np.asarray(weights["out_kernel"], dtype=np.float32), "Ko"),
        numpy_helper.from_array(np.asarray(weights["out_bias"], dtype=np.float32), "bo"),
        numpy_helper.from_array(np.array([hid] * 4, dtype=np.int64), "split4"),
    ]
    n = helper.make_node
    nodes = [
        n("Concat", ["x", "h"], ["xh"], axis=1),
        n("MatMul", ["xh", "W"], ["zw"]),
        n("Add", ["zw", "b"], ["z"]),
        n("Split", ["z", "split4"], ["zi", "zf", "zg", "zo"], axis=1),
        n("Sigmoid", ["zi"], ["gi"]),
        n("Sigmoid", ["zf"], ["gf"]),
        n("Tanh", ["zg"], ["gg"]),
        n("Sigmoid", ["zo"], ["go"]),
        n("Mul", ["gf", "c"], ["fc"]),
        n("Mul", ["gi", "gg"], ["ig"]),
        n("Add", ["fc", "ig"], ["c_out"]),
        n("Tanh", ["c_out"], ["tc"]),
        n("Mul", ["go", "tc"], ["h_out"]),
        n("MatMul", ["h_out", "Kc"], ["cm"]),
        n("Add", ["cm", "bc"], ["ca"]),
        n("Tanh", ["ca"], ["code"]),
        n("MatMul", ["code", "Ko"], ["ym"]),
        n("Add", ["ym", "bo"], ["y"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "lstm_autoencoder_step",
        [helper.make_tensor_value_info("x", f32, ["N", f_in]),
         helper.make_tensor_value_info("h", f32, ["N", hid]),
         helper.make_tensor_value_info("c", f32, ["N", hid])],
        [helper.make_tensor_value_info("h_out", f32, ["N", hid]),
         helper.make_tensor_value_info("c_out", f32, ["N", hid]),
         helper.make_tensor_value_info("y", f32, ["N", int(weights["out_kernel"].shape[1])])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="anomaly-detector")
    model.ir_version = 8  # readable by every onnxruntime 1.14+
    onnx.checker.check_model(model)
    return model.SerializeToString()
