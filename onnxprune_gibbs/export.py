"""The whole fitted ensemble as ONE ONNX graph (IR 10, default-domain opset 21).

Graph (M members, S samples, d features, K classes):

    x float32 [S, d] -> Cast(double) [-> Sub(center)]
      -> MatMul(W0 [d, M*h0]) [+ b0] -> Reshape [S, M, h0] -> Transpose [M, S, h0]
      -> (activation -> MatMul(W_l [M, h, h']) [+ b_l])*           one MatMul per layer, all members
      -> member decisions [M, S]: Greater(s, 0) (binary) or ArgMax(axis 2)
         -> Equal(classes) -> Cast(double) [M, S, K]                  (hard votes)
         or Sigmoid / Softmax [M, S, K]                               (soft votes)
      -> Reshape [M, S*K] -> MatMul(p [1, M]) -> Reshape [S, K]      the Gibbs weights, one initializer
      -> probabilities = Cast(float, votes)   (sum(p) = 1 within M 2^-51; first output)
      -> label = ArgMax(votes, axis 1)                  (second output, int64)

Weights are stored as float32 initializers and cast to double in the graph; everything after the
input cast is double, mirroring the numpy estimator, and hard votes with the quantised weights are
exact sums, so the labels equal ``GibbsEnsemble.predict`` (see gibbs.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import CheckFailed, InputError
from onnxprune_gibbs.estimator import GibbsEnsemble

IR_VERSION = 10
OPSET = 21
INPUT = "x"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
SCALE_KEY = "onnxprune.input_scale"


def to_onnx(ensemble: GibbsEnsemble, metadata: dict[str, str] | None = None,
            graph_name: str = "gibbs_ensemble") -> onnx.ModelProto:
    """The fitted ``ensemble`` as one ONNX model (checked with onnx.checker)."""
    ensemble._check_fitted()
    bank = ensemble.members_
    M, d, K = bank.n_members, bank.n_features, ensemble.n_classes_
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def weight64(name: str, value: np.ndarray) -> str:
        const(name, value.astype(np.float32))
        return node("Cast", [name], name + "_f64", to=TensorProto.DOUBLE)

    cur = node("Cast", [INPUT], "x_f64", to=TensorProto.DOUBLE)
    if ensemble.x_mean_ is not None:
        cur = node("Sub", [cur, const("center", ensemble.x_mean_.astype(np.float64))], "x_centered")

    w0 = bank.weights[0]
    h0 = w0.shape[2]
    cur = node("MatMul", [cur, weight64("W0", w0.transpose(1, 0, 2).reshape(d, M * h0))], "z0")
    if bank.biases[0] is not None:
        cur = node("Add", [cur, weight64("b0", bank.biases[0].reshape(M * h0))], "z0_bias")
    cur = node("Reshape", [cur, const("shape_smh", np.array([-1, M, h0], np.int64))], "z0_smh")
    cur = node("Transpose", [cur], "z0_msh", perm=[1, 0, 2])
    for i, (w, b) in enumerate(zip(bank.weights[1:], bank.biases[1:], strict=True), start=1):
        cur = node("Tanh" if bank.activation == "tanh" else "Relu", [cur], f"h{i}")
        cur = node("MatMul", [cur, weight64(f"W{i}", w)], f"z{i}")
        if b is not None:
            cur = node("Add", [cur, weight64(f"b{i}", b[:, None, :])], f"z{i}_bias")
    scores = cur  # (M, S, n_out)

    if ensemble.vote == "hard":
        if bank.n_outputs == 1:
            s = node("Squeeze", [scores, const("axis2", np.array([2], np.int64))], "score")
            pos = node("Greater", [s, const("zero_f64", np.array(0.0))], "positive")
            labels = node("Cast", [pos], "member_label", to=TensorProto.INT64)
        else:
            labels = node("ArgMax", [scores], "member_label", axis=2, keepdims=0)
        lab3 = node("Unsqueeze", [labels, const("axis2_u", np.array([2], np.int64))], "member_label_3d")
        hit = node("Equal", [lab3, const("classes", np.arange(K, dtype=np.int64))], "member_onehot_bool")
        out = node("Cast", [hit], "member_onehot", to=TensorProto.DOUBLE)
    else:
        if bank.n_outputs == 1:
            p1 = node("Sigmoid", [scores], "member_p1")
            p0 = node("Sub", [const("one_f64", np.array(1.0)), p1], "member_p0")
            out = node("Concat", [p0, p1], "member_proba", axis=2)
        else:
            out = node("Softmax", [scores], "member_proba", axis=2)
    flat = node("Reshape", [out, const("shape_m_flat", np.array([M, -1], np.int64))], "member_flat")
    weights = const("gibbs_weights", ensemble.weights_.reshape(1, M).astype(np.float64))
    votes_flat = node("MatMul", [weights, flat], "votes_flat")
    votes = node("Reshape", [votes_flat, const("shape_sk", np.array([-1, K], np.int64))], "votes")
    node("ArgMax", [votes], OUTPUT_LABEL, axis=1, keepdims=0)
    # the quantised weights sum to 1 within M * 2^-51: the votes are the probabilities. No Mul by
    # 1/sum: onnxruntime drops a Mul by a constant within float32 epsilon of 1 (gibbs.py).
    node("Cast", [votes], OUTPUT_PROBABILITIES, to=TensorProto.FLOAT)

    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["N", K]),
         helper.make_tensor_value_info(OUTPUT_LABEL, TensorProto.INT64, ["N"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxprune.ensemble", ir_version=IR_VERSION)
    model.doc_string = (f"Gibbs-weighted ensemble of {M} random {ensemble.kind} members "
                        f"(T={ensemble.temperature_:.6g}, {ensemble.vote} votes)")
    info = ensemble.summary()
    props = {"onnxprune.model": "gibbs-ensemble"}
    props.update({f"onnxprune.ensemble.{k}": str(v) for k, v in info.items()})
    if ensemble.dropped_:
        props.update({f"onnxprune.ensemble.drop.{k}": str(v) for k, v in ensemble.dropped_.items()})
    props.update(metadata or {})
    helper.set_model_props(model, props)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # a bug on our side, not the user's input
        raise CheckFailed(f"the exported ensemble fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return model


def input_scale_metadata(scale: float | None) -> dict[str, str]:
    """metadata_props that make ``onnxprune evaluate`` scale uint8 inputs by ``scale``."""
    return {} if scale is None else {SCALE_KEY: repr(float(scale))}


def run_onnx(model: onnx.ModelProto | bytes | str | Path, X: np.ndarray, batch_size: int = 256,
             provider: str = "cpu", threads: int | None = None, session=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 (S, K), labels int64 (S,)) of the exported ensemble on onnxruntime."""
    from onnxprune.runtime import make_session

    if session is None:
        if isinstance(model, (str, Path)):
            model = onnx.load(str(model))
        session = make_session(model, provider, threads)
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise InputError(f"inputs must be 2-D (samples, features), got shape {list(X.shape)}")
    probs, labels = [], []
    for start in range(0, len(X), batch_size):
        p, lab = session.run([OUTPUT_PROBABILITIES, OUTPUT_LABEL], {INPUT: X[start:start + batch_size]})
        probs.append(p)
        labels.append(lab)
    return np.concatenate(probs), np.concatenate(labels)
