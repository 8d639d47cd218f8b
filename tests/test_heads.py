"""Attention heads as units in the spellings exporters write: a head is D rows of Q, K and V (of each
part of a fused QKV projection) and D columns of the output projection; every shape entry that counts
the heads follows them; a per-head bias is cut (stored) or narrowed by a Gather (computed, shared by
layers). The shrunk model equals the dense model reading the removed heads' columns as constants."""
import numpy as np
import pytest
from couplings import Graph, all_at_once, find_units, shrinks_to_masked
from onnx import helper

S, W, H, D = 4, 6, 2, 3  # sequence, width, heads, head size


def projection(g, x, name, out=H * D, bias=True):
    y = g.add("MatMul", [x, g.w(f"{name}.w", W, out)], name)
    return g.add("Add", [y, g.w(f"{name}.b", out)], f"{name}.bias") if bias else y


def legacy_shape(g, x, tail, tag):
    """Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), Constant tail...): the
    legacy exporter's shape of ``view(x.size(0), x.size(1), *tail)``."""
    shape = g.add("Shape", [x], f"{tag}.shape")
    dims = [g.add("Unsqueeze", [g.add("Gather", [shape, g.constant_node(k, np.int64)], f"{tag}.g{k}", axis=0),
                                g.constant_node([0], np.int64)], f"{tag}.u{k}") for k in (0, 1)]
    return g.add("Concat", dims + [g.constant_node([v], np.int64) for v in tail], f"{tag}.concat", axis=0)


def attend(g, q, k, v, name, score_ops=(), sdpa=False):
    """softmax(q k^T * scale (+ score ops)) v on (B, H, S, D) heads; the merged context's name."""
    if sdpa:  # dynamo's scaled_dot_product_attention: k folded to (B*H, S, D), transposed, unfolded; both scaled
        folded = g.add("Reshape", [k, g.const(f"{name}.fold", [-1, S, D], np.int64)], f"{name}.kfold")
        kt = g.add("Transpose", [folded], f"{name}.kt3", perm=[0, 2, 1])
        kt = g.add("Reshape", [kt, g.add("Concat", [g.add("Slice", [g.add("Shape", [k], f"{name}.kshape"),
                                                                     g.const(f"{name}.s0", [0], np.int64),
                                                                     g.const(f"{name}.s2", [2], np.int64)], f"{name}.bh"),
                                                    g.const(f"{name}.ds", [D, S], np.int64)], f"{name}.unfold_shape", axis=0)],
                   f"{name}.kt")
        root = g.const(f"{name}.root", D ** -0.25)
        q, kt = g.add("Mul", [q, root], f"{name}.qs"), g.add("Mul", [kt, root], f"{name}.ks")
        scores = g.add("MatMul", [q, kt], f"{name}.qk")
    else:
        kt = g.add("Transpose", [k], f"{name}.kt", perm=[0, 1, 3, 2])
        scores = g.add("Mul", [g.add("MatMul", [q, kt], f"{name}.qk"), g.constant_node(D ** -0.5)], f"{name}.scaled")
    for op in score_ops:
        scores = op(g, scores, name)
    ctx = g.add("MatMul", [g.add("Softmax", [scores], f"{name}.softmax", axis=-1), v], f"{name}.pv")
    return g.add("Transpose", [ctx], f"{name}.merge_t", perm=[0, 2, 1, 3])


def finish(g, merged, name="o", windows=False):
    o = g.add("Add", [g.add("MatMul", [merged, g.w("o.w", H * D, W)], name), g.w("o.b", W)], "o.bias")
    g.add("MatMul", [g.add("Relu", [o], "relu"), g.w("ffn.w", W, 3)], "ffn", "y")
    if windows:  # (images, 2 windows, S, W) in, (images x windows, S, 3) out
        return g.model(["N", 2, S, W], "y", ["M", S, 3], opset=17)
    return g.model(["N", S, W], "y", ["N", S, 3], opset=17)


def separate(variant):
    """Q, K, V projections of their own: ``legacy`` (shapes computed from Shape, Constant nodes, a mask),
    ``shared_shape`` (dynamo: one shape initializer for Q, K and V), ``sdpa`` (dynamo's folded keys),
    ``whisper`` (Q scaled after its bias, K without bias)."""
    g = Graph()
    heads = {}
    for p in "qkv":
        x = projection(g, "x", p, bias=not (variant == "whisper" and p == "k"))
        if variant == "whisper" and p == "q":
            x = g.add("Mul", [x, g.const("q.scale", 0.5)], "q.scaled")
        if variant == "legacy":
            shape = legacy_shape(g, x, [-1, D], f"{p}.split")
        elif variant == "shared_shape":
            shape = g.const("split_shape", [0, 0, H, D], np.int64) if p == "q" else "split_shape"
        else:
            shape = g.const(f"{p}.split_shape", [0, 0, H, D], np.int64)
        heads[p] = g.add("Transpose", [g.add("Reshape", [x, shape], f"{p}.split")], f"{p}.heads", perm=[0, 2, 1, 3])
    ops = [lambda g, s, name: g.add("Add", [s, g.w("mask", 1, 1, 1, S)], f"{name}.masked")] if variant == "legacy" else []
    merged = attend(g, heads["q"], heads["k"], heads["v"], "attn", ops, sdpa=variant == "sdpa")
    shape = legacy_shape(g, merged, [H * D], "merge") if variant == "legacy" else g.const("merge_shape", [0, 0, H * D], np.int64)
    return finish(g, g.add("Reshape", [merged, shape], "merge"))


def fused(variant):
    """One QKV projection: ``gather`` (timm: Reshape (B, S, 3, H, D), Transpose, Gather), ``split`` (torch's
    legacy unbind: Split in three and Squeeze), ``last_axis`` (GPT-2: Split the projection's last axis)."""
    g = Graph()
    qkv = projection(g, "x", "qkv", out=3 * H * D)
    if variant == "last_axis":
        g.nodes.append(helper.make_node("Split", [qkv, g.const("thirds", [H * D] * 3, np.int64)], ["q3", "k3", "v3"],
                                        name="split", axis=2))
        parts = [g.add("Transpose", [g.add("Reshape", [t, g.const(f"{t}.shape", [0, 0, H, D], np.int64)], f"{t}.r")],
                       f"{t}.heads", perm=[0, 2, 1, 3]) for t in ("q3", "k3", "v3")]
    else:
        split = g.add("Reshape", [qkv, g.const("qkv.shape", [0, 0, 3, H, D], np.int64)], "qkv.split")
        stacked = g.add("Transpose", [split], "qkv.heads", perm=[2, 0, 3, 1, 4])
        if variant == "gather":
            parts = [g.add("Gather", [stacked, g.const(f"i{k}", k, np.int64)], f"part{k}", axis=0) for k in range(3)]
        else:
            outs = ["s0", "s1", "s2"]
            ones = g.const("ones", [1, 1, 1], np.int64)
            g.nodes.append(helper.make_node("Split", [stacked, ones], outs, name="unbind", axis=0))
            parts = [g.add("Squeeze", [t, g.const(f"{t}.axis", [0], np.int64)], f"{t}.squeezed") for t in outs]
    merged = attend(g, *parts, "attn")
    return finish(g, g.add("Reshape", [merged, g.const("merge_shape", [0, 0, H * D], np.int64)], "merge"))


def biased(variant):
    """A bias per head on the scores: ``stored`` (Swin's relative positions, an initializer (1, H, S, S)),
    ``computed`` (T5's, gathered from a table at run time and shared by two layers), ``windows`` (Swin's
    shifted windows: the scores reshaped to (B, windows, H, S, S), a mask added, reshaped back)."""
    g = Graph()
    if variant == "computed":
        positions = g.add("Range", [g.const("zero", 0, np.int64), g.add("Squeeze", [g.add("Slice", [g.add("Shape", ["x"], "xs"),
                          g.const("one", [1], np.int64), g.const("two", [2], np.int64)], "len1"), g.const("ax0", [0], np.int64)],
                          "len"), g.const("step", 1, np.int64)], "positions")
        relative = g.add("Abs", [g.add("Sub", [g.add("Unsqueeze", [positions, g.const("ax1", [1], np.int64)], "col"),
                                               g.add("Unsqueeze", [positions, "ax0"], "row")], "rel")], "dist")
        bias = g.add("Unsqueeze", [g.add("Transpose", [g.add("Gather", [g.w("table", 8, H), relative], "lookup")], "per_head",
                                         perm=[2, 0, 1]), "ax0"], "bias")
    x, merged = "x", None
    if variant == "windows":
        x = g.add("Reshape", ["x", g.const("to_windows", [-1, S, W], np.int64)], "windows")
    for layer in ("a", "b") if variant == "computed" else ("a",):
        heads = {p: g.add("Transpose", [g.add("Reshape", [projection(g, x, f"{layer}.{p}"), g.const(f"{layer}.{p}.shape",
                                                                                                    [0, 0, H, D], np.int64)],
                                              f"{layer}.{p}.split")], f"{layer}.{p}.heads", perm=[0, 2, 1, 3]) for p in "qkv"}
        if variant == "stored":
            ops = [lambda g, s, name: g.add("Add", [s, g.w(f"{name}.rel", 1, H, S, S)], f"{name}.biased")]
        elif variant == "computed":
            ops = [lambda g, s, name: g.add("Add", [s, bias], f"{name}.biased")]
        else:
            ops = [windowed]
        merged = attend(g, heads["q"], heads["k"], heads["v"], f"{layer}.attn", ops)
        merged = g.add("Reshape", [merged, g.const(f"{layer}.merge_shape", [0, 0, H * D], np.int64)], f"{layer}.merge")
        if layer == "a" and variant == "computed":
            x = g.add("Add", [g.add("MatMul", [merged, g.w("a.o.w", H * D, W)], "a.o"), g.w("a.o.b", W)], "a.o.bias")
    return finish(g, merged, "o" if variant != "computed" else "b.o", windows=variant == "windows")


def windowed(g, scores, name):
    """Swin's shifted windows: the scores as (images, windows, H, S, S), a mask per window added, and back."""
    five = g.add("Reshape", [scores, g.const(f"{name}.win", [-1, 2, H, S, S], np.int64)], f"{name}.w5")
    masked = g.add("Add", [five, g.w(f"{name}.mask", 1, 2, 1, S, S)], f"{name}.masked")
    return g.add("Reshape", [masked, g.const(f"{name}.back", [-1, H, S, S], np.int64)], f"{name}.w4")


CASES = {**{f"separate-{v}": (lambda v=v: separate(v)) for v in ("legacy", "shared_shape", "sdpa", "whisper")},
         **{f"fused-{v}": (lambda v=v: fused(v)) for v in ("gather", "split", "last_axis")},
         **{f"bias-{v}": (lambda v=v: biased(v)) for v in ("stored", "computed", "windows")}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_heads_in_every_spelling_shrink_to_the_masked_model(case):
    model = CASES[case]()
    groups = {g.name: g for g in find_units(model).groups if g.name.startswith("heads:")}
    assert groups, [(r.node, r.reason) for r in find_units(model).rejected]
    for name, group in groups.items():
        assert group.units == H and [c.block for c in group.consumers] == [D]
        shrunk = shrinks_to_masked(model, name)
        again = find_units(shrunk).by_name()[name]  # found again with one head left
        assert again.units == H - 1
    all_at_once(model)


def test_a_fused_projection_loses_the_same_head_in_each_part():
    model = fused("gather")
    group = find_units(model).by_name()["heads:o"]
    assert group.producers == ("qkv",)
    assert sorted(c.offset for c in group.cuts if c.tensor == "qkv.w") == [0, H, 2 * H]


def test_a_computed_bias_shared_by_two_layers_is_narrowed_per_layer():
    model = biased("computed")
    groups = find_units(model).by_name()
    assert [s.node for s in groups["heads:a.o"].selects] == ["a.attn.biased"]
    assert [s.node for s in groups["heads:b.o"].selects] == ["b.attn.biased"]


def test_a_heads_rows_in_a_fused_projection():
    group = find_units(fused("gather")).by_name()["heads:o"]
    rows = group.unit_entries("qkv.w")  # head h: D rows of each of Q, K and V
    assert rows.tolist() == [[p * H * D + h * D + d for p in range(3) for d in range(D)] for h in range(H)]
