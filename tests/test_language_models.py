"""Language models: rows that are tokens (GPT-2's folded Gemms), N:M masks, the guarded compensation,
the reconstruction repair and the defaults for sequence models."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.check.validate import per_sample
from onnxprune.find.layers import analyse_graph
from onnxprune.io.data import Dataset

from tinylm import tokens, two_layers

REAL = Path(__file__).parent / "fixtures" / "real"


def gpt2_tokens(n=6, seq=16, vocab=500, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int64)}


def test_every_block_gemm_of_a_gpt2_export_is_prunable():
    """transformers' Conv1D exports as Gemm on (batch x tokens, features): every block layer is found
    as folded and kept by the per-sample check (it was skipped as 'rows are not samples')."""
    model = onnx.load(REAL / "hf_gpt2_tiny_lm.onnx")
    layers = [layer for layer in analyse_graph(model).layers if ".h." in layer.weight]
    assert len(layers) == 8 and {layer.kind for layer in layers} == {"folded"}
    kept, skipped = per_sample(model, layers, Dataset(gpt2_tokens()))
    assert kept == layers and skipped == []


def test_a_fold_that_is_not_sample_major_is_skipped_with_its_reason():
    """(N, S, F) transposed to (S, N, F) before the Reshape: the rows group by position, not by
    sample, so the per-sample sums would mix samples; the layer is left out and says why."""
    model = two_layers(folded=True)
    graph = model.graph
    fold = next(node for node in graph.node if node.name == "fold1")
    fold.input[0] = "x_t"
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2], name="seq_first"))
    unfold = next(node for node in graph.node if node.name == "unfold1")
    unfold.output[0] = "a1_t"
    seq_h = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "seq_h"))
    graph.initializer.append(numpy_helper.from_array(np.array([seq_h[1], -1, seq_h[2]], np.int64), "seq_first_h"))
    unfold.input[1] = "seq_first_h"
    graph.node.insert(list(graph.node).index(unfold) + 1,
                      helper.make_node("Transpose", ["a1_t"], ["a1"], perm=[1, 0, 2], name="batch_first"))
    onnx.checker.check_model(model)
    layers = analyse_graph(model).layers
    kept, skipped = per_sample(model, layers, Dataset({"x": tokens(4)}))
    assert [layer.name for layer in kept] == ["l2"]
    assert [s.node for s in skipped] == ["l1"] and "not sample by sample" in skipped[0].reason


def _output_error(model, pruned, x):
    from onnxprune import runtime

    dense = runtime.make_session(model).run(None, {"x": x})[0].astype(np.float64)
    after = runtime.make_session(pruned).run(None, {"x": x})[0].astype(np.float64)
    return float(((after - dense) ** 2).reshape(len(x), -1).sum(1).mean())


def test_the_compensation_of_a_key_projection_is_guarded_and_its_weights_are_not_free():
    """A shift of every key is invisible through the softmax, so the key bias's C_i is rounding noise:
    no shift is written for those rows, and removing a key weight scores its uncompensated error,
    which a real removal measures (for small weights the first-order error is the whole error)."""
    from onnxprune import runtime
    from onnxprune.edit.rewrite import rewrite
    from onnxprune.score.context import ScoringContext
    from onnxprune.score.weights import ECP

    from tinylm import attention

    model, x = attention(), tokens(40, seq=5, features=6)
    shifted = onnx.ModelProto()
    shifted.CopyFrom(model)
    bias = next(t for t in shifted.graph.initializer if t.name == "k.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3.0, "k.bias"))
    assert _output_error(model, shifted, x) < 1e-9  # the premise: the key bias is invisible
    layers = analyse_graph(model).layers
    ctx = ScoringContext(model=model, layers=layers, data=Dataset({"x": x}), output="logits")
    saliency = ECP()(ctx)
    key = next(layer for layer in layers if layer.name == "k_proj")
    stats, w = ctx.statistics()[key.name], ctx.weights[key.name]
    assert np.all(stats.C < 1e-10 * stats.C_positions)
    np.testing.assert_array_equal(saliency[key.name].shifts, 0.0)
    np.testing.assert_allclose(saliency[key.name].scores, w * w * stats.A, rtol=1e-12)
    for index in [(0, 1), (3, 4), (5, 0)]:  # a hundredth of the weight removed: the first order is the whole error
        nudged = onnx.ModelProto()
        nudged.CopyFrom(model)
        weight = next(t for t in nudged.graph.initializer if t.name == key.weight)
        stored = numpy_helper.to_array(weight).copy()
        stored[index[::-1]] *= 0.99
        weight.CopyFrom(numpy_helper.from_array(stored, key.weight))
        assert _output_error(model, nudged, x) == pytest.approx(1e-4 * saliency[key.name].scores[index], rel=0.02)
    masks = {layer.name: np.zeros((layer.out_features, layer.in_features), bool) for layer in layers}
    masks[key.name][:, ::2] = True
    _, changes = rewrite(model, layers, masks, {k: s.shifts for k, s in saliency.items()})
    assert changes[[c.layer for c in changes].index(key.name)].max_bias_shift == 0.0
    assert runtime  # the sessions above ran on onnxruntime


def test_no_written_bias_leaves_float16s_range_on_a_gpt2_export(tmp_path):
    """GPT-2's fused q/k/v Gemm: the key rows' C_i is noise; ECP at 50% writes shifts the size of the
    dense biases' scale, not the 1e5 the division by noise gave."""
    import onnxprune

    result = onnxprune.prune(onnx.load(REAL / "hf_gpt2_tiny_lm.onnx"), gpt2_tokens(24), 0.5, probes=4)
    assert len(result.layers) == 9  # the 8 block Gemms and the LM head
    assert max(c.max_bias for c in result.layers) < 1.0
    assert max(c.max_bias_shift for c in result.layers) < 1.0
