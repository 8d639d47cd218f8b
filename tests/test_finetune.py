"""finetune: training lowers the loss, masks hold, stamping survives, Adam matches torch's update."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputError
from onnxprune.finetune import finetune
from onnxprune.runtime import make_session
from onnxprune.zoo import build_mlp


def blobs(n=96, features=5, classes=3, seed=0):
    """Three Gaussian clusters: an easy problem a small MLP fits in a few epochs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(classes, features))
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(size=(n, features))).astype(np.float32)
    return x, y.astype(np.int64)


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def linear_softmax(w, b):
    """logits = x W^T + b followed by Softmax, so the loss must be put on the Softmax's input."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1), helper.make_node("Softmax", ["logits"], ["prob"], axis=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cross_entropy(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean()


def test_training_lowers_the_loss_quietly(capfd):
    x, y = blobs()
    calls = []
    model = build_mlp((8,), inputs=5, classes=3)
    trained, history = finetune(model, x, y, epochs=5, lr=1e-2, batch_size=16, progress=lambda *a: calls.append(a))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert len(calls) == 5 * 6 and calls[-1][:3] == (5, 6, 6)
    assert capfd.readouterr() == ("", "")  # generate_artifacts' INFO lines are silenced
    logits = make_session(trained).run(None, {"x": x})[0]
    assert cross_entropy(logits.astype(np.float64), y) < cross_entropy(make_session(model).run(None, {"x": x})[0], y)


def test_masks_keep_pruned_weights_zero_and_stamping_survives():
    x, y = blobs()
    model = build_mlp((8, 8), inputs=5, classes=3)
    model.ir_version, model.opset_import[0].version = 11, 23  # above what the runtime accepts
    onnx.helper.set_model_props(model, {"onnxprune.dataset": "blobs"})
    rng = np.random.default_rng(1)
    masks = {name: rng.random(w.shape) > 0.5 for name, w in weights(model).items() if name.startswith("fc") and w.ndim == 2}

    trained, _ = finetune(model, x, y, epochs=3, lr=1e-2, batch_size=16, masks=masks)
    onnx.checker.check_model(trained, full_check=True)
    assert (trained.ir_version, trained.opset_import[0].version) == (11, 23)
    assert trained.metadata_props == model.metadata_props and trained.graph.node == model.graph.node
    after = weights(trained)
    for name, mask in masks.items():
        assert np.all(after[name][~mask] == 0) and not np.signbit(after[name][~mask]).any()
        # most kept weights move (a unit whose outgoing weights are all pruned gets no gradient)
        assert np.mean(after[name][mask] != weights(model)[name][mask]) > 0.5
    assert after["prelu1.weight"].item() != 0.25  # PReLU slopes train too
    make_session(trained).run(None, {"x": x})


def test_the_forward_pass_sees_masked_weights_during_training():
    """With one full batch per epoch, epoch 2's loss is the loss of the model after one step, masked."""
    x, y = blobs()
    model = build_mlp((8,), inputs=5, classes=3)
    masks = {"fc1.weight": np.random.default_rng(2).random((8, 5)) > 0.5}
    _, history = finetune(model, x, y, epochs=2, lr=1e-2, batch_size=len(x), masks=masks)
    one_step, _ = finetune(model, x, y, epochs=1, lr=1e-2, batch_size=len(x), masks=masks)
    logits = make_session(one_step).run(None, {"x": x})[0].astype(np.float64)
    assert history[1]["loss"] == pytest.approx(cross_entropy(logits, y), abs=1e-5)


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = blobs()
    model = build_mlp((8,), inputs=5, classes=3)
    run = lambda seed: weights(finetune(model, x, y, epochs=2, batch_size=16, seed=seed)[0])
    first, again, other = run(0), run(0), run(1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_adam_steps_match_a_numpy_reference():
    """Three full-batch steps against torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no decay),
    written out in numpy; the Softmax output also checks that the loss is put on the logits.
    Feature 0 is tiny so that its weights' gradients (~1e-7) are near eps: the check then also
    tells torch's eps placement from ORT's default HuggingFace mode and eps 1e-6."""
    rng = np.random.default_rng(3)
    x, y = blobs(n=32, features=4, classes=3)
    x[:, 0] *= 1e-6
    w, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    lr, steps = 0.05, 3
    trained, history = finetune(linear_softmax(w, b), x, y, epochs=steps, lr=lr, batch_size=len(x))

    params = [w.astype(np.float64), b.astype(np.float64)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    xd = x.astype(np.float64)
    for t in range(1, steps + 1):
        logits = xd @ params[0].T + params[1]
        assert history[t - 1]["loss"] == pytest.approx(cross_entropy(logits, y), abs=1e-5)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        grads = [p.T @ xd / len(y), p.sum(axis=0) / len(y)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    after = weights(trained)
    np.testing.assert_allclose(after["W"], params[0], atol=1e-6)
    np.testing.assert_allclose(after["b"], params[1], atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y: (x, y + 3), r"labels must lie in \[0, 3\)"),
        (lambda x, y: (x, y - 1), r"labels must lie in \[0, 3\)"),
        (lambda x, y: (x, y.astype(np.float32)), "labels must be a numpy array of integers"),
        (lambda x, y: (x, y[:-1]), "one label per sample"),
        (lambda x, y: (x.astype(np.float64), y), "x must be a numpy array of float32"),
        (lambda x, y: (x[:, :4], y), r"x has shape \(96, 4\)"),
    ],
)
def test_bad_data_is_an_input_error(change, message):
    x, y = change(*blobs())
    with pytest.raises(InputError, match=message):
        finetune(build_mlp((4,), inputs=5, classes=3), x, y, epochs=1)


def test_bad_mask_is_an_input_error():
    x, y = blobs()
    model = build_mlp((4,), inputs=5, classes=3)
    with pytest.raises(InputError, match="boolean array of shape"):
        finetune(model, x, y, epochs=1, masks={"fc1.weight": np.ones((4, 5), dtype=np.float32)})
    with pytest.raises(InputError, match="not a trainable"):
        finetune(model, x, y, epochs=1, masks={"nope": np.ones(3, dtype=bool)})
