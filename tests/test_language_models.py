"""Language models: rows that are tokens (GPT-2's folded Gemms), N:M masks, the guarded compensation,
the reconstruction repair and the defaults for sequence models."""
from pathlib import Path

import numpy as np
import onnx
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
