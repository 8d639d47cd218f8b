"""Train the paper's MNIST MLPs, a small CNN, a residual CNN and a small transformer and write them with their data subsets.

    .venv/bin/python scripts/train_models.py --mnist ../shared/data/mnist --out models/ [--seed 0] [--epochs 15]
        [--hidden 64,64 [--hidden 32,32 ...]] [--cnn-epochs 8] [--resnet-epochs 4] [--transformer-epochs 8]
        [--only resnet,transformer] [--force]

Writes models/mnist_mlp.onnx (784-64-64-10; other sizes as mnist_mlp_<h1>_<h2>...onnx),
models/mnist_cnn.onnx (Conv-ReLU-MaxPool x2, then Gemm layers; --cnn-epochs 0 skips it),
models/mnist_resnet.onnx (``zoo.build_resnet``) and models/mnist_transformer.onnx
(``zoo.build_transformer``; --resnet-epochs / --transformer-epochs 0 skip them),
models/mnist_calib.npz (2048 training images), models/mnist_test.npz (the 10k test set) and
models/README.md. ``--only resnet,transformer`` trains just those and leaves every other file alone
but the README's block about them. MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.io import files as fileio
from onnxprune.repair.finetune import finetune
from onnxprune.runtime import make_session

from studies.mnist import load_mnist
from studies.provenance import portable_path
from studies.zoo import build_mlp, build_mobilenet, build_resnet, build_silu_cnn, build_transformer, build_vit, widths_argument

CNN_FILE = "mnist_cnn.onnx"
CNN_ARCHITECTURE = ("x[784] -> 1x28x28 -> conv1 8@5x5 -> ReLU -> MaxPool 2 -> conv2 16@5x5 -> ReLU -> MaxPool 2 -> "
                    "256 -> fc1 64 -> ReLU -> fc2 10")
INPUT_SCALE = 1 / 255
CALIB_SIZE = 2048
DEFAULT_HIDDEN = (64, 64)
LR, BATCH = 1e-3, 128
ATTRIBUTION = "MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0."
# models trained beside the shipped ones: file, builder, gradient engine, architecture
EXTRA = {
    "resnet": ("mnist_resnet.onnx", build_resnet, "auto",
               "x[784] -> 1x28x28 -> stem Conv 16@3x3 -> ReLU -> MaxPool 2 (14x14) -> block1: s + block1b(ReLU(block1a(s))) "
               "-> ReLU -> down2 Conv 32@3x3 stride 2 -> ReLU (7x7) -> block2: s + block2b(ReLU(block2a(s))) -> ReLU "
               "-> GlobalAveragePool -> Flatten -> fc Gemm 10 (every Conv 3x3, pad 1, with bias; no BatchNormalization)"),
    # onnxruntime-training's LayerNormalization gradient wants the optional Mean/InvStdDev outputs
    # the exported graph does not have; onnx-ad differentiates it as it is
    "transformer": ("mnist_transformer.onnx", build_transformer, "adjoint",
                    "x[784] -> 16 patches of 7x7 -> embed MatMul+Add 49->64 + learnt position (16x64) -> 2 pre-norm "
                    "encoder blocks (LayerNormalization -> 4-head self-attention, head size 16, Q/K/V/O MatMul+Add, "
                    "Reshape (N, 16, 4, 16) + Transpose per head split -> residual Add; LayerNormalization -> FFN "
                    "MatMul+Add 64->128 -> ReLU -> MatMul+Add 128->64 -> residual Add) -> LayerNormalization -> "
                    "ReduceMean over patches -> head Gemm 10"),
    # the structured-pruning speed study's architectures: SiLU, depthwise + squeeze-excitation + HardSwish, GELU
    "silu_cnn": ("mnist_silu_cnn.onnx", build_silu_cnn, "auto",
                 "x[784] -> 1x28x28 -> conv1 Conv 16@3x3 pad 1 -> SiLU -> MaxPool 2 -> conv2 Conv 32@3x3 pad 1 -> SiLU -> "
                 "MaxPool 2 -> Flatten (1568) -> fc1 Gemm 64 -> SiLU -> fc2 Gemm 10 (SiLU written x * Sigmoid(x))"),
    "mobilenet": ("mnist_mobilenet.onnx", build_mobilenet, "auto",
                  "x[784] -> 1x28x28 -> stem Conv 16@3x3 stride 2 -> HardSwish (14x14) -> 3 inverted residual blocks "
                  "(out, expanded, stride) = (16, 48, 1), (24, 72, 2), (24, 72, 1): expand Conv 1x1 -> HardSwish -> "
                  "depthwise Conv 3x3 -> HardSwish -> squeeze-excitation (GlobalAveragePool -> Conv 1x1 to expanded/4 -> "
                  "ReLU -> Conv 1x1 -> HardSigmoid -> Mul) -> project Conv 1x1 (+ the block's input in blocks 1 and 3) "
                  "-> head Conv 1x1 96 -> HardSwish -> GlobalAveragePool -> Flatten -> fc Gemm 10 (HardSwish written "
                  "x * HardSigmoid(x); no BatchNormalization)"),
    "vit": ("mnist_vit.onnx", build_vit, "adjoint",
            "the transformer above (16 patches of 7x7, width 64, 2 pre-norm blocks, 4 heads of 16, FFN 128) with GELU "
            "in the FFN written x * 0.5 * (1 + Erf(x / sqrt 2)), as torch's exporter writes it"),
}
INITS = {"resnet": "Conv weights Kaiming-uniform (±sqrt(6/fan_in)), Conv biases and the Gemm uniform in ±1/sqrt(fan_in)",
         "silu_cnn": "Conv weights Kaiming-uniform (±sqrt(6/fan_in)), Conv biases and the Gemms uniform in ±1/sqrt(fan_in)",
         "mobilenet": "Conv weights Kaiming-uniform (±sqrt(6/fan_in)), Conv biases and the Gemm uniform in ±1/sqrt(fan_in)"}


def markers(name: str) -> tuple[str, str]:
    """The README block of one EXTRA model, replaced alone by a run that trains it."""
    return f"<!-- train_models:{name}:start -->", f"<!-- train_models:{name}:end -->"


def model_filename(hidden) -> str:
    if hidden == "cnn":
        return CNN_FILE
    return "mnist_mlp.onnx" if hidden == DEFAULT_HIDDEN else "mnist_mlp_" + "_".join(map(str, hidden)) + ".onnx"


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    """The MNIST CNN, initialised like PyTorch (Conv2d and Linear: weights and biases uniform in
    +-1/sqrt(fan_in)). It takes the flat 784-pixel rows the MLP takes (a Reshape inside), so both
    models share the data files."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def param(name, shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, size=shape).astype(np.float32), name))

    param("conv1.weight", (8, 1, 5, 5), 25)
    param("conv1.bias", (8,), 25)
    param("conv2.weight", (16, 8, 5, 5), 200)
    param("conv2.bias", (16,), 200)
    param("fc1.weight", (64, 256), 256)
    param("fc1.bias", (64,), 256)
    param("fc2.weight", (10, 64), 64)
    param("fc2.bias", (10,), 64)
    inits.append(numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "image_shape"))
    make = helper.make_node
    nodes = [
        make("Reshape", ["x", "image_shape"], ["image"], name="to_image"),
        make("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1.out"], name="conv1", kernel_shape=[5, 5]),
        make("Relu", ["conv1.out"], ["relu1.out"], name="relu1"),
        make("MaxPool", ["relu1.out"], ["pool1.out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        make("Conv", ["pool1.out", "conv2.weight", "conv2.bias"], ["conv2.out"], name="conv2", kernel_shape=[5, 5]),
        make("Relu", ["conv2.out"], ["relu2.out"], name="relu2"),
        make("MaxPool", ["relu2.out"], ["pool2.out"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        make("Flatten", ["pool2.out"], ["flat"], name="flatten"),
        make("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1", transB=1),
        make("Relu", ["fc1.out"], ["relu3.out"], name="relu3"),
        make("Gemm", ["relu3.out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(nodes, "mnist_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxprune.train_models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def stamp(model: onnx.ModelProto, doc: str) -> None:
    """How the model was made, its input scale and data set, checked."""
    model.doc_string = doc
    onnx.helper.set_model_props(model, {"onnxprune.input_scale": repr(INPUT_SCALE), "onnxprune.dataset": "MNIST"})
    onnx.checker.check_model(model, full_check=True)


def train_cnn(x, y, args) -> tuple[onnx.ModelProto, list[dict], float]:
    print(f"training the CNN ({args.cnn_epochs} epochs)", file=sys.stderr)
    began = time.perf_counter()
    model, history = finetune(build_cnn(args.seed), x, y, epochs=args.cnn_epochs, lr=LR, batch_size=BATCH,
                              seed=args.seed, progress=print_progress)
    seconds = time.perf_counter() - began
    stamp(model, (
        f"CNN {CNN_ARCHITECTURE}, PyTorch-style init with seed {args.seed}, trained on the 60,000 MNIST training "
        f"images scaled to [0,1] for {args.cnn_epochs} epochs with Adam (lr {LR}, batch {BATCH}, shuffle seed "
        f"{args.seed}) by scripts/train_models.py on onnxruntime-training (no torch). Feed uint8 pixels (N, 784) "
        f"times onnxprune.input_scale. {ATTRIBUTION}"
    ))
    return model, history, seconds


def train_extra(name: str, x, y, epochs: int, args) -> tuple[onnx.ModelProto, list[dict], float]:
    """One of the EXTRA models, trained on (x, y) with the shipped models' recipe."""
    filename, build, engine, arch = EXTRA[name]
    print(f"training {filename} ({epochs} epochs)", file=sys.stderr)
    began = time.perf_counter()
    model, history = finetune(build(seed=args.seed), x, y, epochs=epochs, lr=LR, batch_size=BATCH, seed=args.seed,
                              progress=print_progress, engine=engine)
    seconds = time.perf_counter() - began
    trainer = "onnx-ad's reverse mode (the adjoint engine)" if engine == "adjoint" else "onnxruntime-training"
    stamp(model, (
        f"{name} {arch}, initialised as studies.zoo.build_{name} says with seed {args.seed}, trained on the "
        f"{'first ' + format(len(x), ',') + ' of the ' if len(x) < 60000 else ''}60,000 MNIST training images "
        f"scaled to [0,1] for {epochs} epochs with Adam (lr {LR}, batch {BATCH}, shuffle seed {args.seed}) by "
        f"scripts/train_models.py with {trainer} (no torch). Feed uint8 pixels (N, 784) times "
        f"onnxprune.input_scale. {ATTRIBUTION}"
    ))
    return model, history, seconds


def extra_readme(args, name, model, history, seconds, metrics, out: Path) -> str:
    """The README block about one EXTRA model."""
    import onnxruntime

    filename, _, engine, arch = EXTRA[name]
    start, end = markers(name)
    lines = [start, "", f"## {filename}", "", f"Made by `scripts/train_models.py` (onnxruntime "
             f"{onnxruntime.__version__}, no torch) with:", "", "```", command_line(args, only=name), "```", ""]
    init = INITS.get(name, "Weights and biases uniform in ±1/sqrt(fan_in) (PyTorch's default), "
                     "LayerNormalization scale 1 and bias 0, position embedding normal(0, 0.02)")
    images = (f"the first {args.train_images:,} of the 60,000 training images" if args.train_images
              else "all 60,000 training images")
    lines.append(f"- `{filename}` (`studies.zoo.build_{name}`): {arch}. {init}; seed {args.seed}; input `x` "
                 "float32 [N, 784], output `logits` [N, 10], opset 17, "
                 f"IR 8. Trained like the MLP ({images}, Adam lr {LR}, batch {BATCH}) with the "
                 f"`{engine}` gradient engine of `onnxprune.finetune`"
                 + (" (onnxruntime-training's LayerNormalization gradient needs optional outputs the graph does "
                    "not have)." if engine == "adjoint" else "."))
    lines += ["", "| file | parameters | training time | final train loss | test loss | test accuracy | bytes |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    loss, accuracy = metrics
    count = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    lines.append(f"| {filename} | {count:,} | {seconds:.1f} s | {history[-1]['loss']:.4f} | {loss:.4f} | "
                 f"{100 * accuracy:.2f}% | {(out / filename).stat().st_size:,} |")
    lines += ["", "Training time: wall time of `finetune` on this project's shared 2-core machine (other jobs running). "
              "Per-epoch training losses: " + ", ".join(f"{e['loss']:.4f}" for e in history) + ".", "", end]
    return "\n".join(lines)


def flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 images, scaled as the metadata says."""
    logits = make_session(model).run(["logits"], {"x": x.astype(np.float32) * np.float32(INPUT_SCALE)})[0].astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


def print_progress(epoch: int, batch: int, n_batches: int, loss: float) -> None:
    if batch == n_batches:
        print(f"  epoch {epoch}: train loss {loss:.4f}", file=sys.stderr)


def train_one(hidden, x, y, args) -> tuple[onnx.ModelProto, list[dict], float]:
    architecture = "-".join(map(str, (784, *hidden, 10)))
    print(f"training {architecture} ({args.epochs} epochs)", file=sys.stderr)
    began = time.perf_counter()
    model, history = finetune(
        build_mlp(hidden, seed=args.seed), x, y, epochs=args.epochs, lr=LR, batch_size=BATCH, seed=args.seed,
        progress=print_progress
    )
    seconds = time.perf_counter() - began
    stamp(model, (
        f"MLP {architecture} (Gemm layers fc1.., one PReLU slope per hidden layer), PyTorch-style init with "
        f"seed {args.seed}, trained on the 60,000 MNIST training images scaled to [0,1] for {args.epochs} epochs "
        f"with Adam (lr {LR}, batch {BATCH}, shuffle seed {args.seed}) by scripts/train_models.py on "
        f"onnxruntime-training (no torch). Feed uint8 pixels times onnxprune.input_scale. {ATTRIBUTION}"
    ))
    return model, history, seconds


def command_line(args, only: str | None = None) -> str:
    """The command that reproduces this run (``only``: that EXTRA model alone), paths relative to the
    working directory."""
    parts = [".venv/bin/python", "scripts/train_models.py", "--mnist", portable_path(str(args.mnist)),
             "--out", os.path.relpath(args.out) + "/"]
    parts += ["--seed", str(args.seed)]
    if only is None:
        parts += ["--epochs", str(args.epochs)]
        for hidden in args.hidden:
            parts += ["--hidden", ",".join(map(str, hidden))]
        parts += ["--cnn-epochs", str(args.cnn_epochs)]
        for name in EXTRA:
            parts += [f"--{name.replace('_', '-')}-epochs", str(extra_epochs(args, name))]
    else:
        parts += [f"--{only.replace('_', '-')}-epochs", str(extra_epochs(args, only)), "--only", only]
        if args.train_images:
            parts += ["--train-images", str(args.train_images)]
    return shlex.join(parts)


def extra_epochs(args, name: str) -> int:
    return getattr(args, f"{name}_epochs")


def architecture(hidden) -> str:
    return "CNN (see above)" if hidden == "cnn" else "-".join(map(str, (784, *hidden, 10)))


def readme(args, results, out: Path) -> str:
    """models/README.md: provenance, settings, measured numbers and file sizes."""
    import onnxruntime

    lines = [
        "# Models",
        "",
        "Made by `scripts/train_models.py` (onnxruntime-training-cpu "
        f"{onnxruntime.__version__}, no torch) with:",
        "",
        "```",
        command_line(args),
        "```",
        "",
        "## Architecture and training",
        "",
        "- MLP with Gemm layers `fc1`, `fc2`, ... (`transB=1`, initializers `fcN.weight` (out, in) and `fcN.bias`), "
        "a PReLU after each hidden layer with one shared slope (`preluN.weight`, init 0.25, as `torch.nn.PReLU()`); "
        "input `x` float32 [N, 784], output `logits` float32 [N, 10]; opset 17, IR 8.",
        f"- Weights and biases initialised uniform in ±1/sqrt(fan_in) like `torch.nn.Linear`, numpy generator seed {args.seed}.",
        f"- Trained on all 60,000 MNIST training images, pixels scaled to [0, 1] (uint8 times float32(1/255), as "
        f"the metadata says), {args.epochs} epochs, "
        f"Adam (lr {LR}, betas 0.9/0.999, eps 1e-8, no weight decay), batch {BATCH}, cross-entropy, "
        f"shuffled with `np.random.default_rng({args.seed})` (`onnxprune.repair.finetune.finetune`, one intra-op thread).",
        f"- CNN `{CNN_FILE}`: input `x` float32 [N, 784] (the same rows as the MLP, reshaped inside to [N, 1, 28, 28]), "
        "`conv1` 8@5x5 (valid) -> ReLU -> MaxPool 2x2 -> `conv2` 16@5x5 -> ReLU -> MaxPool 2x2 -> Flatten (256) -> "
        "`fc1` Gemm 64 -> ReLU -> `fc2` Gemm 10 -> `logits`; 20,424 prunable weights (200 + 3,200 in the Convs, "
        "16,384 + 640 in the Gemms); opset 17, IR 8. Conv and Gemm weights and biases uniform in ±1/sqrt(fan_in) "
        f"(PyTorch's default), seed {args.seed}; trained like the MLP for {args.cnn_epochs} epochs.",
        "- Metadata: `onnxprune.input_scale` = `0.00392156862745098` (1/255: multiply the uint8 pixels by it), "
        "`onnxprune.dataset` = `MNIST`; the doc_string says how the model was made.",
        "",
        "## Results (dense model, 10,000 MNIST test images, onnxruntime CPU)",
        "",
        "| file | architecture | training time | final train loss | test loss (mean cross-entropy) | test accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for hidden, history, seconds, (loss, accuracy) in results:
        lines.append(
            f"| {model_filename(hidden)} | {architecture(hidden)} | {seconds:.1f} s | "
            f"{history[-1]['loss']:.4f} | {loss:.4f} | {100 * accuracy:.2f}% |"
        )
    lines += [
        "",
        "Training time is the wall time of `finetune` on this project's 2-core machine; per-epoch training losses: "
        + "; ".join(f"{model_filename(h)}: " + ", ".join(f"{e['loss']:.4f}" for e in hist) for h, hist, _, _ in results)
        + ".",
        "",
        "## Files",
        "",
        "| file | bytes | content |",
        "| --- | --- | --- |",
    ]
    for hidden, *_ in results:
        what = "the trained CNN" if hidden == "cnn" else "the trained model"
        lines.append(f"| {model_filename(hidden)} | {(out / model_filename(hidden)).stat().st_size:,} | {what} |")
    lines += [
        f"| mnist_calib.npz | {(out / 'mnist_calib.npz').stat().st_size:,} | {CALIB_SIZE} training images chosen with "
        f"`np.random.default_rng({args.seed}).choice(60000, {CALIB_SIZE}, replace=False)`, sorted: `x` uint8 "
        f"({CALIB_SIZE}, 784), `y` int64 |",
        f"| mnist_test.npz | {(out / 'mnist_test.npz').stat().st_size:,} | the full MNIST test set: `x` uint8 "
        "(10000, 784), `y` int64 |",
        "",
        "## Data licence",
        "",
        "MNIST is by Yann LeCun and Corinna Cortes and is distributed under the Creative Commons "
        "Attribution-Share Alike 3.0 licence (CC BY-SA 3.0). `mnist_calib.npz` and `mnist_test.npz` are derived "
        "from it (a subset of the training images and the test images, flattened, unchanged pixel values) and are "
        "shared under the same licence.",
        "",
    ]
    return "\n".join(lines)


def with_block(text: str, name: str, block: str) -> str:
    """``text`` with the block of EXTRA model ``name`` replaced by ``block`` (appended when it has none)."""
    start, end = markers(name)
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def old_block(text: str, name: str) -> str | None:
    start, end = markers(name)
    return start + text.split(start, 1)[1].split(end, 1)[0] + end if start in text and end in text else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, type=Path, help="folder with the four original MNIST .gz files")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=widths_argument, action="append", help="hidden sizes, e.g. 32,32; "
                                                                                "repeatable (default 64,64)")
    parser.add_argument("--cnn-epochs", type=int, default=8, help="epochs for the CNN (0: do not train it)")
    parser.add_argument("--resnet-epochs", type=int, default=4, help="epochs for the residual CNN (0: do not train it)")
    parser.add_argument("--transformer-epochs", type=int, default=8, help="epochs for the transformer (0: do not train it)")
    for name in ("silu_cnn", "mobilenet", "vit"):
        parser.add_argument(f"--{name.replace('_', '-')}-epochs", type=int, default=0,
                            help=f"epochs for {EXTRA[name][0]} (0, the default: do not train it)")
    parser.add_argument("--train-images", type=int, default=0,
                        help="--only: train on the first N training images (0: all of them)")
    parser.add_argument("--only", default=None, metavar="resnet,transformer,...",
                        help=f"train only these of {', '.join(EXTRA)}; no other file but their README block is written")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    args.hidden = args.hidden or [DEFAULT_HIDDEN]
    extras = [name for name in EXTRA if extra_epochs(args, name) > 0]
    if args.only is not None:
        asked = [name for name in args.only.split(",") if name]
        unknown = [name for name in asked if name not in EXTRA]
        if unknown or not asked:
            parser.error(f"--only takes some of {', '.join(EXTRA)}, got {args.only!r}")
        extras = asked
        for name in asked:  # an --only run records its epochs; 0 would train nothing
            if extra_epochs(args, name) < 1:
                parser.error(f"--only {name} needs --{name}-epochs >= 1")
        names = [EXTRA[name][0] for name in extras]
    else:
        names = [model_filename(h) for h in args.hidden] + ([CNN_FILE] if args.cnn_epochs > 0 else []) + \
            [EXTRA[name][0] for name in extras] + ["mnist_calib.npz", "mnist_test.npz"]
    paths = {name: fileio.check_output_path(args.out / name, force=args.force) for name in names}
    readme_path = args.out / "README.md"
    if args.only is None:
        fileio.check_output_path(readme_path, force=args.force)
    train_x, train_y = load_mnist(args.mnist, "train")
    test_x, test_y = load_mnist(args.mnist, "test")
    train_x, test_x = flat(train_x), flat(test_x)
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    scaled = train_x.astype(np.float32) * np.float32(INPUT_SCALE)

    blocks = {}
    subset = slice(0, args.train_images or None) if args.only is not None else slice(None)
    for name in extras:
        model, history, seconds = train_extra(name, scaled[subset], train_y[subset], extra_epochs(args, name), args)
        metrics = evaluate(model, test_x, test_y)
        print(f"  {EXTRA[name][0]}: test loss {metrics[0]:.4f}, accuracy {100 * metrics[1]:.2f}%, {seconds:.1f} s",
              file=sys.stderr)
        fileio.write_bytes(paths[EXTRA[name][0]], model.SerializeToString())
        blocks[name] = extra_readme(args, name, model, history, seconds, metrics, args.out)
    old = readme_path.read_text() if readme_path.exists() else "# Models\n"
    if args.only is not None:
        for name, block in blocks.items():
            old = with_block(old, name, block)
        fileio.write_text(readme_path, old)
        return 0

    results = []
    for hidden in args.hidden:
        model, history, seconds = train_one(hidden, scaled, train_y, args)
        metrics = evaluate(model, test_x, test_y)
        print(f"  {model_filename(hidden)}: test loss {metrics[0]:.4f}, accuracy {100 * metrics[1]:.2f}%, {seconds:.1f} s",
              file=sys.stderr)
        fileio.write_bytes(paths[model_filename(hidden)], model.SerializeToString())
        results.append((hidden, history, seconds, metrics))
    if args.cnn_epochs > 0:
        model, history, seconds = train_cnn(scaled, train_y, args)
        metrics = evaluate(model, test_x, test_y)
        print(f"  {CNN_FILE}: test loss {metrics[0]:.4f}, accuracy {100 * metrics[1]:.2f}%, {seconds:.1f} s", file=sys.stderr)
        fileio.write_bytes(paths[CNN_FILE], model.SerializeToString())
        results.append(("cnn", history, seconds, metrics))

    calib = np.sort(np.random.default_rng(args.seed).choice(len(train_x), CALIB_SIZE, replace=False))
    fileio.write_with(paths["mnist_calib.npz"], lambda tmp: np.savez_compressed(tmp, x=train_x[calib], y=train_y[calib]))
    fileio.write_with(paths["mnist_test.npz"], lambda tmp: np.savez_compressed(tmp, x=test_x, y=test_y))
    text = readme(args, results, args.out)
    for name in EXTRA:  # a model not retrained keeps its block
        block = blocks.get(name) or old_block(old, name)
        text = with_block(text, name, block) if block else text
    fileio.write_text(readme_path, text)
    return 0


if __name__ == "__main__":
    from onnxprune.errors import run_script

    run_script(main)
