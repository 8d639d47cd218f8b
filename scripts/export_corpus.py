"""Export the real-model corpus: real architectures written by their frameworks' own ONNX exporters, and
pretrained ONNX files that pip packages ship inside their wheels.

Each exporter lives in its own virtual environment (never the project's), so run this script once per
environment; every model whose exporter is importable there is written as OUT/NAME.onnx with a provenance
entry merged into OUT/MANIFEST.json (exporter and version, architecture, weights trained or random, input
shapes and how to make data for them). Models under --fixture-limit bytes are also copied, with their
entries, to tests/fixtures/real/ (the committed fixtures).

    ../exporters/torch/bin/python scripts/export_corpus.py --mnist MNIST_DIR  # torch, transformers, timm, skl2onnx, wheels
    ../exporters/tf/bin/python scripts/export_corpus.py --mnist MNIST_DIR     # tf2onnx (Keras), jax2tf

Trained models are fitted for a few seconds on MNIST (--mnist, the original IDX files); the rest have
seeded random weights. Nothing is downloaded at run time but the wheels named in WHEELS (through pip).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "real"
MODELS = {}          # name -> (exporter family, function)


def model(name: str, family: str):
    """Register one export; the function writes the file and returns its provenance entry."""
    def register(fn):
        MODELS[name] = (family, fn)
        return fn
    return register


def spec(name, shape, dtype="float32", **how):
    """One input: shape with "N" for the sample axis, dtype, and how corpus.py makes data for it
    (data="mnist" with layout, or random with low/high for integers, fill for a constant)."""
    return {"name": name, "shape": shape, "dtype": dtype, **how}


# ----------------------------------------------------------------------------------------------------- data
def mnist(split: str, n: int, directory: Path):
    """The first n images of a split as float32 in [0, 1], (n, 28, 28), with int64 labels."""
    path = ROOT / "scripts" / "studies" / "mnist.py"       # numpy-only reader; imported by path (no onnxprune install here)
    loader = importlib.util.spec_from_file_location("mnist_reader", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    x, y = module.load_mnist(directory, split)
    return (x[:n].astype(np.float32) / 255.0), y[:n].astype(np.int64)


# ---------------------------------------------------------------------------------------------------- torch
def torch_models():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MLP(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Linear(128, 10))

    class CNN(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    class WeightNormCNN(nn.Sequential):
        """Weight-normalised layers: the exporter writes the weight as g * v / ||v|| computed by nodes."""
        def __init__(self):
            wn = torch.nn.utils.parametrizations.weight_norm
            super().__init__(wn(nn.Conv2d(1, 8, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             wn(nn.Linear(8 * 14 * 14, 32)), nn.ReLU(), nn.Linear(32, 10))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        """ResNet-18's layout (2-2-2-2 basic blocks, BN, residual Adds); ImageNet stem or a 3x3 one."""
        def __init__(self, widths=(64, 128, 256, 512), in_ch=3, classes=1000, imagenet_stem=True):
            super().__init__()
            w0 = widths[0]
            if imagenet_stem:
                self.stem = nn.Sequential(nn.Conv2d(in_ch, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, 1))
            else:
                self.stem = nn.Sequential(nn.Conv2d(in_ch, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
            blocks, cin = [], w0
            for i, w in enumerate(widths):
                blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
                cin = w
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))

    class SqueezeExcite(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.reduce = nn.Conv2d(c, max(8, c // r), 1)
            self.expand = nn.Conv2d(max(8, c // r), c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cexp, cout, k, stride, se, act):
            super().__init__()
            act_layer = nn.Hardswish if act == "hs" else nn.ReLU
            self.use_res = stride == 1 and cin == cout
            layers = [nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), act_layer(),
                      nn.Conv2d(cexp, cexp, k, stride, k // 2, groups=cexp, bias=False), nn.BatchNorm2d(cexp),
                      act_layer()]
            if se:
                layers.append(SqueezeExcite(cexp))
            layers += [nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)

        def forward(self, x):
            y = self.body(x)
            return x + y if self.use_res else y

    class MobileNetV3(nn.Module):
        """MobileNetV3-Small's block pattern: depthwise separable inverted residuals, squeeze-excite with
        HardSigmoid, HardSwish activations, a HardSwish classifier head."""
        CONFIG = [(16, 16, 3, 2, True, "re"), (72, 24, 3, 2, False, "re"), (88, 24, 3, 1, False, "re"),
                  (96, 40, 5, 2, True, "hs"), (240, 40, 5, 1, True, "hs"), (120, 48, 5, 1, True, "hs"),
                  (288, 96, 5, 2, True, "hs"), (576, 96, 5, 1, True, "hs")]

        def __init__(self, in_ch=3, classes=1000, width=1.0, stem_stride=2, head=1024):
            super().__init__()
            def c(v):
                return max(8, int(v * width + 4) // 8 * 8)

            self.stem = nn.Sequential(nn.Conv2d(in_ch, c(16), 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c(16)),
                                      nn.Hardswish())
            blocks, cin = [], c(16)
            for exp, out, k, s, se, act in self.CONFIG:
                blocks.append(InvertedResidual(cin, c(exp), c(out), k, s, se, act))
                cin = c(out)
            self.blocks = nn.Sequential(*blocks)
            self.last = nn.Sequential(nn.Conv2d(cin, c(576), 1, bias=False), nn.BatchNorm2d(c(576)), nn.Hardswish())
            self.head = nn.Sequential(nn.Linear(c(576), head), nn.Hardswish(), nn.Linear(head, classes))

        def forward(self, x):
            return self.head(torch.flatten(F.adaptive_avg_pool2d(self.last(self.blocks(self.stem(x))), 1), 1))

    class Recurrent(nn.Module):
        """MNIST rows as a sequence of 28 steps into an LSTM or GRU; the last hidden state classified."""
        def __init__(self, kind):
            super().__init__()
            self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(28, 64, batch_first=True)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    class EncoderLayer(nn.Module):
        def __init__(self, d, heads, ff):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))

    class Transformer(nn.Module):
        """Pre-norm transformer encoder over the 28 rows of an MNIST image (tokens of 28 pixels)."""
        def __init__(self, d=64, heads=4, ff=128, depth=2):
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.randn(1, 28, d) * 0.02)
            self.layers = nn.Sequential(*[EncoderLayer(d, heads, ff) for _ in range(depth)])
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 10)

        def forward(self, x):
            return self.fc(self.norm(self.layers(self.embed(x) + self.pos)).mean(1))

    return dict(torch=torch, nn=nn, MLP=MLP, CNN=CNN, WeightNormCNN=WeightNormCNN, ResNet18=ResNet18,
                MobileNetV3=MobileNetV3, Recurrent=Recurrent, Transformer=Transformer)


_trained = {}


def train_mnist(key, make, layout, args, steps=None):
    """Adam on an MNIST subset (seeded; one pass over --train-samples images); memoised so the legacy and
    the dynamo export of an architecture are the same trained network."""
    if key in _trained:
        return _trained[key]
    import torch
    torch.set_num_threads(1)            # a shared 2-core machine: one thread per exporting process
    torch.manual_seed(args.seed)
    net = make()
    x, y = mnist("train", args.train_samples, args.mnist)
    x = torch.from_numpy(reshape(x, layout))
    y = torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    net.train()
    for i in range(0, len(x), 64):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = mnist("test", 2000, args.mnist)
    with torch.no_grad():
        acc = float((net(torch.from_numpy(reshape(xt, layout))).argmax(1) == torch.from_numpy(yt)).float().mean())
    _trained[key] = (net, acc)
    return net, acc


def reshape(x, layout):
    return {"NCHW": x[:, None], "NHWC": x[..., None], "flat": x.reshape(len(x), -1), "rows": x}[layout]


MNIST_SHAPES = {"NCHW": ["N", 1, 28, 28], "NHWC": ["N", 28, 28, 1], "flat": ["N", 784], "rows": ["N", 28, 28]}


def torch_export(net, example, path, dynamo, input_names, opset, **kw):
    import torch
    names = list(input_names)
    common = dict(input_names=names, output_names=["output"], opset_version=opset)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = tuple({0: batch} for _ in names)
        torch.onnx.export(net, example, str(path), dynamo=True, dynamic_shapes=shapes, external_data=False,
                          **common, **kw)
    else:
        axes = {n: {0: "batch"} for n in names + ["output"]}
        torch.onnx.export(net, example, str(path), dynamo=False, dynamic_axes=axes, **common, **kw)


def torch_mnist(name, arch, make, layout, dynamo, args, path, **kw):
    import torch
    net, acc = train_mnist(name, make, layout, args)
    example = (torch.zeros(*[2 if d == "N" else d for d in MNIST_SHAPES[layout]]),)
    torch_export(net, example, path, dynamo, ["input"], 18 if dynamo else 17, **kw)
    return {"architecture": arch, "weights": f"trained on MNIST ({args.train_samples} images, one epoch, "
                                             f"test accuracy {acc:.3f} on 2,000)",
            "inputs": [spec("input", MNIST_SHAPES[layout], data="mnist", layout=layout)], "trained": True}


def torch_random(name, arch, net, shape, dynamo, path, opset=17):
    import torch
    torch.manual_seed(0)
    net.eval()
    example = (torch.randn(*[2 if d == "N" else d for d in shape]),)
    torch_export(net, example, path, dynamo, ["input"], 18 if dynamo else opset)
    return {"architecture": arch, "weights": "random (seeded torch init)",
            "inputs": [spec("input", shape)], "trained": False}


for _dyn, _fam in ((False, "torch-legacy"), (True, "torch-dynamo")):
    _tag = "dynamo" if _dyn else "legacy"

    def _reg(dyn, fam, tag):
        @model(f"torch_{tag}_mlp", fam)
        def _mlp(args, path):
            m = torch_models()
            return torch_mnist("mlp", "MLP 784-256-128-10 (ReLU)", m["MLP"], "flat", dyn, args, path)

        @model(f"torch_{tag}_cnn", fam)
        def _cnn(args, path):
            m = torch_models()
            return torch_mnist("cnn", "CNN conv16-BN-ReLU-pool, conv32-BN-ReLU-pool, fc64, fc10", m["CNN"], "NCHW",
                               dyn, args, path)

        @model(f"torch_{tag}_resnet_mnist", fam)
        def _resnet(args, path):
            m = torch_models()
            return torch_mnist("resnet", "ResNet-18 layout, widths 16-32-64-128, 3x3 stem, BN, residual Adds",
                               lambda: m["ResNet18"]((16, 32, 64, 128), 1, 10, False), "NCHW", dyn, args, path)

        @model(f"torch_{tag}_mobilenetv3_mnist", fam)
        def _mobile(args, path):
            m = torch_models()
            return torch_mnist("mobilenet", "MobileNetV3-Small blocks (width 0.5, stride-1 stem), SE with "
                                            "HardSigmoid, HardSwish",
                               lambda: m["MobileNetV3"](1, 10, 0.5, 1, 256), "NCHW", dyn, args, path)

        @model(f"torch_{tag}_transformer_mnist", fam)
        def _transformer(args, path):
            m = torch_models()
            return torch_mnist("transformer", "pre-norm transformer encoder, 2 layers, d 64, 4 heads, LayerNorm, "
                                              "GELU, attention over 28 row tokens", m["Transformer"], "rows", dyn,
                               args, path)

        @model(f"torch_{tag}_lstm_mnist", fam)
        def _lstm(args, path):
            m = torch_models()
            return torch_mnist("lstm", "LSTM(28 -> 64) over 28 rows, Linear(64, 10) on the last step",
                               lambda: m["Recurrent"]("lstm"), "rows", dyn, args, path)

    _reg(_dyn, _fam, _tag)


@model("torch_legacy_gru_mnist", "torch-legacy")
def _gru(args, path):
    m = torch_models()
    return torch_mnist("gru", "GRU(28 -> 64) over 28 rows, Linear(64, 10) on the last step",
                       lambda: m["Recurrent"]("gru"), "rows", False, args, path)


@model("torch_legacy_cnn_weightnorm", "torch-legacy")
def _weightnorm(args, path):
    m = torch_models()
    return torch_mnist("weightnorm", "CNN with weight-normalised Conv and Linear (weights computed g*v/|v| "
                                     "by nodes, do_constant_folding=False)", m["WeightNormCNN"], "NCHW", False,
                       args, path, do_constant_folding=False)


@model("torch_legacy_cnn_params_as_inputs", "torch-legacy")
def _params_inputs(args, path):
    m = torch_models()
    return torch_mnist("cnn", "CNN (as torch_legacy_cnn), exported with keep_initializers_as_inputs=True",
                       m["CNN"], "NCHW", False, args, path, keep_initializers_as_inputs=True)


@model("torch_legacy_resnet18_224", "torch-legacy")
def _resnet224(args, path):
    m = torch_models()
    return torch_random("resnet18", "ResNet-18 (ImageNet layout, 11.7M parameters, 1000 classes)", m["ResNet18"](),
                        ["N", 3, 224, 224], False, path)


@model("torch_legacy_mobilenetv3_224", "torch-legacy")
def _mobile224(args, path):
    m = torch_models()
    return torch_random("mobilenetv3", "MobileNetV3-Small-like (width 1.0, 1000 classes)", m["MobileNetV3"](),
                        ["N", 3, 224, 224], False, path)


# ----------------------------------------------------------------------------------------------- transformers
def hf_export(net, inputs, path, names, dynamo=False):
    net.eval()
    torch_export(net, inputs, path, dynamo, names, 18 if dynamo else 17)


def logits_only(net, two_inputs=False):
    """The transformers model with one output, the logits (explicit arguments: torch.export maps dynamic
    shapes onto the signature)."""
    import torch

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).logits

    class Two(One):
        def forward(self, x, mask):
            return self.net(x, mask).logits
    return (Two if two_inputs else One)()


@model("hf_bert_tiny_classifier", "transformers")
def _bert(args, path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=2,
                                  attn_implementation="eager")
    net = logits_only(transformers.BertForSequenceClassification(cfg), two_inputs=True)
    ids = torch.randint(0, 1000, (2, 16))
    hf_export(net, (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"])
    return {"architecture": "BertForSequenceClassification (2 layers, hidden 64, 2 heads, vocab 1000, 2 labels)",
            "weights": "random (transformers init, seed 0)", "trained": False,
            "inputs": [spec("input_ids", ["N", 16], "int64", low=0, high=1000),
                       spec("attention_mask", ["N", 16], "int64", fill=1)]}


@model("hf_vit_tiny_classifier", "transformers")
def _vit(args, path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128, num_labels=10,
                                 attn_implementation="eager")
    net = logits_only(transformers.ViTForImageClassification(cfg))
    hf_export(net, (torch.randn(2, 3, 32, 32),), path, ["pixel_values"])
    return {"architecture": "ViTForImageClassification (32x32, patch 8, 2 layers, hidden 64, 10 labels)",
            "weights": "random (transformers init, seed 0)", "trained": False,
            "inputs": [spec("pixel_values", ["N", 3, 32, 32])]}


@model("hf_gpt2_tiny_lm", "hf-dynamo")
def _gpt2(args, path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                  attn_implementation="eager", use_cache=False)
    net = logits_only(transformers.GPT2LMHeadModel(cfg))
    hf_export(net, (torch.randint(0, 500, (2, 16)),), path, ["input_ids"], dynamo=True)   # legacy: no aten::diff
    return {"architecture": "GPT2LMHeadModel (2 layers, n_embd 64, 2 heads, vocab 500, tied embeddings; "
                            "logits 16 x 500 per sample)",
            "weights": "random (transformers init, seed 0)", "trained": False,
            "inputs": [spec("input_ids", ["N", 16], "int64", low=0, high=500)]}


# ------------------------------------------------------------------------------------------------------- timm
def timm_export(arch, path, size=224):
    import timm
    import torch
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=1000).eval()
    hf_export(net, (torch.randn(2, 3, size, size),), path, ["input"])
    params = sum(p.numel() for p in net.parameters())
    return {"architecture": f"timm {arch} ({params / 1e6:.1f}M parameters, 1000 classes, {size}x{size})",
            "weights": "random (timm init, seed 0)", "trained": False, "inputs": [spec("input", ["N", 3, size, size])]}


@model("timm_convnext_atto", "timm")
def _convnext(args, path):
    return timm_export("convnext_atto", path)


@model("timm_efficientnet_b0", "timm")
def _effnet(args, path):
    return timm_export("efficientnet_b0", path)


@model("timm_mobilenetv3_small_050", "timm")
def _timm_mobile(args, path):
    return timm_export("mobilenetv3_small_050", path)


# --------------------------------------------------------------------------------------------------- skl2onnx
def skl_mnist(est, args, path, name, zipmap):
    from skl2onnx import to_onnx
    x, y = mnist("train", 5000, args.mnist)
    x = x.reshape(len(x), -1)
    est.fit(x, y)
    xt, yt = mnist("test", 2000, args.mnist)
    acc = float((est.predict(xt.reshape(len(xt), -1)) == yt).mean())
    onx = to_onnx(est, x[:1], options={id(est): {"zipmap": zipmap}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return {"architecture": name, "trained": True, "inputs": [spec("X", ["N", 784], data="mnist", layout="flat")],
            "weights": f"trained on MNIST (5,000 images, test accuracy {acc:.3f} on 2,000)"}


@model("skl2onnx_mlp_classifier", "skl2onnx")
def _skl_mlp(args, path):
    from sklearn.neural_network import MLPClassifier
    return skl_mnist(MLPClassifier((64, 32), max_iter=30, random_state=0), args, path,
                     "MLPClassifier 784-64-32-10 (ReLU), ZipMap output", True)


@model("skl2onnx_logistic_regression", "skl2onnx")
def _skl_lr(args, path):
    from sklearn.linear_model import LogisticRegression
    return skl_mnist(LogisticRegression(max_iter=200), args, path, "LogisticRegression 784 -> 10 (no ZipMap)", False)


# ------------------------------------------------------------------------------------------------- tf2onnx
def keras_mnist(build, layout, args, path, name):
    import tensorflow as tf
    import tf2onnx
    tf.keras.utils.set_random_seed(args.seed)
    net = build(tf.keras)
    x, y = mnist("train", args.train_samples, args.mnist)
    net.compile(optimizer=tf.keras.optimizers.Adam(2e-3),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(reshape(x, layout), y, batch_size=64, epochs=1, verbose=0)
    xt, yt = mnist("test", 2000, args.mnist)
    acc = float((net.predict(reshape(xt, layout), verbose=0).argmax(1) == yt).mean())
    shape = [None] + MNIST_SHAPES[layout][1:]
    sig = (tf.TensorSpec(shape, tf.float32, name="input"),)
    fn = tf.function(lambda t: net(t, training=False))
    tf2onnx.convert.from_function(fn, input_signature=sig, opset=17, output_path=str(path))
    return {"architecture": name, "trained": True,
            "inputs": [spec("input", MNIST_SHAPES[layout], data="mnist", layout=layout)],
            "weights": f"trained on MNIST ({args.train_samples} images, one epoch, test accuracy {acc:.3f} on 2,000)"}


@model("tf2onnx_keras_mlp", "tf2onnx")
def _keras_mlp(args, path):
    return keras_mnist(lambda k: k.Sequential([k.Input((784,)), k.layers.Dense(256, activation="relu"),
                                               k.layers.Dense(128, activation="relu"), k.layers.Dense(10)]),
                       "flat", args, path, "Keras Sequential MLP 784-256-128-10")


@model("tf2onnx_keras_cnn", "tf2onnx")
def _keras_cnn(args, path):
    return keras_mnist(lambda k: k.Sequential([
        k.Input((28, 28, 1)), k.layers.Conv2D(16, 3, padding="same"), k.layers.BatchNormalization(),
        k.layers.ReLU(), k.layers.MaxPooling2D(), k.layers.Conv2D(32, 3, padding="same", activation="relu"),
        k.layers.MaxPooling2D(), k.layers.Flatten(), k.layers.Dense(64, activation="relu"), k.layers.Dense(10)]),
        "NHWC", args, path, "Keras Sequential CNN (NHWC) conv16-BN-ReLU-pool, conv32-pool, fc64, fc10")


def jax_mnist_mlp(args):
    """A JAX MLP 784-128-64-10 (GELU) trained by plain SGD for one pass; its forward function and accuracy."""
    import jax
    import jax.numpy as jnp
    key = jax.random.PRNGKey(args.seed)
    sizes = [784, 128, 64, 10]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (a, b)) * (2 / a) ** 0.5, jnp.zeros(b)))

    def forward(p, x):
        for w, b in p[:-1]:
            x = jax.nn.gelu(x @ w + b)
        return x @ p[-1][0] + p[-1][1]

    def loss(p, x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(forward(p, x)), y[:, None], 1))

    step = jax.jit(lambda p, x, y: jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p, x, y)))
    x, y = mnist("train", args.train_samples, args.mnist)
    x = x.reshape(len(x), -1)
    for i in range(0, len(x), 64):
        params = step(params, x[i:i + 64], y[i:i + 64])
    xt, yt = mnist("test", 2000, args.mnist)
    acc = float((np.asarray(forward(params, xt.reshape(len(xt), -1))).argmax(1) == yt).mean())
    frozen = jax.tree_util.tree_map(np.asarray, params)
    return (lambda t: forward(frozen, t)), acc


def jax_entry(args, acc, how):
    return {"architecture": f"JAX MLP 784-128-64-10 (GELU), {how}", "trained": True,
            "inputs": [spec("input", ["N", 784], data="mnist", layout="flat")],
            "weights": f"trained on MNIST ({args.train_samples} images, one epoch of SGD, test accuracy {acc:.3f})"}


@model("jax2tf_mlp", "jax2tf")
def _jax2tf(args, path):
    import tensorflow as tf
    import tf2onnx
    from jax.experimental import jax2tf
    fn, acc = jax_mnist_mlp(args)
    tf_fn = tf.function(jax2tf.convert(fn, native_serialization=False,
                                       polymorphic_shapes=["(b, 784)"]), autograph=False)
    sig = (tf.TensorSpec([None, 784], tf.float32, name="input"),)
    tf2onnx.convert.from_function(tf_fn, input_signature=sig, opset=17, output_path=str(path))
    return jax_entry(args, acc, "via jax2tf (non-native) and tf2onnx")


@model("jax2onnx_mlp", "jax2onnx")
def _jax2onnx(args, path):
    from jax2onnx import to_onnx
    fn, acc = jax_mnist_mlp(args)
    onx = to_onnx(fn, inputs=[("B", 784)], model_name="jax_mlp", opset=17)
    path.write_bytes(onx.SerializeToString())
    return jax_entry(args, acc, "via jax2onnx")


# ------------------------------------------------------------------------------------------- shipped in wheels
WHEELS = {
    "rapidocr-onnxruntime==1.4.4": "paddle2onnx (PaddleOCR, pretrained; shipped in rapidocr-onnxruntime 1.4.4)",
    "silero-vad==6.2.3": "torch (Silero VAD, pretrained; shipped in silero-vad 6.2.3)",
}


def from_wheel(requirement, member, path, architecture, inputs):
    cache = Path(tempfile.gettempdir()) / "onnxprune-corpus-wheels"
    cache.mkdir(exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), requirement],
                       check=True)
        wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    with zipfile.ZipFile(wheels[0]) as zf:
        path.write_bytes(zf.read(member))
    return {"architecture": architecture, "weights": "pretrained", "trained": True, "inputs": inputs,
            "wheel": wheels[0].name, "member": member, "exporter_override": WHEELS[requirement]}


def _ocr(name, member, arch, inputs):
    @model(name, "wheel")
    def _fn(args, path):
        return from_wheel("rapidocr-onnxruntime==1.4.4", f"rapidocr_onnxruntime/models/{member}", path, arch, inputs)


_ocr("ppocr_cls_mobile_v2", "ch_ppocr_mobile_v2.0_cls_infer.onnx",
     "PP-OCR text direction classifier (MobileNetV3 backbone, 2 classes, 48x192 crops)",
     [spec("x", ["N", 3, 48, 192])])
_ocr("ppocrv4_det", "ch_PP-OCRv4_det_infer.onnx", "PP-OCRv4 text detector (DB head, per-pixel map)",
     [spec("x", ["N", 3, 96, 96])])
_ocr("ppocrv4_rec", "ch_PP-OCRv4_rec_infer.onnx",
     "PP-OCRv4 text recognizer (SVTR-LCNet, CTC over 6,625 characters; 40 x 6,625 outputs at width 320)",
     [spec("x", ["N", 3, 48, 320])])


def _vad(name, member, arch, inputs):
    @model(name, "wheel")
    def _fn(args, path):
        return from_wheel("silero-vad==6.2.3", f"silero_vad/data/{member}", path, arch, inputs)


_VAD_INPUTS = [spec("input", ["N", 512]), spec("state", [2, "N", 128], fill=0.0), spec("sr", [], "int64", fill=16000)]
_vad("silero_vad", "silero_vad.onnx", "Silero VAD v5 (STFT conv front end, LSTM cell, If on the sample rate)",
     _VAD_INPUTS)
_vad("silero_vad_16k_op15", "silero_vad_16k_op15.onnx", "Silero VAD v5, 16 kHz only, opset 15", _VAD_INPUTS)


# ---------------------------------------------------------------------------------------------------- driver
def merge(manifest_path: Path, name: str, entry: dict | None):
    """Re-read and update one entry, so runs from several environments add to the same manifest."""
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if entry is None:
        manifest.pop(name, None)
    else:
        manifest[name] = entry
    if manifest or manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


FAMILY_MODULES = {"torch-legacy": ["torch"], "torch-dynamo": ["torch", "onnxscript"],
                  "transformers": ["torch", "transformers"], "hf-dynamo": ["torch", "transformers", "onnxscript"],
                  "timm": ["torch", "timm"],
                  "skl2onnx": ["skl2onnx", "sklearn"], "tf2onnx": ["tensorflow", "tf2onnx"],
                  "jax2tf": ["jax", "tensorflow", "tf2onnx"], "jax2onnx": ["jax", "jax2onnx"], "wheel": []}
VERSION_OF = {"torch-legacy": "torch", "torch-dynamo": "torch", "transformers": "transformers", "hf-dynamo": "transformers",
              "timm": "timm",
              "skl2onnx": "skl2onnx", "tf2onnx": "tf2onnx", "jax2tf": "jax", "jax2onnx": "jax2onnx"}


def available(family):
    return all(importlib.util.find_spec(m) is not None for m in FAMILY_MODULES[family])


def exporter_name(family, entry):
    if family == "wheel":
        return entry.pop("exporter_override")
    import importlib.metadata as md
    def v(module):
        return getattr(importlib.import_module(module), "__version__", None) or md.version(module)

    extra = {"torch-legacy": lambda: " (torch.onnx.export, dynamo=False)",
             "torch-dynamo": lambda: f" (torch.onnx.export, dynamo=True, onnxscript {v('onnxscript')})",
             "transformers": lambda: f" + torch {v('torch')} legacy export",
             "timm": lambda: f" + torch {v('torch')} legacy export",
             "hf-dynamo": lambda: f" + torch {v('torch')} dynamo export (onnxscript {v('onnxscript')})",
             "jax2tf": lambda: f" + tensorflow {v('tensorflow')} + tf2onnx {v('tf2onnx')}",
             "tf2onnx": lambda: f" + tensorflow {v('tensorflow')}",
             "jax2onnx": lambda: f" + jax {v('jax')}",
             "skl2onnx": lambda: f" + scikit-learn {v('sklearn')}"}[family]
    return f"{VERSION_OF[family]} {v(VERSION_OF[family])}{extra()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "corpus")
    ap.add_argument("--mnist", type=Path, required=True, help="folder with the original MNIST IDX files")
    ap.add_argument("--only", nargs="*", help="model names (default: every model whose exporter is installed)")
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixture-limit", type=int, default=2_000_000, help="bytes; smaller models become fixtures")
    ap.add_argument("--no-fixtures", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, (family, fn) in MODELS.items():
        if args.only and name not in args.only:
            continue
        if not available(family):
            print(f"skip {name}: {family} not installed in {sys.executable}")
            continue
        path = args.out / f"{name}.onnx"
        try:
            entry = fn(args, path)
        except Exception as exc:        # one model's exporter failure is recorded, the rest go on
            failed += 1
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            traceback.print_exc(limit=3)
            merge(args.out / "MANIFEST.json", name, {"family": family, "export_error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        entry = {"family": family, "exporter": exporter_name(family, entry), **entry, "bytes": path.stat().st_size}
        merge(args.out / "MANIFEST.json", name, entry)
        print(f"wrote {path} ({entry['bytes']:,} bytes): {entry['exporter']}")
        small = not args.no_fixtures and entry["bytes"] <= args.fixture_limit
        if small:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, FIXTURES / path.name)
        else:
            (FIXTURES / path.name).unlink(missing_ok=True)
        merge(FIXTURES / "MANIFEST.json", name, entry if small else None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
