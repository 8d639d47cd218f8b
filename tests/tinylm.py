"""Small sequence models built with onnx.helper for the language-model tests: the same weights spelled
as rank-3 MatMul + Add (torch's nn.Linear on (batch, sequence, features)) or as GPT-2's Conv1D export
(a Reshape folds (batch, sequence) into the rows of a Gemm, a second Reshape unfolds them), and a
one-head causal attention whose key projection has a bias (invisible through the softmax)."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _model(nodes, inits, seq, features, classes, name):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", seq, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def two_layers(folded: bool, seq=4, features=6, hidden=8, classes=5, seed=0, computed=False):
    """x (N, S, F) -> linear + bias -> Tanh -> a fixed mix of the positions (so that a position's
    output depends on the others) -> linear + bias -> logits (N, S, K). ``folded``: the linears are
    Gemms on (N x S, features) between Reshapes, as GPT-2 exports; else MatMul + Add on rank 3.
    ``computed``: the first fold reads a tensor reshaped to a shape computed from Shape ops (as a
    legacy export writes it), so shape inference cannot tell its dimensions."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(hidden, features)) / np.sqrt(features), rng.normal(size=hidden) * 0.3
    w2, b2 = rng.normal(size=(classes, hidden)) / np.sqrt(hidden), rng.normal(size=classes) * 0.3
    mix = np.tril(rng.uniform(0.2, 1.0, size=(seq, seq)))
    inits = [_init("mix", mix / mix.sum(1, keepdims=True))]
    if folded:
        inits += [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2),
                  _init("rows_f", [-1, features], np.int64), _init("seq_h", [-1, seq, hidden], np.int64),
                  _init("rows_h", [-1, hidden], np.int64), _init("seq_k", [-1, seq, classes], np.int64)]
        nodes = [helper.make_node("Reshape", ["x_in" if computed else "x", "rows_f"], ["x_rows"], name="fold1"),
                 helper.make_node("Gemm", ["x_rows", "w1", "b1"], ["a1_rows"], name="l1", transB=1),
                 helper.make_node("Reshape", ["a1_rows", "seq_h"], ["a1"], name="unfold1"),
                 helper.make_node("Tanh", ["a1"], ["h1"], name="act1"),
                 helper.make_node("MatMul", ["mix", "h1"], ["m1"], name="mix"),
                 helper.make_node("Reshape", ["m1", "rows_h"], ["m1_rows"], name="fold2"),
                 helper.make_node("Gemm", ["m1_rows", "w2", "b2"], ["a2_rows"], name="l2", transB=1),
                 helper.make_node("Reshape", ["a2_rows", "seq_k"], ["logits"], name="unfold2")]
        if computed:  # x_in = x.view(x.shape[0], x.shape[1], F) with the shape read at run time
            inits += [_init("first_two", [2], np.int64), _init("zero", [0], np.int64), _init("f", [features], np.int64)]
            nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
                     helper.make_node("Slice", ["x_shape", "zero", "first_two"], ["lead"], name="lead"),
                     helper.make_node("Concat", ["lead", "f"], ["x_view"], axis=0, name="view_shape"),
                     helper.make_node("Reshape", ["x", "x_view"], ["x_in"], name="view"), *nodes]
    else:
        inits += [_init("w1", w1.T), _init("b1", b1), _init("w2", w2.T), _init("b2", b2)]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["p1"], name="l1"),
                 helper.make_node("Add", ["p1", "b1"], ["a1"], name="l1_bias"),
                 helper.make_node("Tanh", ["a1"], ["h1"], name="act1"),
                 helper.make_node("MatMul", ["mix", "h1"], ["m1"], name="mix"),
                 helper.make_node("MatMul", ["m1", "w2"], ["p2"], name="l2"),
                 helper.make_node("Add", ["p2", "b2"], ["logits"], name="l2_bias")]
    return _model(nodes, inits, seq, features, classes, "folded" if folded else "rank3")


def attention(seq=5, width=6, classes=4, seed=0, folded=False):
    """One causal self-attention head with biased q, k, v projections and an output layer:
    softmax(q k^T / sqrt(d) + causal mask) v -> linear -> logits (N, S, K). A constant added to
    every key changes each query's scores by the same amount over the keys, so the key bias is
    invisible through the softmax (its C_i is rounding noise)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x = "x"
    if folded:
        inits.append(_init("rows_w", [-1, width], np.int64))
        inits.append(_init("seq_w", [-1, seq, width], np.int64))
        nodes.append(helper.make_node("Reshape", ["x", "rows_w"], ["x_rows"], name="fold"))
    for name in ("q", "k", "v"):
        w, b = rng.normal(size=(width, width)) / np.sqrt(width), rng.normal(size=width) * 0.5
        inits += [_init(f"{name}.weight", w if folded else w.T), _init(f"{name}.bias", b)]
        if folded:
            nodes += [helper.make_node("Gemm", ["x_rows", f"{name}.weight", f"{name}.bias"], [f"{name}_rows"],
                                       name=f"{name}_proj", transB=1),
                      helper.make_node("Reshape", [f"{name}_rows", "seq_w"], [name], name=f"{name}_unfold")]
        else:
            nodes += [helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}_mm"], name=f"{name}_proj"),
                      helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [name], name=f"{name}_bias")]
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -1e4)
    wo, bo = rng.normal(size=(width, classes)) / np.sqrt(width), rng.normal(size=classes) * 0.3
    inits += [_init("scale", 1 / np.sqrt(width)), _init("mask", mask), _init("o.weight", wo), _init("o.bias", bo)]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
              helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="scores"),
              helper.make_node("Mul", ["scores_raw", "scale"], ["scores_scaled"], name="scale"),
              helper.make_node("Add", ["scores_scaled", "mask"], ["scores_masked"], name="causal"),
              helper.make_node("Softmax", ["scores_masked"], ["attn"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["attn", "v"], ["ctx"], name="context"),
              helper.make_node("MatMul", ["ctx", "o.weight"], ["o_mm"], name="o_proj"),
              helper.make_node("Add", ["o_mm", "o.bias"], ["logits"], name="o_bias")]
    return _model(nodes, inits, seq, width, classes, "attention")


def tokens(n=24, seq=4, features=6, seed=1):
    """Float 'embeddings' (N, S, F) for the models above."""
    return np.random.default_rng(seed).normal(size=(n, seq, features)).astype(np.float32)


def llama_block(seq=6, width=8, heads=2, ffn=12, classes=5, seed=0, theta=10000.0):
    """One LLaMA-style decoder block on float embeddings x (N, S, W), as torch exports it: RMSNorm
    written out (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) with a gain; bias-less q, k, v
    projections split into heads ((N, S, H, D) -> (N, H, S, D)); the rotary embedding on q and k
    (t * cos + rotate_half(t) * sin, rotate_half a Slice of each half of the head dimension, a Neg and
    a Concat); causal softmax attention; the output projection and the residual; then RMSNorm, the
    SwiGLU FFN (silu(gate) * up, SiLU as x * Sigmoid(x)) and its down projection with the residual;
    a final RMSNorm and a linear head -> logits (N, S, K)."""
    rng = np.random.default_rng(seed)
    d = width // heads
    inits, nodes = [], []

    def init(name, value, dtype=np.float32):
        inits.append(_init(name, value, dtype))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rmsnorm(x, prefix):
        sq = node("Pow", [x, init(f"{prefix}.two", 2.0)], f"{prefix}.sq")
        mean = node("ReduceMean", [sq], f"{prefix}.mean", axes=[-1], keepdims=1)
        var = node("Add", [mean, init(f"{prefix}.eps", 1e-6)], f"{prefix}.var")
        root = node("Sqrt", [var], f"{prefix}.root")
        inv = node("Reciprocal", [root], f"{prefix}.inv")
        normed = node("Mul", [x, inv], f"{prefix}.normed")
        return node("Mul", [normed, init(f"{prefix}.weight", 1 + 0.1 * rng.normal(size=width))], f"{prefix}.out")

    def linear(x, name, n_in, n_out):
        return node("MatMul", [x, init(f"{name}.weight", rng.normal(size=(n_in, n_out)) / np.sqrt(n_in))], name)

    freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = np.outer(np.arange(seq), freqs)
    angles = np.concatenate([angles, angles], axis=1)                     # (S, D), as HF repeats the halves
    init("rope.cos", np.cos(angles))
    init("rope.sin", np.sin(angles))
    init("heads_shape", [0, 0, heads, d], np.int64)
    init("merge_shape", [0, 0, width], np.int64)
    init("half_starts", [0], np.int64)
    init("half_mid", [d // 2], np.int64)
    init("half_end", [d], np.int64)
    init("last_axis", [-1], np.int64)
    h = rmsnorm("x", "attn_norm")
    projected = {}
    for name in ("q", "k", "v"):
        p = linear(h, f"{name}_proj", width, width)
        split = node("Reshape", [p, "heads_shape"], f"{name}.heads")
        projected[name] = node("Transpose", [split], f"{name}.t", perm=[0, 2, 1, 3])
    for name in ("q", "k"):
        t = projected[name]
        first = node("Slice", [t, "half_starts", "half_mid", "last_axis"], f"{name}.rope.first")
        second = node("Slice", [t, "half_mid", "half_end", "last_axis"], f"{name}.rope.second")
        negated = node("Neg", [second], f"{name}.rope.neg")
        rotated = node("Concat", [negated, first], f"{name}.rope.rotated", axis=-1)
        cos = node("Mul", [t, "rope.cos"], f"{name}.rope.cos")
        sin = node("Mul", [rotated, "rope.sin"], f"{name}.rope.sin")
        projected[name] = node("Add", [cos, sin], f"{name}.rope")
    kt = node("Transpose", [projected["k"]], "k.tt", perm=[0, 1, 3, 2])
    scores = node("MatMul", [projected["q"], kt], "scores")
    scaled = node("Mul", [scores, init("scale", 1 / np.sqrt(d))], "scaled")
    masked = node("Add", [scaled, init("causal", np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -1e4))], "masked")
    attn = node("Softmax", [masked], "attn", axis=-1)
    context = node("MatMul", [attn, projected["v"]], "context")
    merged = node("Transpose", [context], "context.t", perm=[0, 2, 1, 3])
    flat = node("Reshape", [merged, "merge_shape"], "context.merged")
    out = linear(flat, "o_proj", width, width)
    residual = node("Add", ["x", out], "attn_residual")
    h2 = rmsnorm(residual, "ffn_norm")
    gate = linear(h2, "gate_proj", width, ffn)
    up = linear(h2, "up_proj", width, ffn)
    sigmoid = node("Sigmoid", [gate], "gate.sigmoid")
    silu = node("Mul", [gate, sigmoid], "gate.silu")
    product = node("Mul", [silu, up], "swiglu")
    down = linear(product, "down_proj", ffn, width)
    residual2 = node("Add", [residual, down], "ffn_residual")
    final = rmsnorm(residual2, "final_norm")
    nodes.append(helper.make_node("MatMul", [final, init("head.weight", rng.normal(size=(width, classes)) / np.sqrt(width))],
                                  ["logits"], name="head"))
    return _model(nodes, inits, seq, width, classes, "llama_block")
