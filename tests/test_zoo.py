"""build_mlp: a valid ONNX MLP, laid out and initialised like the PyTorch original."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.runtime import make_session

from studies.zoo import build_mlp


def forward(params, x, hidden_layers, activation):
    """numpy reference: Gemm(transB=1) then PReLU/ReLU on each hidden layer."""
    h = x.astype(np.float64)
    for layer in range(1, hidden_layers + 2):
        h = h @ params[f"fc{layer}.weight"].T + params[f"fc{layer}.bias"]
        if layer <= hidden_layers:
            slope = params[f"prelu{layer}.weight"] if activation == "prelu" else 0.0
            h = np.where(h > 0, h, slope * h)
    return h


@pytest.mark.parametrize("hidden, activation", [((64, 64), "prelu"), ((32, 32), "prelu"), ((16, 8, 4), "relu")])
def test_mlp_is_valid_and_matches_numpy(hidden, activation):
    model = build_mlp(hidden, seed=0, activation=activation)
    onnx.checker.check_model(model, full_check=True)
    assert (model.ir_version, model.opset_import[0].version) == (8, 17)
    assert [n.name for n in model.graph.node if n.op_type == "Gemm"] == [f"fc{i}" for i in range(1, len(hidden) + 2)]
    params = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sizes = [784, *hidden, 10]
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        weight, bias = params[f"fc{layer}.weight"], params[f"fc{layer}.bias"]
        assert weight.shape == (fan_out, fan_in) and bias.shape == (fan_out,)
        assert np.abs(weight).max() <= 1 / np.sqrt(fan_in) and np.abs(bias).max() <= 1 / np.sqrt(fan_in)
    if activation == "prelu":
        assert all(params[f"prelu{i}.weight"].tolist() == [0.25] for i in range(1, len(hidden) + 1))

    x = np.random.default_rng(1).random((20, 784), dtype=np.float32)
    logits = make_session(model).run(["logits"], {"x": x})[0]
    assert logits.shape == (20, 10)
    np.testing.assert_allclose(logits, forward(params, x, len(hidden), activation), rtol=1e-5, atol=1e-5)


def test_seed_decides_the_weights():
    same = [build_mlp(seed=0).SerializeToString() for _ in range(2)]
    assert same[0] == same[1] and build_mlp(seed=1).SerializeToString() != same[0]


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation"):
        build_mlp(activation="gelu")
