"""Conv and sequence layers: im2col against onnxruntime, the shared-weight ECP statistics against
finite differences of the definition, and the compensation through every bias form."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import runtime
from onnxprune.derivatives.statistics import LayerStatistics, collect_statistics, layer_patches
from onnxprune.edit.rewrite import rewrite
from onnxprune.find.geometry import conv_geometry, im2col
from onnxprune.find.layers import analyse_graph
from onnxprune.io.data import Dataset
from onnxprune.score.context import ScoringContext
from onnxprune.score.weights import ECP

from tinyconv import cnn, images, sequence_mlp


@pytest.mark.parametrize("attrs,shape,wshape", [
    (dict(pads=[1, 1, 1, 1]), (2, 3, 7, 6), (4, 3, 3, 3)),
    (dict(strides=[2, 1], pads=[1, 0, 2, 1]), (2, 3, 7, 6), (4, 3, 3, 2)),
    (dict(dilations=[2, 2], group=3), (2, 3, 7, 7), (6, 1, 3, 3)),            # depthwise x2
    (dict(group=2, auto_pad="SAME_LOWER", strides=[2, 2]), (1, 4, 6, 5), (6, 2, 2, 3)),
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (1, 2, 5, 5), (3, 2, 3, 3)),
    (dict(strides=[3], dilations=[2], pads=[2, 1]), (3, 2, 11), (4, 2, 3)),   # 1-D
    (dict(auto_pad="VALID"), (1, 2, 4, 4, 3), (2, 2, 2, 2, 2)),               # 3-D
])
def test_im2col_times_the_row_weights_is_onnxruntimes_conv(attrs, shape, wshape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=wshape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expected = runtime.make_session(model).run(None, {"x": x})[0]
    geo = conv_geometry({a.name: helper.get_attribute_value(a) for a in node.attribute}, wshape)
    patches = im2col(x, geo)                                   # (n, groups, J, T)
    rows = w.reshape(wshape[0], -1).astype(np.float64)
    per = wshape[0] // geo.groups
    got = np.concatenate([np.einsum("oj,njt->not", rows[g * per:(g + 1) * per], patches[:, g]) for g in range(geo.groups)], 1)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)


def close(actual, desired):
    """Equal up to float32 finite-difference noise, relative to the largest entry."""
    np.testing.assert_allclose(actual, desired, rtol=2e-3, atol=2e-3 * np.abs(desired).max())


def _as_inputs(model, names):
    """A copy where the initializers ``names`` are graph inputs (to perturb them without rebuilding)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    values = {}
    for t in list(m.graph.initializer):
        if t.name in names:
            values[t.name] = numpy_helper.to_array(t)
            m.graph.initializer.remove(t)
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return runtime.make_session(m), values


def fd_parameter_jacobians(model, weight, bias, x, eps=1e-3):
    """Per-sample dy_k/dW (n, K, *W) and dy_k/db (n, K, out) by central differences in onnxruntime."""
    session, values = _as_inputs(model, {weight, bias})

    def run(**change):
        feeds = {"x": x, **values, **change}
        return session.run(["logits"], feeds)[0].astype(np.float64)

    def grad(name):
        base = values[name]
        out = np.zeros((len(x), run().shape[1]) + base.shape)
        for idx in np.ndindex(*base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            out[(slice(None), slice(None)) + idx] = (run(**{name: up}) - run(**{name: down})) / (2 * eps)
        return out

    return grad(weight), grad(bias)


@pytest.mark.parametrize("kind", ["conv2d", "groups", "conv1d_strided", "sequence"])
def test_exact_shared_statistics_match_finite_differences_of_the_definition(kind):
    """A_ij = E[sum_k (dy_k/dW_ij)^2], B_ij = E[sum_k dy_k/dW_ij dy_k/db_i], C_i = E[sum_k (dy_k/db_i)^2]."""
    if kind == "sequence":
        model, x = sequence_mlp(), np.random.default_rng(2).normal(size=(9, 4, 5)).astype(np.float32)
        weight, bias = "l1.weight", "l1.bias"
    else:
        spec = {"conv2d": {}, "groups": dict(groups=2), "conv1d_strided": dict(spatial=1, stride=2, dilation=2, size=11)}[kind]
        model, x = cnn(**spec), images(9, spatial=spec.get("spatial", 2), size=spec.get("size", 6))["x"]
        weight, bias = "conv1.weight", "conv1.bias"
    layers = analyse_graph(model).layers
    layer = next(lay for lay in layers if lay.weight == weight)
    assert layer.shared
    stats = collect_statistics(model, layers, Dataset({"x": x}), "logits", batch_size=4)[layer.name]
    dw, db = fd_parameter_jacobians(model, weight, bias, x)
    n, k = dw.shape[:2]
    if layer.op == "MatMul":
        dw = np.swapaxes(dw, 2, 3)  # stored (in, out) -> rows (out, in)
    dw = dw.reshape(n, k, layer.out_features, layer.in_features)
    close(stats.C, np.einsum("sko,sko->o", db, db) / n)
    close(stats.B, np.einsum("skoj,sko->oj", dw, db) / n)
    close(stats.A, np.einsum("skoj,skoj->oj", dw, dw) / n)


def fd_position_derivatives(model, layer, x, eps=1e-3):
    """Per-position derivatives g (n, K, out, T) of the logits at ``layer``'s pre-activation, by
    central differences of the tail (pre-activation -> logits) in onnxruntime."""
    inferred = onnx.shape_inference.infer_shapes(model)
    tail = runtime.make_session(onnx.utils.Extractor(inferred).extract_model([layer.preact], ["logits"]))
    (pre,) = runtime.run_tensors(model, {"x": x}, [layer.preact])
    g = np.zeros((len(x), 3) + pre.shape[1:])
    for idx in np.ndindex(*pre.shape[1:]):
        up, down = pre.copy(), pre.copy()
        up[(slice(None),) + idx] += eps
        down[(slice(None),) + idx] -= eps
        diff = tail.run(None, {layer.preact: up})[0] - tail.run(None, {layer.preact: down})[0]
        g[(slice(None), slice(None)) + idx] = diff / (2 * eps)
    return g.reshape(len(x), 3, layer.out_features, -1)


@pytest.mark.parametrize("shared", ["exact", "positions"])
def test_conv_rows_reach_the_output_and_ecp_scores_their_weights(shared):
    """C_positions = E[sum_t sum_k g_kti^2] for a Conv too: it tells ECP that a row reaches the
    output. Left at 0, every Conv weight scored 0 and a global ranking pruned Conv layers first."""
    model, x = cnn(), images(7)["x"]
    layers = analyse_graph(model).layers
    layer = layers[0]
    assert layer.op == "Conv"
    ctx = ScoringContext(model=model, layers=layers, data=Dataset({"x": x}), output="logits", conv_statistics=shared)
    stats = ctx.statistics()[layer.name]
    g = fd_position_derivatives(model, layer, x)
    close(stats.C_positions, np.einsum("skot,skot->o", g, g) / len(x))
    w = ctx.weights[layer.name]
    residual = np.maximum(stats.A - stats.B ** 2 / stats.C[:, None], 0.0)
    scores = ECP()(ctx)[layer.name].scores
    np.testing.assert_allclose(scores, w * w * residual, rtol=1e-9, atol=0)
    assert (scores > 0).mean() > 0.9


def test_positions_statistics_drop_exactly_the_cross_position_terms():
    model, x = cnn(), images(7)["x"]
    layers = analyse_graph(model).layers
    layer = layers[0]
    approx = collect_statistics(model, layers, Dataset({"x": x}), "logits", shared="positions")[layer.name]
    g = fd_position_derivatives(model, layer, x)
    big_g = np.einsum("skot,skot->sot", g, g)
    z = layer_patches(layer, x)[:, 0]                          # (n, J, T), one group
    close(approx.C, big_g.sum((0, 2)) / len(x))
    close(approx.B, np.einsum("sot,sjt->oj", big_g, z) / len(x))
    close(approx.A, np.einsum("sot,sjt->oj", big_g, z * z) / len(x))
    np.testing.assert_allclose(approx.mean_z, z.mean((0, 2)), rtol=1e-5, atol=1e-6)


def _prune_one(model, data, layer_name, index):
    """Prune exactly one weight with ECP compensation; return the model, its predicted and measured error."""
    found = analyse_graph(model)
    ds = Dataset({"x": data})
    ctx = ScoringContext(model=model, layers=found.layers, data=ds, output="logits")
    sal = ECP()(ctx)
    masks = {lay.name: np.zeros((lay.out_features, lay.in_features), bool) for lay in found.layers}
    masks[layer_name][index] = True
    pruned, changes = rewrite(model, found.layers, masks, {k: s.shifts for k, s in sal.items()})
    onnx.checker.check_model(pruned, full_check=True)
    dense = runtime.make_session(model).run(None, {"x": data})[0].astype(np.float64)
    after = runtime.make_session(pruned).run(None, {"x": data})[0].astype(np.float64)
    return pruned, changes, sal[layer_name].scores[index], np.mean(((after - dense) ** 2).sum(1))


@pytest.mark.parametrize("bias", ["input", "add", "none", "batchnorm"])
def test_compensation_is_exact_through_every_bias_form_when_the_tail_is_linear(bias):
    """With no activation the output is linear in the Conv's output: the error left after pruning one
    weight and shifting the bias equals ECP's score, whichever tensor holds that bias."""
    model = cnn(bias="none" if bias == "batchnorm" else bias, batchnorm=bias == "batchnorm", activation=None)
    data = images(20)["x"]
    layer = analyse_graph(model).layers[0]
    expected_bias = {"input": "conv1.bias", "add": "conv1.add_bias", "none": None, "batchnorm": "bn.bias"}[bias]
    assert layer.bias == expected_bias
    pruned, changes, predicted, measured = _prune_one(model, data, layer.name, (1, 5))
    assert changes[0].bias_inserted == (bias == "none")
    assert measured == pytest.approx(predicted, rel=1e-3, abs=1e-9)
    one_weight = {lay.name: np.eye(1, lay.size, 1 * lay.in_features + 5, dtype=bool).reshape(lay.out_features, lay.in_features)
                  if lay.name == layer.name else np.zeros((lay.out_features, lay.in_features), bool)
                  for lay in analyse_graph(model).layers}
    plain = rewrite(model, analyse_graph(model).layers, one_weight)[0]
    dense = runtime.make_session(model).run(None, {"x": data})[0]
    uncompensated = np.mean(((runtime.make_session(plain).run(None, {"x": data})[0] - dense) ** 2).sum(1))
    assert measured < uncompensated
    if bias == "add":  # the (1, C, 1, 1) bias keeps its shape
        shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
        assert shapes["conv1.add_bias"] == [1, 4, 1, 1]


@pytest.mark.parametrize("spec", [dict(), dict(groups=2, pool=True), dict(spatial=1, size=9), dict(bias="none", batchnorm=True)])
@pytest.mark.parametrize("statistics", ["exact", "positions"])
def test_conv_models_prune_end_to_end(spec, statistics):
    model = cnn(**spec)
    arrays = images(16, spatial=spec.get("spatial", 2), size=spec.get("size", 6))
    zero = onnxprune.prune(model, arrays, 0.0, conv_statistics=statistics)
    x = {"x": arrays["x"]}
    np.testing.assert_array_equal(runtime.make_session(zero.model).run(None, x)[0], runtime.make_session(model).run(None, x)[0])
    result = onnxprune.prune(model, arrays, 0.5, conv_statistics=statistics)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.pruned == round(0.5 * result.weights)
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in model.graph.initializer]


@pytest.mark.parametrize("method", ["variance", "gradmag", "magnitude", "random"])
def test_other_methods_score_conv_and_sequence_layers(method):
    for model, arrays in ((cnn(groups=2), images(16)),
                          (sequence_mlp(bias_left=True),
                           {"x": np.random.default_rng(0).normal(size=(16, 4, 5)).astype(np.float32), "y": np.arange(16) % 3})):
        result = onnxprune.prune(model, arrays, 0.5, method=method)
        onnx.checker.check_model(result.model)
        assert result.pruned == round(0.5 * result.weights)


@pytest.mark.parametrize("chunk", [7, 300, 1 << 22])  # blocks of one row, probe and sample; a few rows; one block
@pytest.mark.parametrize("exact", [True, False])
def test_shared_sums_in_blocks_equal_the_definition(monkeypatch, chunk, exact):
    """accumulate_shared takes its sums in blocks of samples, probes and rows bounded by CHUNK_ELEMENTS
    (one sample of a 512-channel Conv with 32 probes once made 600 MB temporaries); any blocking gives
    the sums of the definition (numpy einsum, float64)."""
    from types import SimpleNamespace

    from onnxprune.derivatives import shared as conv

    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(0)
    n, r, out, positions, groups, width = 3, 5, 6, 10, 2, 4
    g = rng.standard_normal((n, r, out, positions)).astype(np.float32)
    patches = rng.standard_normal((n, groups, width, positions))
    sums = SimpleNamespace(sum_g=np.zeros(out), sum_gz=np.zeros((out, width)), sum_gz2=np.zeros((out, width)))
    conv.accumulate_shared(sums, g, patches, 0.5, exact)
    per = out // groups
    z = np.repeat(patches, per, axis=1)                                   # (n, out, J, T): row i's group
    g64 = g.astype(np.float64)
    if exact:
        u, v = np.einsum("nrot,nojt->nroj", g64, z), g64.sum(-1)
        want = (np.einsum("nro,nro->o", v, v), np.einsum("nroj,nro->oj", u, v), np.einsum("nroj,nroj->oj", u, u))
    else:
        big = (g64 * g64).sum(1)                                          # (n, out, T)
        want = (big.sum((0, 2)), np.einsum("not,nojt->oj", big, z), np.einsum("not,nojt->oj", big, z * z))
    for got, expected in zip((sums.sum_g, sums.sum_gz, sums.sum_gz2), want):
        np.testing.assert_allclose(got, 0.5 * expected, rtol=1e-10, atol=1e-10)


def test_float32_shared_sums_keep_the_residual_of_raw_pixels():
    """The float32 products run on patches shifted by their mean, so the ECP residual A - B^2/C (a
    G-weighted variance) of raw pixels (120 +- 60, zero padding around) is what float64 inputs give,
    where every product is float64."""
    model = cnn()
    x = (120.0 + 60.0 * images(9)["x"]).astype(np.float32)
    layers = analyse_graph(model).layers
    single = collect_statistics(model, layers, Dataset({"x": x}), "logits", batch_size=4)
    double = {layer.name: LayerStatistics.zeros(layer) for layer in layers}
    from onnxprune.derivatives.engines import output_jacobians

    jac = output_jacobians(model, layers, "logits", 3)
    squares, inputs = jac.squares({"x": x}, (3,))
    for layer in layers:
        if layer.shared:
            double[layer.name].add_shared(layer, squares[layer.name].astype(np.float64),
                                          np.asarray(inputs[layer.name], np.float64))
        else:
            double[layer.name].add(squares[layer.name].astype(np.float64), np.asarray(inputs[layer.name], np.float64))
    for layer in layers:
        s, d = single[layer.name], double[layer.name]
        live = d.C > 0  # rows whose unit is never active have no residual to compare
        assert live.any()
        residual = d.A[live] - d.B[live] ** 2 / d.C[live, None]
        got = s.A[live] - s.B[live] ** 2 / s.C[live, None]
        np.testing.assert_allclose(got, residual, rtol=1e-4, atol=1e-7 * np.abs(residual).max())


def test_conv_statistics_are_the_same_bytes_for_any_thread_count():
    model, x = cnn(channels=3), images(10, channels=3)["x"]
    layers = analyse_graph(model).layers
    one, three = (collect_statistics(model, layers, Dataset({"x": x}), "logits", batch_size=4, threads=t) for t in (1, 3))
    for name in one:
        for field in ("sum_g", "sum_gz", "sum_gz2", "sum_z", "sum_z2"):
            assert getattr(one[name], field).tobytes() == getattr(three[name], field).tobytes(), (name, field)
