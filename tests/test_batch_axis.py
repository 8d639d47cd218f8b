"""Inputs whose batch is not their first axis (issue 11): read along the axis the declared shapes,
the data or ``--batch-axis NAME=AXIS`` name. Full Silero VAD declares input (?, ?) and state
(2, ?, 128): no symbol says where the state's batch is, the data does."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.io.data import make_dataset

N = 10


def stateful(state_dims):
    """y = x @ W + sum over the state's first axis of state @ V; x (N, 4), state ``state_dims``
    holding (2, N, 3)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "V"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="fc"),
             helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
             helper.make_node("MatMul", ["s", "V"], ["sv"], name="rec"),
             helper.make_node("Add", ["xw", "sv"], ["y"])]
    graph = helper.make_graph(nodes, "stateful", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
                                                  helper.make_tensor_value_info("state", TensorProto.FLOAT, state_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((N, 4)).astype(np.float32),
            "state": rng.standard_normal((2, N, 3)).astype(np.float32)}


def test_the_data_tells_the_batch_axis_when_the_declared_shapes_share_no_symbol(arrays):
    dataset = make_dataset(arrays, stateful([2, None, 3]))
    assert dataset.axes == {"state": 1} and len(dataset) == N
    batches = list(dataset.batches(4))
    assert [b["state"].shape for b, _ in batches] == [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    np.testing.assert_array_equal(batches[1][0]["state"], arrays["state"][:, 4:8])


def test_an_unknown_batch_axis_asks_for_batch_axis_and_the_option_gives_it(arrays, tmp_path):
    model = stateful([None, None, 3])  # both first dims free: nothing tells which axis is the batch
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    args = ["prune", tmp_path / "m.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz", "--sparsity", "0.5"]
    refused = CliRunner().invoke(main, [str(a) for a in args])
    assert refused.exit_code == 2 and "--batch-axis NAME=AXIS" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()

    given = CliRunner().invoke(main, [str(a) for a in args + ["--batch-axis", "state=1", "--test", tmp_path / "calib.npz"]])
    assert given.exit_code == 0, given.output
    # the same pruned weights as the model whose declared shapes let the data tell the axis
    onnx.save(stateful([2, None, 3]), tmp_path / "declared.onnx")
    inferred = CliRunner().invoke(main, [str(a) for a in ["prune", tmp_path / "declared.onnx", tmp_path / "ref.onnx",
                                                          "--data", tmp_path / "calib.npz", "--sparsity", "0.5"]])
    assert inferred.exit_code == 0, inferred.output
    pruned, reference = (onnx.load(tmp_path / name) for name in ("out.onnx", "ref.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for t in reference.graph.initializer:
        np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))
    assert np.count_nonzero(weights["W"] == 0) + np.count_nonzero(weights["V"] == 0) == 10
    assert [d.dim_value or None for d in pruned.graph.input[1].type.tensor_type.shape.dim] == [None, None, 3]
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, arrays)[0].shape == (N, 3)  # the written model takes the state in its own layout


@pytest.mark.parametrize("option, message", [("state", "is not NAME=AXIS"), ("cell=1", "neither a per-sample input"),
                                             ("state=3", "has 3 axes"), ("x=0", None)])
def test_batch_axis_values(arrays, tmp_path, option, message):
    onnx.save(stateful([2, None, 3]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--data",
                                       str(tmp_path / "calib.npz"), "--sparsity", "0.5", "--batch-axis", option])
    if message is None:  # naming the axis the model already shows changes nothing
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_structured_pruning_reads_the_batch_axis_too(arrays, tmp_path):
    """Both strategies share the analysis copy: the batch axis is honoured, and what stops this model
    is what it is (its layers write the graph output), named with the node."""
    onnx.save(stateful([2, None, 3]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--data",
                                       str(tmp_path / "calib.npz"), "--sparsity", "0.5", "--structured",
                                       "--batch-axis", "state=1"])
    assert result.exit_code == 2 and "no unit group" in result.output and "fc (MatMul)" in result.output
    assert not (tmp_path / "out.onnx").exists()
