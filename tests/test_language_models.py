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

    result = onnxprune.prune(onnx.load(REAL / "hf_gpt2_tiny_lm.onnx"), gpt2_tokens(24), 0.5, probes=4,
                             conv_statistics="exact", refit=False, error_at="output")  # the shifts ECP itself writes
    assert len(result.layers) == 9  # the 8 block Gemms and the LM head
    assert max(c.max_bias for c in result.layers) < 1.0
    assert max(c.max_bias_shift for c in result.layers) < 1.0


def _zeros_per_group(rows: np.ndarray, m: int, order=None) -> np.ndarray:
    """Zeros in every group of m consecutive inputs of each row (in ``order``), (out, groups)."""
    rows = rows if order is None else rows[:, order]
    return (rows == 0).reshape(len(rows), -1, m).sum(-1)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_n_m_masks_prune_the_lowest_scores_of_every_group_exactly(n, m):
    """The mask against a plain loop over every row and group: the M - N lowest scores of each group
    of M consecutive inputs, ties to the lower index."""
    from onnxprune.select.masks import choose_masks

    layers = analyse_graph(two_layers(folded=True, features=8, hidden=16)).layers
    rng = np.random.default_rng(3)
    scores = {layer.name: rng.integers(0, 5, size=(layer.out_features, layer.in_features)).astype(float)
              for layer in layers}
    masks = choose_masks(layers, scores, (m - n) / m, pattern=(n, m))
    for layer in layers:
        want = np.zeros_like(masks[layer.name])
        for i, row in enumerate(scores[layer.name]):
            for start in range(0, layer.in_features, m):
                group = row[start:start + m]
                lowest = sorted(range(m), key=lambda j: (group[j], j))[:m - n]
                want[i, [start + j for j in lowest]] = True
        np.testing.assert_array_equal(masks[layer.name], want)


def test_a_convs_n_m_groups_run_along_its_input_channels():
    """At each kernel position, M consecutive input channels form a group (the (C, kh, kw) row
    read channel by channel), and a layer whose channels do not split into groups is refused."""
    from onnxprune.errors import InputError
    from onnxprune.select.masks import choose_masks

    from tinyconv import cnn

    layer = analyse_graph(cnn()).layers[0]  # 2 input channels, 3x3 kernels
    scores = np.random.default_rng(0).normal(size=(layer.out_features, layer.in_features))
    mask = choose_masks([layer], {layer.name: scores}, 0.5, pattern=(1, 2))[layer.name]
    by_channel = mask.reshape(layer.out_features, 2, -1)       # (out, channel, kernel position)
    np.testing.assert_array_equal(by_channel.sum(1), 1)        # one of the two channels, everywhere
    lower = scores.reshape(layer.out_features, 2, -1).argmin(1)
    np.testing.assert_array_equal(by_channel[:, 1], lower == 1)
    with pytest.raises(InputError, match="not a multiple of 4"):
        choose_masks([layer], {layer.name: scores}, 0.5, pattern=(2, 4))


def _mlp_model_and_data():
    from tinynets import data, mlp

    model, _, _ = mlp((8, 16, 8, 4), pattern="gemm_t", seed=2)
    return model, data(96, d=8, seed=4)


@pytest.mark.parametrize("repair", ["none", "refit", "ecp-refit", "block", "finetune"])
def test_a_2_4_pattern_is_exact_per_group_and_every_repair_keeps_it(repair):
    """2:4 with ECP, then each repair (the least-squares refit, the ecp-refit preset's steps + refit
    + distillation, the block Gauss-Newton refit, fine-tuning the written model): every group of 4
    consecutive inputs of every row still holds exactly 2 zeros."""
    import onnxprune
    from onnxprune.repair.blockrefit import BlockRefit
    from onnxprune.repair.finetune import finetune, zero_masks

    model, arrays = _mlp_model_and_data()
    options = {"none": {}, "refit": {"refit": True}, "ecp-refit": {"method": "ecp-refit"}, "block": {"repair": BlockRefit()},
               "finetune": {}}[repair]
    result = onnxprune.prune(model, arrays, 0.5, pattern="2:4", **options)
    pruned = result.model
    if repair == "finetune":
        pruned = finetune(pruned, arrays["x"], arrays["y"], masks=zero_masks(pruned), epochs=2)[0]
    assert result.summary["pattern"] == "2:4" and result.sparsity == 0.5
    for layer in analyse_graph(pruned).layers:
        rows = layer.to_rows(numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == layer.weight)))
        np.testing.assert_array_equal(_zeros_per_group(rows, 4), 2, err_msg=f"{repair}: {layer.name}")


def _cli(*args):
    from click.testing import CliRunner

    from onnxprune.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_cli_prunes_a_gpt2_export_2_4_and_inspect_shows_the_pattern(tmp_path):
    np.savez(tmp_path / "calib.npz", **gpt2_tokens(12))
    out = tmp_path / "gpt2_2_4.onnx"
    res = _cli("prune", REAL / "hf_gpt2_tiny_lm.onnx", out, "--data", tmp_path / "calib.npz", "--pattern", "2:4",
               "--json", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    assert "pattern 2:4: at most 2 nonzero weights in every 4 consecutive inputs of each row" in res.output
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["weights"]["pattern"] == "2:4" and report["weights"]["sparsity"] == 0.5
    res = _cli("inspect", out, "--json", tmp_path / "inspect.json")
    assert res.exit_code == 0, res.output
    layers = json.loads((tmp_path / "inspect.json").read_text())["layers"]
    assert len(layers) == 9 and {layer["pattern"] for layer in layers} == {"2:4"}
    assert "pattern" in res.output.splitlines()[1]
    res = _cli("inspect", REAL / "hf_gpt2_tiny_lm.onnx")  # the dense model: no pattern column
    assert res.exit_code == 0 and "pattern" not in res.output.splitlines()[1]


@pytest.mark.parametrize("args,message", [
    (["--pattern", "2:4", "--sparsity", "0.3"], "drop --sparsity 0.3"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "two:four"], "must be N:M"),
    (["--pattern", "2:4", "--structured"], "does not apply to --structured"),
    (["--pattern", "1:3"], "8 inputs, not a multiple of 3: the pattern 1:3 needs groups of 3; leave it out with --exclude fc0"),
])
def test_a_pattern_that_cannot_apply_is_a_one_line_error(tmp_path, args, message):
    model, arrays = _mlp_model_and_data()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)
    res = _cli("prune", tmp_path / "m.onnx", tmp_path / "out.onnx", "--data", tmp_path / "calib.npz", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_a_fold_of_a_tensor_whose_dimensions_inference_cannot_tell_is_measured_and_pruned():
    """Legacy exports compute the Reshape's target from Shape ops: the dimensions of what it folds are
    measured on the calibration data (in the analysis copy only), and the layer is pruned as folded."""
    from onnxprune.graph.index import GraphIndex
    from onnxprune.pipeline import Pruner

    model = two_layers(folded=True, computed=True)
    assert GraphIndex(model).dims["x_in"] == (None, None, None)
    assert analyse_graph(model).by_name()["l1"].kind == "dense"  # what the graph alone tells
    pruner = Pruner("ecp").fit(model, {"x": tokens(16)})
    assert [(layer.name, layer.kind) for layer in pruner.layers_] == [("l1", "folded"), ("l2", "folded")]
    result = pruner.prune(0.5)
    assert result.pruned == result.weights // 2 and not result.model.graph.value_info


def test_the_reconstruction_refit_of_a_folded_layer_is_numpys_least_squares_over_its_tokens():
    """The repair for language models re-solves each row's surviving weights and bias so the layer
    reproduces the dense pre-activations of every token: numpy's ridge solution over the token rows
    of the fit samples (every fifth sample, all its tokens, held out)."""
    from onnxprune import runtime
    from onnxprune.repair.refit import refit

    from test_refit import ridge

    dense = two_layers(folded=True, features=6, hidden=8)
    current = onnx.ModelProto()
    current.CopyFrom(dense)
    w = next(t for t in current.graph.initializer if t.name == "w1")
    pruned = numpy_helper.to_array(w).copy()
    pruned[np.random.default_rng(1).random(pruned.shape) < 0.5] = 0
    w.CopyFrom(numpy_helper.from_array(pruned, "w1"))
    x = tokens(30)
    layers = [layer for layer in analyse_graph(current).layers if layer.name == "l1"]
    assert layers[0].kind == "folded"
    new, reports = refit(dense, current, layers, Dataset({"x": x}), "logits", batch_size=7)
    target = runtime.run_tensors(dense, {"x": x}, ["a1_rows"])[0].astype(np.float64)
    got = runtime.run_tensors(new, {"x": x}, ["a1_rows"])[0].astype(np.float64)
    z = x.reshape(-1, 6).astype(np.float64)
    for i in range(8):
        cols = np.flatnonzero(pruned[i])
        theta = ridge(z, cols, target[:, i], reports[0].damping, per_sample=4)
        np.testing.assert_allclose(got[:, i], z[:, cols] @ theta[:-1] + theta[-1], rtol=1e-3, atol=1e-4)
    assert np.all(numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "w1"))[pruned == 0] == 0)


def test_a_gpt2_export_pruned_from_the_cli_with_default_options_gets_the_sequence_defaults(tmp_path):
    """Only --sparsity given: the model is a transformer, so every block layer loses the same fraction
    and the chained refit runs; the report says which defaults applied, and an option given wins."""
    import json

    np.savez(tmp_path / "calib.npz", **gpt2_tokens(16))
    out = tmp_path / "gpt2_50.onnx"
    res = _cli("prune", REAL / "hf_gpt2_tiny_lm.onnx", out, "--data", tmp_path / "calib.npz", "--sparsity", "0.5",
               "--json", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    assert ("defaults for a sequence model (token-wise layers hold 100% of the prunable weights): --scope layer, "
            "--refit, --error-at layer") in res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scope"] == "layer" and report["repair"] == "refit" and report["defaults"]["model"] == "sequence"
    assert {round(layer["pruned"] / layer["weights"], 3) for layer in report["weights"]["layers"]} == {0.5}
    assert len(report["refits"]) == 9
    res = _cli("prune", REAL / "hf_gpt2_tiny_lm.onnx", out, "--data", tmp_path / "calib.npz", "--sparsity", "0.5",
               "--scope", "global", "--no-refit", "--force", "--json", tmp_path / "given.json")
    assert res.exit_code == 0, res.output
    given = json.loads((tmp_path / "given.json").read_text())
    assert given["scope"] == "global" and given["repair"] == "none"
    assert given["defaults"]["applied"] == {"error_at": "layer"} and given["engine"]["name"] is None


def _rope_variant(change):
    """The llama block with its q rotary changed by ``change(graph)`` (to make it mix heads)."""
    from tinylm import llama_block

    model = llama_block()
    change(model.graph)
    return model


def test_the_rotary_embedding_is_passed_through_by_a_head_walk_and_commutes_with_removing_heads():
    """From q's and k's (N, H, S, D) head split the rotary's Slice/Neg/Concat/Mul/Add act within each
    head alike, so the walk reaches the tensor the scores' MatMul reads; removing a head before the
    rotary gives the same values as removing it after (onnxruntime on the extracted piece)."""
    from onnxprune import runtime
    from onnxprune.find.rotary import head_passthrough
    from onnxprune.graph.index import GraphIndex

    from tinylm import llama_block

    model = llama_block()
    g = GraphIndex(model)
    assert head_passthrough(g, "q.t", 1) == "q.rope" and head_passthrough(g, "k.t", 1) == "k.rope"
    assert head_passthrough(g, "v.t", 1) == "v.t"       # no rotary on the values: the tensor itself
    piece = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["q.t"], ["q.rope"])
    for vi in [*piece.graph.input, *piece.graph.output, *piece.graph.value_info]:
        vi.type.tensor_type.ClearField("shape")  # any number of heads
    session = runtime.make_session(piece)
    t = np.random.default_rng(0).normal(size=(3, 2, 6, 4)).astype(np.float32)
    kept = [1]
    np.testing.assert_allclose(session.run(None, {"q.t": t[:, kept]})[0], session.run(None, {"q.t": t})[0][:, kept],
                               rtol=1e-6, atol=1e-6)


def test_a_head_walk_stops_where_an_op_mixes_the_heads():
    from onnxprune.find.rotary import head_passthrough
    from onnxprune.graph.index import GraphIndex

    def per_head_cos(graph):  # cos differs between the two heads: (H, S, D)
        cos = next(t for t in graph.initializer if t.name == "rope.cos")
        value = numpy_helper.to_array(cos)
        cos.CopyFrom(numpy_helper.from_array(np.stack([value, 2 * value]), "rope.cos"))

    def slice_heads(graph):  # the first half of q's rotary slices the head axis instead
        axis = next(t for t in graph.initializer if t.name == "last_axis")
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "head_axis"))
        node = next(n for n in graph.node if n.name == "q.rope.first")
        node.input[3] = "head_axis"
        assert axis is not None

    for change in (per_head_cos, slice_heads):
        g = GraphIndex(_rope_variant(change))
        assert head_passthrough(g, "q.t", 1) is None, change.__name__
        assert head_passthrough(g, "v.t", 1) == "v.t"


def test_ecp_with_its_error_at_each_layers_output_is_the_layers_reconstruction_error_without_derivatives():
    """G = 1: every weight scored by the error it leaves at its own layer's output after the mean shift
    of its bias, W^2 Var(z) over samples and tokens (numpy), with no derivative computed."""
    from onnxprune import runtime
    from onnxprune.pipeline import Pruner

    model, x = two_layers(folded=True), tokens(20)
    pruner = Pruner("ecp", error_at="layer", scope="global", refit=False).fit(model, {"x": x})
    assert pruner.engine_["name"] is None and pruner.chosen_.error_at == "layer"
    for layer in pruner.layers_:
        (z,) = runtime.run_tensors(model, {"x": x}, [layer.input]) if layer.input != "x" else (x,)
        z = np.asarray(z, np.float64).reshape(-1, layer.in_features)
        w = layer.to_rows(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight)))
        np.testing.assert_allclose(pruner.scores_[layer.name].scores, w * w * z.var(0), rtol=1e-6)
        np.testing.assert_allclose(pruner.scores_[layer.name].shifts, w * z.mean(0), rtol=1e-6, atol=1e-9)


LM = Path(__file__).parent / "fixtures" / "lm"


def _perplexity(path, ids) -> float:
    """exp(mean next-token cross-entropy) of a causal LM's logits on onnxruntime, in numpy float64."""
    from onnxprune import runtime

    logits = runtime.make_session(str(path)).run(None, {"input_ids": ids})[0].astype(np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean()))


def _block_rows(model, weight):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight))


@pytest.mark.parametrize("fixture,head,args", [
    ("gpt2_tiny_legacy", "/model/lm_head/MatMul", ["--sparsity", "0.5"]),
    ("llama_tiny_dynamo", "node_linear_14", ["--pattern", "2:4"]),
])
def test_a_trained_tiny_lm_pruned_from_the_cli_with_default_options_keeps_its_perplexity(tmp_path, fixture, head, args):
    """The h-lm fixtures (byte-level GPT-2, legacy export with Gemms on folded tokens and computed
    shapes; LLaMA, dynamo export) pruned with only --sparsity or --pattern (and the LM head left out):
    every block linear loses half its weights, the head is untouched, and the held-out perplexity
    (numpy over onnxruntime's logits) stays within 5% of the dense model's."""
    import json

    source = LM / f"{fixture}.onnx"
    out = tmp_path / "pruned.onnx"
    res = _cli("prune", source, out, "--data", LM / "calib.npz", *args, "--exclude", head, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "defaults for a sequence model" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    dense, pruned = onnx.load(source), onnx.load(out)
    blocks = [layer for layer in report["weights"]["layers"] if layer["layer"] != head]
    assert len(blocks) == (8 if fixture.startswith("gpt2") else 14)  # every block linear (the 2 x 4 Gemms, 2 x 7 MatMuls)
    assert {layer["pruned"] / layer["weights"] for layer in blocks} == {0.5}
    head_layer = next(layer for layer in analyse_graph(dense).layers if layer.name == head)
    np.testing.assert_array_equal(_block_rows(pruned, head_layer.weight), _block_rows(dense, head_layer.weight))
    ids = np.load(LM / "heldout.npz")["input_ids"]
    assert _perplexity(out, ids) < 1.05 * _perplexity(source, ids)


def test_a_structured_prune_of_gemms_on_folded_tokens_with_computed_shapes_runs_every_step(tmp_path):
    """The legacy GPT-2 fixture computes its Reshapes' shapes from Shape ops, so that its FFN's second
    Gemm is known to fold tokens only from shapes measured on the analysis copy. After the first step
    slices the FFN units, the layers re-read from the sliced model must still be folded layers (else
    the next step's derivative graph adds a per-sample offset to the token rows and fails): the prune
    runs its steps, the written c_fc Gemms have fewer outputs than dense, and the held-out perplexity
    (numpy over onnxruntime's logits) stays within 5% of the dense model's."""
    source, out = LM / "gpt2_tiny_legacy.onnx", tmp_path / "pruned.onnx"
    res = _cli("prune", source, out, "--data", LM / "calib.npz", "--structured", "--sparsity", "0.3", "--steps", "2",
               "--time-batches", "1")
    assert res.exit_code == 0, res.output
    dense, pruned = onnx.load(source), onnx.load(out)
    widths = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        layers = [layer for layer in analyse_graph(model).layers if "mlp/c_fc" in layer.name]
        widths[name] = [_block_rows(model, layer.weight).shape[1] for layer in layers]  # Conv1D stores (in, out)
    assert widths["dense"] == [128, 128] and sum(widths["pruned"]) < sum(widths["dense"])
    ids = np.load(LM / "heldout.npz")["input_ids"]
    assert _perplexity(out, ids) < 1.05 * _perplexity(source, ids)


def test_a_walk_back_from_the_scores_steps_over_the_rotary_to_the_head_split():
    """What a head walk from Q K^T back to the projections needs: from q's and k's rotary outputs to
    the tensors the head split wrote, and nothing where an op mixes the heads."""
    from onnxprune.find.rotary import head_source
    from onnxprune.graph.index import GraphIndex

    from tinylm import llama_block

    g = GraphIndex(llama_block())
    assert head_source(g, "q.rope", 1) == "q.t" and head_source(g, "k.rope", 1) == "k.t"
    assert head_source(g, "v.t", 1) == "v.t"

    def per_head_sin(graph):
        sin = next(t for t in graph.initializer if t.name == "rope.sin")
        value = numpy_helper.to_array(sin)
        sin.CopyFrom(numpy_helper.from_array(np.stack([value, -value]), "rope.sin"))

    assert head_source(GraphIndex(_rope_variant(per_head_sin)), "q.rope", 1) is None


def test_the_rotarys_nodes_are_the_span_a_head_walk_adds_to_its_path():
    from onnxprune.find.rotary import head_span
    from onnxprune.graph.index import GraphIndex

    from tinylm import llama_block

    exit_, nodes = head_span(GraphIndex(llama_block()), "q.t", 1)
    assert exit_ == "q.rope" and sorted(nodes) == sorted(
        ["q.rope.first", "q.rope.second", "q.rope.neg", "q.rope.rotated", "q.rope.cos", "q.rope.sin", "q.rope"])


def test_a_llama_blocks_heads_are_one_group_through_the_rotary_and_shrink_to_the_masked_model():
    """The head walk steps over q's and k's rotary embedding: the block's heads are one group (q, k, v
    rows and o_proj columns together); removing half of them with constants in their place equals the
    masked dense model."""
    from couplings import shrinks_to_masked

    from onnxprune.find.units import find_units

    from tinylm import llama_block

    model = llama_block(heads=4, width=16)
    group = find_units(model).by_name()["heads:o_proj"]
    assert group.units == 4 and set(group.producers) == {"q_proj", "k_proj", "v_proj"}
    shrinks_to_masked(model, "heads:o_proj")


def test_a_rotary_that_differs_between_heads_stops_the_head_walk():
    from onnxprune.find.units import find_units

    def per_head_cos(graph):  # cos differs between the two heads: (H, S, D)
        cos = next(t for t in graph.initializer if t.name == "rope.cos")
        value = numpy_helper.to_array(cos)
        cos.CopyFrom(numpy_helper.from_array(np.stack([value, 2 * value]), "rope.cos"))

    assert "heads:o_proj" in find_units(_rope_variant(lambda graph: None)).by_name()
    assert "heads:o_proj" not in find_units(_rope_variant(per_head_cos)).by_name()
@pytest.mark.parametrize("folded", [False, True])
def test_ecp_under_the_outputs_derivatives_scores_a_token_wise_last_layer_as_numpy_does(folded):
    """The last layer writes the logits, so its output Jacobian is the identity at every token: removing
    W_ij and shifting b_i by the best constant leaves E_s sum_t (W_ij z_stj - shift)^2, i.e.
    W_ij^2 (E_s sum_t z_stj^2 - (E_s sum_t z_stj)^2 / T), from the layer's inputs z in numpy float64.
    The exact per-sample sums of a MatMul on rank 3 and of a Gemm on folded tokens must give these
    scores (up to the objective's constant scale), and none of them zero."""
    import onnxprune

    model = two_layers(folded)
    x = np.random.default_rng(1).normal(size=(12, 4, 6)).astype(np.float32)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w1, w2 = (inits["w1"].T, inits["w2"]) if folded else (inits["w1"], inits["w2"].T)
    z = inits["mix"] @ np.tanh(x.astype(np.float64) @ w1 + inits["b1"])  # (samples, tokens, hidden)
    per_sample = z.sum(1)
    reference = w2**2 * ((z**2).sum(1).mean(0) - per_sample.mean(0) ** 2 / z.shape[1])[None, :]
    pruner = onnxprune.Pruner("ecp", scope="layer", refit=False, error_at="output", conv_statistics="exact",
                              objective="absolute", threads=1).fit(model, {"x": x})
    scores = pruner.scores_["l2"].scores
    assert (scores > 0).all()
    np.testing.assert_allclose(scores / scores.sum(), reference / reference.sum(), rtol=1e-4)


def test_the_dynamo_llamas_heads_are_found_through_a_rotary_computed_from_the_positions():
    """The dynamo export computes cos and sin from the positions (Cos/Sin of an arange, unsqueezed over
    the heads): the head walk steps over that rotary too, and every group, heads included, shrinks to
    the masked model on real tokens."""
    from couplings import all_at_once

    from onnxprune.find.units import find_units

    model = onnx.load(str(LM / "llama_tiny_dynamo.onnx"))
    tokens = np.load(LM / "calib.npz")["input_ids"][:2]
    assert {"heads:node_linear_3", "heads:node_linear_10"} <= set(find_units(model).by_name())
    all_at_once(model, inputs=[{"input_ids": tokens}])


def _legacy_and_optimum_spelling(graph):
    """The llama block as the legacy exporter and optimum write it: rotate_half's Slice axes are Constant
    nodes and its middle is computed from the head tensor's shape (Shape -> Gather -> Div -> Unsqueeze);
    the attention probabilities are guarded by ``Where(IsNaN(p), 0, p)``."""
    from unitref import toposort

    added = []

    def const(name, value):
        added.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value))))
        return name

    for name in ("q", "k"):
        t = f"{name}.t"
        size = [f"{name}.shape", f"{name}.size", f"{name}.half", f"{name}.mid"]
        added += [helper.make_node("Shape", [t], [size[0]], name=size[0]),
                  helper.make_node("Gather", [size[0], const(f"{name}.last", np.int64(-1))], [size[1]], name=size[1]),
                  helper.make_node("Div", [size[1], const(f"{name}.two", np.int64(2))], [size[2]], name=size[2]),
                  helper.make_node("Unsqueeze", [size[2], const(f"{name}.zero", np.array([0], np.int64))], [size[3]],
                                   name=size[3])]
        for node in graph.node:
            if node.name in (f"{name}.rope.first", f"{name}.rope.second"):
                node.input[3] = const(f"{node.name}.axes", np.array([-1], np.int64))
                node.input[2 if node.name.endswith("first") else 1] = size[3]
    context = next(n for n in graph.node if n.name == "context")
    added += [helper.make_node("IsNaN", ["attn"], ["attn.nan"], name="attn.nan"),
              helper.make_node("Where", ["attn.nan", const("attn.zero", np.float32(0)), "attn"], ["attn.guarded"],
                               name="attn.guarded")]
    context.input[0] = "attn.guarded"
    ordered = toposort(graph, added)
    del graph.node[:]
    graph.node.extend(ordered)


def test_a_llama_block_in_the_legacy_and_optimum_spelling_has_its_heads_found_and_shrinks_to_the_masked_model():
    """rotate_half reads the head size from a Shape of the head tensor (a reader that follows the kept
    heads by itself), its Slices take their axes from Constant nodes, and a NaN guard rewrites the
    probabilities from themselves: none of these mixes heads, so the heads are one group and removing
    them equals the masked dense model."""
    from couplings import shrinks_to_masked

    from onnxprune.find.units import find_units

    model = _rope_variant(_legacy_and_optimum_spelling)
    onnx.checker.check_model(model, full_check=True)
    group = find_units(model).by_name()["heads:o_proj"]
    assert group.units == 2 and {"attn.nan", "q.rope.first"} <= set(group.path)
    shrinks_to_masked(model, "heads:o_proj")


def test_the_heads_of_gpt2s_gemms_on_folded_tokens_are_found_and_shrink_to_the_masked_model():
    """GPT-2's legacy export folds the tokens into the rows of c_attn and c_proj with x.view(-1, x.size(-1))
    (shapes computed at run time, unknown to shape inference): both are folded layers, the walk from
    c_proj back through the fold and the head merge reaches c_attn's Q, K and V parts, and every group,
    heads included, shrinks to the masked model on real tokens."""
    from couplings import all_at_once

    from onnxprune.find.units import find_units

    model = onnx.load(str(LM / "gpt2_tiny_legacy.onnx"))
    kinds = {layer.name: layer.kind for layer in analyse_graph(model).layers}
    assert {kinds[f"/model/transformer/h.{b}/{p}/Gemm"] for b in (0, 1) for p in ("attn/c_attn", "attn/c_proj")} == {"folded"}
    groups = find_units(model).by_name()
    assert {f"heads:/model/transformer/h.{b}/attn/c_proj/Gemm" for b in (0, 1)} <= set(groups)
    assert groups["heads:/model/transformer/h.0/attn/c_proj/Gemm"].units == 2
    all_at_once(model, inputs=[{"input_ids": np.load(LM / "calib.npz")["input_ids"][:2]}])


@pytest.mark.parametrize("fixture", ["gpt2_tiny_legacy", "llama_tiny_dynamo"])
def test_a_structured_prune_removes_attention_heads_of_a_trained_tiny_lm_and_keeps_its_perplexity(tmp_path, fixture):
    """Half of every group per layer in two steps: one of the two heads of each block goes (GPT-2: through
    the Gemms on folded tokens; LLaMA: through the rotary computed from the positions) with half of the
    FFN units, the written model's projections are narrower, and the held-out perplexity (numpy over
    onnxruntime's logits) stays within 15% of the dense model's (7.5% measured for LLaMA, 2% for GPT-2)."""
    import json

    source, out = LM / f"{fixture}.onnx", tmp_path / "pruned.onnx"
    res = _cli("prune", source, out, "--data", LM / "calib.npz", "--structured", "--sparsity", "0.5", "--scope", "layer",
               "--steps", "2", "--time-batches", "1", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    groups = json.loads((tmp_path / "r.json").read_text())["units"]["groups"]
    heads = {name: g for name, g in groups.items() if name.startswith("heads:")}
    assert len(heads) == 2 and all((g["units_before"], g["units_after"]) == (2, 1) for g in heads.values())
    dense_params = sum(int(np.prod(t.dims)) for t in onnx.load(source).graph.initializer)
    assert sum(int(np.prod(t.dims)) for t in onnx.load(out).graph.initializer) < dense_params
    ids = np.load(LM / "heldout.npz")["input_ids"]
    assert _perplexity(out, ids) < 1.15 * _perplexity(source, ids)
