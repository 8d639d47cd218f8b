"""Make the small exported models in tests/fixtures/ (the corpus the exporter tests prune).

Each group needs its exporter, in a throwaway virtual environment (never the project's .venv: torch
and skl2onnx are not dependencies of onnxprune, and onnxruntime would replace the training build):

    python3 -m venv ../torchenv && ../torchenv/bin/pip install torch==2.13.0 onnx onnxscript
    ../torchenv/bin/python scripts/make_fixtures.py torch

    python3 -m venv ../sklenv && ../sklenv/bin/pip install skl2onnx scikit-learn onnx
    ../sklenv/bin/python scripts/make_fixtures.py sklearn

    .venv/bin/python scripts/make_fixtures.py handmade     # onnx.helper only

``handmade`` reproduces with onnx.helper the layer patterns of exporters that are not installed here
(tf2onnx needs TensorFlow): NHWC Transposes around a Conv whose weight comes through Identity and
whose bias is a separate Add, MatMul + Add with the bias on the left, a float16 model, weights that
are shared or produced by nodes, Gemm with transA. Every file is written with a JSON sidecar-free
entry in tests/fixtures/MANIFEST.json (exporter, versions, what pattern it covers). Files stay small
(a few KB to tens of KB).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def record(name: str, exporter: str, covers: str) -> None:
    manifest_path = OUT / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = {"exporter": exporter, "covers": covers, "bytes": (OUT / name).stat().st_size}
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    print(f"{name}: {manifest[name]['bytes']:,} bytes ({exporter})", file=sys.stderr)


def torch_fixtures() -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    version = f"torch {torch.__version__}"

    class Cnn(nn.Module):
        """Conv (no bias) + BN, depthwise strided Conv, 1x1 Conv, pooling, Linear + BatchNorm1d, Softmax."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 12, 1)
            self.fc1 = nn.Linear(12 * 4 * 4, 16, bias=False)
            self.bn2 = nn.BatchNorm1d(16)
            self.fc2 = nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.pw(torch.relu(self.dw(x))))
            x = nn.functional.max_pool2d(x, 1)
            x = torch.relu(self.bn2(self.fc1(x.flatten(1))))
            return torch.softmax(self.fc2(x), dim=-1)

    class Seq(nn.Module):
        """Linear on (batch, sequence, features) -> MatMul + Add; a dilated strided Conv1d; LogSoftmax."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 8)
            self.conv = nn.Conv1d(8, 4, 3, stride=2, dilation=2, padding=2)
            self.head = nn.Linear(4 * 5, 3)

        def forward(self, x):
            h = torch.tanh(self.proj(x))                     # (N, 10, 8)
            h = torch.tanh(self.conv(h.transpose(1, 2)))     # (N, 4, 5)
            return torch.log_softmax(self.head(h.flatten(1)), dim=-1)

    class TwoHeads(nn.Module):
        """Two outputs: an embedding and the logits."""

        def __init__(self):
            super().__init__()
            self.body = nn.Linear(10, 12)
            self.emb = nn.Linear(12, 4)
            self.cls = nn.Linear(12, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.emb(h), self.cls(h)

    def settle(model, x):
        """Give BatchNorm running statistics that are not the identity, then switch to eval."""
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x + 0.3 * torch.randn_like(x))
        return model.eval()

    cnn, seq, heads = Cnn(), Seq(), TwoHeads()
    x_img, x_seq, x_vec = torch.randn(4, 3, 8, 8), torch.randn(4, 10, 6), torch.randn(4, 10)
    settle(cnn, x_img)
    seq.eval()
    heads.eval()
    dyn = {0: "batch"}
    jobs = [
        ("torch_legacy_cnn.onnx", cnn, x_img, dict(dynamo=False, opset_version=17),
         "legacy exporter, eval: Conv+BN fused into the Conv, depthwise Conv, 1x1 Conv, Gemm + BatchNormalization, Softmax"),
        ("torch_legacy_cnn_preserve.onnx", cnn, x_img,
         dict(dynamo=False, opset_version=13, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False),
         "legacy exporter, TrainingMode.PRESERVE: a bias-less Conv followed by a separate BatchNormalization"),
        ("torch_legacy_opset9.onnx", cnn, x_img, dict(dynamo=False, opset_version=9), "legacy exporter at opset 9 (old IR)"),
        ("torch_legacy_seq.onnx", seq, x_seq, dict(dynamo=False, opset_version=17),
         "legacy exporter: Linear on 3-D input as MatMul + Add, dilated strided Conv1d, LogSoftmax"),
        ("torch_legacy_two_outputs.onnx", heads, x_vec,
         dict(dynamo=False, opset_version=17, output_names=["embedding", "logits"]),
         "two graph outputs (the first float output is protected by default)"),
        ("torch_dynamo_cnn.onnx", cnn, x_img, dict(dynamo=True), "dynamo exporter (opset 18+, IR 10)"),
        ("torch_dynamo_seq.onnx", seq, x_seq, dict(dynamo=True), "dynamo exporter: 3-D Linear, Conv1d, LogSoftmax"),
    ]
    for name, model, x, options, covers in jobs:
        path = OUT / name
        if options.get("dynamo"):
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        optimize=True)
            program.save(str(path))
        else:
            outputs = options.pop("output_names", ["out"])
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=outputs,
                              dynamic_axes={"x": dyn, **{o: dyn for o in outputs}}, **options)
        record(name, version + (" (dynamo)" if options.get("dynamo") else " (legacy TorchScript exporter)"), covers)
    half = Cnn()
    settle(half, x_img)
    half = half.half()
    torch.onnx.export(half, (x_img.half(),), str(OUT / "torch_legacy_cnn_fp16.onnx"), input_names=["x"],
                      output_names=["out"], dynamic_axes={"x": dyn, "out": dyn}, dynamo=False, opset_version=17)
    record("torch_legacy_cnn_fp16.onnx", version + " (legacy TorchScript exporter)", "float16 weights and input")


def sklearn_fixtures() -> None:
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(x, y)
    version = f"skl2onnx {skl2onnx.__version__}, scikit-learn {sklearn.__version__}"
    for name, options, covers in [
        ("skl2onnx_mlp_zipmap.onnx", None, "label output first, probabilities through ZipMap (ai.onnx.ml), Softmax"),
        ("skl2onnx_mlp_nozipmap.onnx", {id(clf): {"zipmap": False}}, "label output first, probability tensor second"),
    ]:
        onx = to_onnx(clf, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
        (OUT / name).write_bytes(onx.SerializeToString())
        record(name, version, covers)


def handmade_fixtures() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    version = f"onnx.helper {onnx.__version__}"

    def init(name, shape, scale=0.3, dtype=np.float32):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(dtype), name)

    def save(model, name, covers):
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, OUT / name)
        record(name, version + " (hand-built)", covers)

    # tf2onnx-style: NHWC input, Transposes around the Conv, weight through Identity, bias as a separate Add
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Identity", ["conv/kernel"], ["conv/kernel:0"], name="conv/kernel/read"),
        helper.make_node("Conv", ["nchw", "conv/kernel:0"], ["conv/Conv2D"], name="conv/Conv2D", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv/Conv2D", "conv/bias"], ["conv/BiasAdd"], name="conv/BiasAdd"),
        helper.make_node("Relu", ["conv/BiasAdd"], ["conv/Relu"], name="conv/Relu"),
        helper.make_node("Transpose", ["conv/Relu"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense/kernel"], ["dense/MatMul"], name="dense/MatMul"),
        helper.make_node("Add", ["dense/bias", "dense/MatMul"], ["dense/BiasAdd"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["dense/BiasAdd"], ["probabilities"], name="dense/Softmax", axis=-1),
    ]
    inits = [init("conv/kernel", (6, 2, 3, 3)), init("conv/bias", (1, 6, 1, 1)), init("dense/kernel", (5 * 5 * 6, 4), 0.1),
             init("dense/bias", (4,)), numpy_helper.from_array(np.array([-1, 150], np.int64), "flat_shape")]
    graph = helper.make_graph(nodes, "tf2onnx_style",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__1", 5, 5, 2])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["unk__1", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx-style")
    model.ir_version = 7
    save(model, "handmade_tf2onnx_style.onnx",
         "tf2onnx patterns: NHWC Transposes, Conv weight through Identity, bias as a (1, C, 1, 1) Add, "
         "MatMul + Add(bias, x), Softmax")

    # constructs that cannot be pruned, each to be named: shared weight, weight produced by a node,
    # ConvTranspose (on a second output: onnxruntime-training has no ConvTransposeGrad kernel, so no
    # gradient can pass through it); plus one prunable Gemm so that the model can be pruned (Gemm
    # transA=1 is in onnx's own node tests, see tests/test_corpus.py)
    nodes = [
        helper.make_node("Gemm", ["x", "shared"], ["a"], name="uses_shared_1", transB=1),
        helper.make_node("Gemm", ["x", "shared"], ["b"], name="uses_shared_2", transB=1),
        helper.make_node("Add", ["a", "b"], ["ab"], name="sum"),
        helper.make_node("Gemm", ["ab", "plain"], ["c"], name="plain_gemm", transB=1),
        helper.make_node("ConstantOfShape", ["wshape"], ["made"], name="make_weight",
                         value=numpy_helper.from_array(np.array([0.1], np.float32))),
        helper.make_node("MatMul", ["c", "made"], ["d"], name="produced_weight"),
        helper.make_node("Reshape", ["d", "img"], ["d4"], name="to_image"),
        helper.make_node("ConvTranspose", ["d4", "deconv"], ["out"], name="deconv"),
    ]
    inits = [init("shared", (6, 5)), init("plain", (6, 6)), numpy_helper.from_array(np.array([6, 6], np.int64), "wshape"),
             init("deconv", (1, 1, 2, 2)), numpy_helper.from_array(np.array([-1, 1, 2, 3], np.int64), "img")]
    graph = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 6]),
                               helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, "handmade_unsupported.onnx",
         "shared weights, a weight made by ConstantOfShape, ConvTranspose: each skipped with its reason")


def main(argv: list[str]) -> int:
    groups = {"torch": torch_fixtures, "sklearn": sklearn_fixtures, "handmade": handmade_fixtures}
    wanted = argv or list(groups)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        groups[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
