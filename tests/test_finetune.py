"""finetune on both engines: training lowers the loss, masks hold, stamping survives, Adam matches
torch's update, the adjoint gradient matches float64 finite differences, the engines agree."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxprune.derivatives.engines.base import candidates
from onnxprune.errors import InputError, RuntimeUnavailable
from onnxprune.find.layers import analyse_graph
from onnxprune.repair.finetune import choose_engine, finetune, trainable_names
from onnxprune.repair.trainers import AdjointLoss
from onnxprune.runtime import make_session

import tinyconv
from engines import requires_training
from studies.zoo import build_mlp

ENGINES = ["adjoint", pytest.param("ort-training", marks=requires_training)]
engines = pytest.mark.parametrize("engine", ENGINES)


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
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["prob"], axis=1)],
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


@engines
def test_training_lowers_the_loss_quietly(capfd, engine):
    x, y = blobs()
    calls = []
    model = build_mlp((8,), inputs=5, classes=3)
    trained, history = finetune(model, x, y, epochs=5, lr=1e-2, batch_size=16, engine=engine, progress=lambda *a: calls.append(a))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert len(calls) == 5 * 6 and calls[-1][:3] == (5, 6, 6)
    assert capfd.readouterr() == ("", "")  # generate_artifacts' INFO lines are silenced; onnx-ad prints nothing
    logits = make_session(trained).run(None, {"x": x})[0]
    assert cross_entropy(logits.astype(np.float64), y) < cross_entropy(make_session(model).run(None, {"x": x})[0], y)


@engines
def test_masks_keep_pruned_weights_zero_and_stamping_survives(engine):
    x, y = blobs()
    model = build_mlp((8, 8), inputs=5, classes=3)
    model.ir_version, model.opset_import[0].version = 11, 23  # above what the runtime accepts
    onnx.helper.set_model_props(model, {"onnxprune.dataset": "blobs"})
    rng = np.random.default_rng(1)
    masks = {name: rng.random(w.shape) > 0.5 for name, w in weights(model).items() if name.startswith("fc") and w.ndim == 2}

    trained, _ = finetune(model, x, y, epochs=3, lr=1e-2, batch_size=16, masks=masks, engine=engine)
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


@engines
def test_the_forward_pass_sees_masked_weights_during_training(engine):
    """With one full batch per epoch, epoch 2's loss is the loss of the model after one step, masked."""
    x, y = blobs()
    model = build_mlp((8,), inputs=5, classes=3)
    masks = {"fc1.weight": np.random.default_rng(2).random((8, 5)) > 0.5}
    _, history = finetune(model, x, y, epochs=2, lr=1e-2, batch_size=len(x), masks=masks, engine=engine)
    one_step, _ = finetune(model, x, y, epochs=1, lr=1e-2, batch_size=len(x), masks=masks, engine=engine)
    logits = make_session(one_step).run(None, {"x": x})[0].astype(np.float64)
    assert history[1]["loss"] == pytest.approx(cross_entropy(logits, y), abs=1e-5)


@engines
def test_same_seed_same_weights_other_seed_other_weights(engine):
    x, y = blobs()
    model = build_mlp((8,), inputs=5, classes=3)

    def run(seed):
        return weights(finetune(model, x, y, epochs=2, batch_size=16, seed=seed, engine=engine)[0])

    first, again, other = run(0), run(0), run(1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


@engines
def test_adam_steps_match_a_numpy_reference(engine):
    """Three full-batch steps against torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no decay),
    written out in numpy; the Softmax output also checks that the loss is put on the logits.
    Feature 0 is tiny so that its weights' gradients (~1e-7) are near eps: the check then also
    tells torch's eps placement from ORT's default HuggingFace mode and eps 1e-6."""
    rng = np.random.default_rng(3)
    x, y = blobs(n=32, features=4, classes=3)
    x[:, 0] *= 1e-6
    w, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    lr, steps = 0.05, 3
    trained, history = finetune(linear_softmax(w, b), x, y, epochs=steps, lr=lr, batch_size=len(x), engine=engine)

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


def float64_loss(model, x, y):
    """The mean cross-entropy of ``model`` as a function of its initializers, in float64 by onnx's
    reference evaluator: independent of onnxruntime and of onnx-ad."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    lifted = [numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer]
    graph.input.extend(helper.make_tensor_value_info(t.name, TensorProto.DOUBLE, list(t.dims)) for t in graph.initializer)
    del graph.initializer[:]
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    evaluator, x64 = ReferenceEvaluator(copy), x.astype(np.float64)
    base = {t.name: a for t, a in zip(model.graph.initializer, lifted)}
    return lambda weights: cross_entropy(evaluator.run(None, {"x": x64, **base, **weights})[0], y), base


@pytest.mark.parametrize("make, x", [
    (lambda: build_mlp((6,), inputs=5, classes=3), blobs(n=24)[0]),
    (lambda: tinyconv.cnn(batchnorm=True, bias="none"), np.random.default_rng(4).normal(size=(24, 2, 6, 6)).astype(np.float32)),
    # onnx's reference MaxPool is a Python loop: fewer samples
    (lambda: tinyconv.cnn(activation="HardSwish", pool=True),
     np.random.default_rng(4).normal(size=(6, 2, 6, 6)).astype(np.float32)),
    (lambda: tinyconv.cnn(groups=2, pool=True, opset=11), np.random.default_rng(4).normal(size=(6, 2, 6, 6)).astype(np.float32)),
], ids=["mlp-prelu", "conv-bn", "conv-hardswish-maxpool", "grouped-conv-maxpool-opset11"])
def test_adjoint_gradient_matches_float64_central_differences(make, x):
    """d(mean cross-entropy)/d(weight) of the onnx-ad graph against central differences of a float64 copy,
    on a batch smaller than the graph's (so the zero-target padding is exercised too)."""
    model, y = make(), np.random.default_rng(5).integers(0, 3, len(x))
    trainable = trainable_names(model)
    assert len(trainable) >= 5
    loss, base = float64_loss(model, x, y)
    weights = {name: base[name].astype(np.float32) for name in trainable}
    value, gradients = AdjointLoss(model, trainable, len(x) + 5, x.shape[1:], 3)(x, y, weights)
    assert value == pytest.approx(loss({}), rel=1e-6)
    rng, h = np.random.default_rng(6), 1e-6
    for name in trainable:
        for index in map(tuple, rng.integers(0, base[name].shape, size=(min(6, base[name].size), base[name].ndim))):
            plus, minus = base[name].copy(), base[name].copy()
            plus[index] += h
            minus[index] -= h
            expected = (loss({name: plus}) - loss({name: minus})) / (2 * h)
            assert gradients[name][index] == pytest.approx(expected, rel=1e-4, abs=1e-6), (name, index)


@requires_training
@pytest.mark.parametrize("model, x", [
    (build_mlp((8, 8), inputs=5, classes=3), blobs()[0]),
    (tinyconv.cnn(), np.random.default_rng(7).normal(size=(40, 2, 6, 6)).astype(np.float32)),
    (tinyconv.cnn(groups=2, pool=True), np.random.default_rng(7).normal(size=(40, 2, 6, 6)).astype(np.float32)),
], ids=["mlp-prelu", "conv", "grouped-conv-maxpool"])
def test_the_two_engines_train_the_same_way(model, x):
    """Same seed, same masks: the same loss history and weights within float32 rounding (a model without
    BatchNormalization: onnxruntime-training trains that in training mode, on batch statistics)."""
    y = np.random.default_rng(8).integers(0, 3, len(x))
    rng = np.random.default_rng(9)
    masks = {name: rng.random(w.shape) > 0.5 for name, w in weights(model).items() if w.ndim >= 2}
    runs = {engine: finetune(model, x, y, epochs=3, lr=1e-2, batch_size=16, masks=masks, engine=engine)
            for engine in ("adjoint", "ort-training")}
    (adjoint, adjoint_history), (training, training_history) = runs["adjoint"], runs["ort-training"]
    np.testing.assert_allclose([h["loss"] for h in adjoint_history], [h["loss"] for h in training_history], rtol=1e-5)
    a, t = weights(adjoint), weights(training)
    for name in a:
        np.testing.assert_allclose(a[name], t[name], atol=1e-5)
        if name in masks:
            assert np.all(a[name][~masks[name]] == 0) and np.all(t[name][~masks[name]] == 0)


def test_auto_takes_the_training_build_when_installed_and_the_adjoint_engine_otherwise(monkeypatch):
    assert choose_engine("adjoint") == {"name": "adjoint", "reason": "requested (--engine adjoint)"}
    with pytest.raises(InputError, match="unknown engine 'torch'"):
        choose_engine("torch")

    base = importlib.import_module("onnxprune.derivatives.engines.base")
    monkeypatch.setattr(base, "training_build", lambda: False)
    assert choose_engine("auto") == {"name": "adjoint", "reason": candidates("auto")[0].reason}
    with pytest.raises(RuntimeUnavailable, match="needs the onnxruntime training build"):
        choose_engine("ort-training")
    x, y = blobs()
    trained, history = finetune(build_mlp((4,), inputs=5, classes=3), x, y, epochs=1)  # auto runs without the training build
    assert len(history) == 1 and weights(trained)["fc1.weight"].shape == (4, 5)
    monkeypatch.setattr(base, "training_build", lambda: True)
    assert choose_engine("auto")["name"] == "ort-training"


def test_an_op_without_a_reverse_rule_is_an_input_error_naming_it():
    """Training-mode Dropout has no rule in onnx-ad: an InputError that names the op and says why."""
    x, y = blobs()
    model = build_mlp((4,), inputs=5, classes=3)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                              numpy_helper.from_array(np.array(True), "training")])
    graph.node[0].output[0] = "fc1.raw"
    graph.node.insert(1, helper.make_node("Dropout", ["fc1.raw", "ratio", "training"], ["fc1.out"], name="drop"))
    with pytest.raises(InputError, match="onnx-ad cannot differentiate this model: Dropout with training_mode"):
        finetune(model, x, y, epochs=1, engine="adjoint")


@requires_training
def test_a_model_onnxruntime_training_cannot_differentiate_trains_on_the_adjoint_engine():
    model = tinyconv.cnn(activation="HardSwish", pool=True)
    x = np.random.default_rng(10).normal(size=(40, 2, 6, 6)).astype(np.float32)
    y = np.random.default_rng(11).integers(0, 3, len(x))
    with pytest.raises(InputError, match="no.*registered: HardSwish for node act1 .try the adjoint engine: --engine adjoint"):
        finetune(model, x, y, epochs=1, engine="ort-training")
    _, history = finetune(model, x, y, epochs=4, lr=1e-2, batch_size=8, engine="adjoint")
    assert history[-1]["loss"] < history[0]["loss"]


FIXTURES = Path(__file__).parent / "fixtures"


@engines
@pytest.mark.parametrize("name", ["handmade_tf2onnx_style", "skl2onnx_mlp_zipmap", "torch_dynamo_cnn", "torch_dynamo_seq",
                                  "torch_legacy_cnn", "torch_legacy_opset9", "torch_legacy_seq", "torch_legacy_two_outputs"])
def test_the_float_classifiers_of_the_test_corpus_fine_tune(name, engine):
    """Exports of torch (legacy, dynamo, opset 9; depthwise Conv, MaxPool, BatchNormalization), skl2onnx
    and tf2onnx: training lowers the loss, zeros stay zero, the written model checks and runs."""
    model = onnx.load(FIXTURES / f"{name}.onnx")
    initializers = {t.name for t in model.graph.initializer}
    (value,) = [i for i in model.graph.input if i.name not in initializers]
    shape = [d.dim_value or 4 for d in value.type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(12).normal(size=[24, *shape]).astype(np.float32)
    y = np.zeros(len(x), np.int64)
    rng, before, copy = np.random.default_rng(13), weights(model), onnx.ModelProto()
    copy.CopyFrom(model)  # analyse_graph names unnamed nodes
    masks = {layer.weight: rng.random(before[layer.weight].shape) > 0.3 for layer in analyse_graph(copy).layers}
    assert masks
    trained, history = finetune(model, x, y, epochs=3, lr=1e-2, batch_size=10, masks=masks, engine=engine)
    assert history[-1]["loss"] < history[0]["loss"]
    onnx.checker.check_model(trained)
    assert trained.opset_import == model.opset_import and trained.graph.node == model.graph.node
    after = weights(trained)
    assert all(np.all(after[name][~mask] == 0) for name, mask in masks.items())
    make_session(trained).run(None, {value.name: x})
