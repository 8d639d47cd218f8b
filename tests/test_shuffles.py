"""ShuffleNet's channel shuffle: read as a Gather of the channels in the analysis copy (exact, undone
where nothing was removed), its units walked through the interleaving, and every group shrinks to the
dense model reading the removed units as constants. Tiny ShuffleNetV2 stages in the two spellings
torch writes: the dynamo exporter's constant shapes and Split into equal parts, the legacy exporter's
shapes and chunk bounds computed from Shape."""
import numpy as np
import onnx
import pytest
from couplings import Graph, all_at_once, feeds, find_units, shrinks_to_masked
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.edit.slicing import remove_units
from onnxprune.prepare.analysis import AnalysisCopy
from onnxprune.prepare.shuffles import SUFFIX, ChannelShuffles

C, HW = 8, 5  # channels of the stage, spatial size


def _shuffle_dynamo(g, x, name):
    g.const(f"{name}.s1", [-1, 2, C // 2, HW, HW], np.int64)
    g.const(f"{name}.s2", [-1, C, HW, HW], np.int64)
    view = g.add("Reshape", [x, f"{name}.s1"], f"{name}.view")
    moved = g.add("Transpose", [view], f"{name}.t", perm=[0, 2, 1, 3, 4])
    return g.add("Reshape", [moved, f"{name}.s2"], f"{name}.out")


def _shuffle_legacy(g, x, name):
    """x.view(b, 2, c // 2, h, w).transpose(1, 2).view(b, -1, h, w) with every size read from Shape."""
    dims = [g.add("Gather", [g.add("Shape", [x], f"{name}.shape{k}"), g.constant_node(k, np.int64)], f"{name}.dim{k}",
                  axis=0) for k in range(4)]
    half = g.add("Div", [dims[1], g.constant_node(2, np.int64)], f"{name}.half")
    axes = g.constant_node([0], np.int64)
    unsq = [g.add("Unsqueeze", [d, axes], f"{name}.u{k}") for k, d in enumerate([dims[0], half, dims[2], dims[3]])]
    first = g.add("Concat", [unsq[0], g.constant_node([2], np.int64), *unsq[1:]], f"{name}.shape_a", axis=0)
    second = g.add("Concat", [unsq[0], g.constant_node([-1], np.int64), unsq[2], unsq[3]], f"{name}.shape_b", axis=0)
    moved = g.add("Transpose", [g.add("Reshape", [x, first], f"{name}.view")], f"{name}.t", perm=[0, 2, 1, 3, 4])
    return g.add("Reshape", [moved, second], f"{name}.out")


def _chunk_dynamo(g, x, name):
    g.nodes.append(helper.make_node("Split", [x], [f"{name}.a", f"{name}.b"], name=name, axis=1, num_outputs=2))
    return f"{name}.a", f"{name}.b"


def _chunk_legacy(g, x, name):
    """x.chunk(2, dim=1): Slices whose bounds are computed from the channel count."""
    size = g.add("Gather", [g.add("Shape", [x], f"{name}.shape"), g.constant_node(1, np.int64)], f"{name}.c", axis=0)
    step = g.add("Div", [g.add("Add", [size, g.constant_node(1, np.int64)], f"{name}.add"), g.constant_node(2, np.int64)],
                 f"{name}.div")
    middle = g.add("Unsqueeze", [g.add("Mul", [step, g.constant_node(1, np.int64)], f"{name}.m1"),
                                 g.constant_node([0], np.int64)], f"{name}.mid")
    end = g.add("Unsqueeze", [g.add("Mul", [step, g.constant_node(2, np.int64)], f"{name}.m2"),
                              g.constant_node([0], np.int64)], f"{name}.end")
    axes = g.constant_node([1], np.int64)
    a = g.add("Slice", [x, g.constant_node([0], np.int64), middle, axes], f"{name}.a")
    b = g.add("Slice", [x, middle, end, axes], f"{name}.b")
    return a, b


def _branch(g, x, name, cin):
    """pointwise -> depthwise -> pointwise, C/2 channels out (ShuffleNetV2's branch2)."""
    h = g.add("Relu", [g.conv(x, f"{name}.pw1", cin, C // 2)], f"{name}.r1")
    h = g.conv(h, f"{name}.dw", C // 2, C // 2, k=3, pads=1, group=C // 2)
    return g.add("Relu", [g.conv(h, f"{name}.pw2", C // 2, C // 2)], f"{name}.r2")


def shufflenet_stage(spelling, blocks=3):
    """A stem, a downsampling-style first block (two branches of the stem's channels), ``blocks`` - 1
    blocks that chunk the shuffled channels, and a head Conv."""
    shuffle, chunk = {"dynamo": (_shuffle_dynamo, _chunk_dynamo), "legacy": (_shuffle_legacy, _chunk_legacy)}[spelling]
    g = Graph(seed=3)
    stem = g.add("Relu", [g.conv("x", "stem", 3, 6)], "stem.relu")
    left = g.add("Relu", [g.conv(g.conv(stem, "b0.dw", 6, 6, k=3, pads=1, group=6), "b0.pw", 6, C // 2)], "b0.relu")
    t = shuffle(g, g.add("Concat", [left, _branch(g, stem, "b0.br", 6)], "b0.cat", axis=1), "b0.shuffle")
    for k in range(1, blocks):
        kept, passed = chunk(g, t, f"b{k}.chunk")
        t = shuffle(g, g.add("Concat", [kept, _branch(g, passed, f"b{k}.br", C // 2)], f"b{k}.cat", axis=1),
                    f"b{k}.shuffle")
    g.conv(t, "head", C, 3)  # 75 outputs: exact Jacobians, no random probes
    return g.model(["N", 3, HW, HW], "head", ["N", 3, HW, HW], opset=18 if spelling == "dynamo" else 17)


def inputs(model):
    return [feeds(model, {"N": 2}, seed=s) for s in (1, 2)]


@pytest.mark.parametrize("spelling", ["dynamo", "legacy"])
def test_a_shuffle_read_as_a_gather_is_exact_and_undone_where_nothing_went(spelling):
    model = shufflenet_stage(spelling)
    copy = AnalysisCopy.of(model)
    ops = [n.op_type for n in copy.model.graph.node]
    assert "Transpose" not in ops and ops.count("Gather") >= 3
    assert not [n for n in copy.model.graph.node if n.op_type == "Split" and not n.input[1:]]  # sizes now given
    for given in inputs(model):
        for a, b in zip(runtime.make_session(copy.model).run(None, given), runtime.make_session(model).run(None, given)):
            np.testing.assert_array_equal(a, b)
    restored = copy.restore(copy.model)
    assert sorted(n.SerializeToString() for n in restored.graph.node) == \
        sorted(n.SerializeToString() for n in model.graph.node)
    onnx.checker.check_model(restored, full_check=True)


@pytest.mark.parametrize("spelling", ["dynamo", "legacy"])
def test_every_layer_of_a_shuffled_stage_is_in_a_group_and_each_shrinks_to_the_masked_model(spelling):
    work = AnalysisCopy.of(shufflenet_stage(spelling)).model
    units = find_units(work)
    producers = {p for g in units.groups for p in g.producers}
    followers = {n for g in units.groups for n in g.group_attributes}
    assert [r.node for r in units.rejected] == ["head"]  # its units reach the graph output
    assert producers | {"head"} >= {"stem", "b0.pw", *(f"b{k}.br.{c}" for k in range(3) for c in ("pw1", "pw2"))}
    assert {"b0.dw", "b0.br.dw"} <= followers
    interleaved = [g for g in units.groups if any(c.stride > 1 for c in g.consumers)]
    assert interleaved, "the shuffle interleaves the branches: some group is read at a stride"
    for group in units.groups:
        shrinks_to_masked(work, group.name, inputs=inputs(work))
    all_at_once(work, inputs=inputs(work))


@pytest.mark.parametrize("spelling", ["dynamo", "legacy"])
def test_removing_one_branch_only_keeps_its_shuffle_a_gather_and_restores_the_others(spelling):
    model = shufflenet_stage(spelling)
    copy = AnalysisCopy.of(model)
    group = next(g for g in find_units(copy.model).groups if g.producers == ("b2.br.pw2",))
    shrunk = remove_units(copy.model, {group.name: np.array([0])}, {group.name: np.zeros(group.units)})
    restored = copy.restore(shrunk)
    onnx.checker.check_model(restored, full_check=True)
    ops = [n.op_type for n in restored.graph.node]
    gathers = [n for n in restored.graph.node if n.op_type == "Gather" and n.name.endswith(SUFFIX)]
    assert len(gathers) == 1 and ops.count("Transpose") == 2  # b2's shuffle changed, b0's and b1's back
    read = {i for n in restored.graph.node for i in n.input}
    assert {t.name for t in restored.graph.initializer} <= read  # b2's shapes went with its Reshapes
    assert not [n for n in restored.graph.node if n.output[0] not in read | {"head"}]  # and what computed them
    x = feeds(model, {"N": 2})
    dense, pruned = (runtime.make_session(m).run(None, x)[0] for m in (model, restored))
    assert dense.shape == pruned.shape and not np.allclose(dense, pruned)


def test_a_reshape_that_is_not_a_shuffle_is_left_alone():
    g = Graph()
    h = g.conv("x", "a", 3, C)
    g.const("s1", [-1, 2, C // 2, HW * HW], np.int64), g.const("s2", [-1, C, HW, HW], np.int64)
    moved = g.add("Transpose", [g.add("Reshape", [h, "s1"], "view")], "t", perm=[0, 1, 3, 2])  # not the channel axes
    g.conv(g.add("Reshape", [moved, "s2"], "back"), "b", C, 4)
    model = g.model(["N", 3, HW, HW], "b", ["N", 4, HW, HW])
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert not ChannelShuffles()(copy).changed


def test_a_shuffle_of_a_graph_output_stays():
    g = Graph()
    h = g.conv("x", "a", 3, C)
    out = _shuffle_dynamo(g, h, "s")
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, HW, HW])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", C, HW, HW]),
                               helper.make_tensor_value_info("s.view", TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not ChannelShuffles()(model).changed


@pytest.mark.parametrize("name, values", [("b1.br.pw2[0]", "b1.br.r2"), ("b0.br.pw2[2]", "b0.br.r2")])
def test_unit_statistics_through_the_shuffles_match_finite_differences_through_onnxruntime(name, values):
    """A part of a branch's units read at a stride after one or two shuffles: v (the output's derivative
    for a shift of unit j at every position) against a central difference of the head through onnxruntime."""
    from unitref import toposort

    from onnxprune.derivatives.units import unit_statistics
    from onnxprune.find.layers import analyse_graph
    from onnxprune.io.data import Dataset

    work = AnalysisCopy.of(shufflenet_stage("dynamo")).model
    group = find_units(work).by_name()[name]
    assert group.units == 2 and group.consumers[0].stride > 1
    rows = next(c for c in group.cuts if c.tensor == f"{group.producer}.w").offset  # the part's first row
    x = feeds(work, {"N": 6}, seed=4)
    stats = unit_statistics(work, [group], analyse_graph(work).by_name(), Dataset(x), "head")[name]
    for j in range(group.units):
        outs = []
        for sign in (1, -1):
            shifted = onnx.ModelProto()
            shifted.CopyFrom(work)
            delta = np.zeros((1, C // 2, 1, 1), np.float32)
            delta[0, rows + j] = sign * 1e-3
            for node in shifted.graph.node:
                node.input[:] = ["shifted" if i == values else i for i in node.input]
            shifted.graph.initializer.append(numpy_helper.from_array(delta, "delta"))
            shifted.graph.node.append(helper.make_node("Add", [values, "delta"], ["shifted"]))
            ordered = toposort(shifted.graph)
            del shifted.graph.node[:]
            shifted.graph.node.extend(ordered)
            outs.append(runtime.make_session(shifted).run(None, x)[0].astype(np.float64).reshape(6, -1))
        v = (outs[0] - outs[1]) / 2e-3
        np.testing.assert_allclose(stats.vv[j, j], (v ** 2).sum(1).mean(), rtol=2e-2)
