"""Train the paper's MNIST MLPs with onnxruntime-training and write them with their data subsets.

    .venv/bin/python scripts/train_models.py --mnist ../shared/data/mnist --out models/ [--seed 0] [--epochs 15]
        [--hidden 64,64 [--hidden 32,32 ...]] [--force]

Writes models/mnist_mlp.onnx (784-64-64-10; other sizes as mnist_mlp_<h1>_<h2>...onnx),
models/mnist_calib.npz (2048 training images), models/mnist_test.npz (the 10k test set) and
models/README.md. MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
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

from onnxprune import fileio
from onnxprune.errors import OnnxPruneError
from onnxprune.finetune import finetune
from onnxprune.mnist import load_mnist
from onnxprune.runtime import make_session
from onnxprune.zoo import build_mlp

INPUT_SCALE = 1 / 255
CALIB_SIZE = 2048
DEFAULT_HIDDEN = (64, 64)
LR, BATCH = 1e-3, 128
ATTRIBUTION = "MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0."


def model_filename(hidden: tuple[int, ...]) -> str:
    return "mnist_mlp.onnx" if hidden == DEFAULT_HIDDEN else "mnist_mlp_" + "_".join(map(str, hidden)) + ".onnx"


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
        build_mlp(hidden, seed=args.seed), x, y, epochs=args.epochs, lr=LR, batch_size=BATCH, seed=args.seed, progress=print_progress
    )
    seconds = time.perf_counter() - began
    model.doc_string = (
        f"MLP {architecture} (Gemm layers fc1.., one PReLU slope per hidden layer), PyTorch-style init with "
        f"seed {args.seed}, trained on the 60,000 MNIST training images scaled to [0,1] for {args.epochs} epochs "
        f"with Adam (lr {LR}, batch {BATCH}, shuffle seed {args.seed}) by scripts/train_models.py on "
        f"onnxruntime-training (no torch). Feed uint8 pixels times onnxprune.input_scale. {ATTRIBUTION}"
    )
    onnx.helper.set_model_props(model, {"onnxprune.input_scale": repr(INPUT_SCALE), "onnxprune.dataset": "MNIST"})
    onnx.checker.check_model(model, full_check=True)
    return model, history, seconds


def command_line(args) -> str:
    """The command that reproduces this run, paths relative to the working directory."""
    parts = [".venv/bin/python", "scripts/train_models.py", "--mnist", os.path.relpath(args.mnist), "--out", os.path.relpath(args.out) + "/"]
    parts += ["--seed", str(args.seed), "--epochs", str(args.epochs)]
    for hidden in args.hidden:
        parts += ["--hidden", ",".join(map(str, hidden))]
    return shlex.join(parts)


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
        f"- Trained on all 60,000 MNIST training images, pixels scaled to [0, 1] (uint8 times float32(1/255), as the metadata says), {args.epochs} epochs, "
        f"Adam (lr {LR}, betas 0.9/0.999, eps 1e-8, no weight decay), batch {BATCH}, cross-entropy, "
        f"shuffled with `np.random.default_rng({args.seed})` (`onnxprune.finetune.finetune`, one intra-op thread).",
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
            f"| {model_filename(hidden)} | {'-'.join(map(str, (784, *hidden, 10)))} | {seconds:.1f} s | "
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
        lines.append(f"| {model_filename(hidden)} | {(out / model_filename(hidden)).stat().st_size:,} | the trained model |")
    lines += [
        f"| mnist_calib.npz | {(out / 'mnist_calib.npz').stat().st_size:,} | {CALIB_SIZE} training images chosen with "
        f"`np.random.default_rng({args.seed}).choice(60000, {CALIB_SIZE}, replace=False)`, sorted: `x` uint8 ({CALIB_SIZE}, 784), `y` int64 |",
        f"| mnist_test.npz | {(out / 'mnist_test.npz').stat().st_size:,} | the full MNIST test set: `x` uint8 (10000, 784), `y` int64 |",
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


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes like 64,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, type=Path, help="folder with the four original MNIST .gz files")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=hidden_sizes, action="append", help="hidden sizes, e.g. 32,32; repeatable (default 64,64)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    args.hidden = args.hidden or [DEFAULT_HIDDEN]

    names = [model_filename(h) for h in args.hidden] + ["mnist_calib.npz", "mnist_test.npz", "README.md"]
    paths = {name: fileio.check_output_path(args.out / name, force=args.force) for name in names}
    train_x, train_y = load_mnist(args.mnist, "train")
    test_x, test_y = load_mnist(args.mnist, "test")
    train_x, test_x = flat(train_x), flat(test_x)
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)

    results = []
    for hidden in args.hidden:
        model, history, seconds = train_one(hidden, train_x.astype(np.float32) * np.float32(INPUT_SCALE), train_y, args)
        metrics = evaluate(model, test_x, test_y)
        print(f"  {model_filename(hidden)}: test loss {metrics[0]:.4f}, accuracy {100 * metrics[1]:.2f}%, {seconds:.1f} s", file=sys.stderr)
        fileio.write_bytes(paths[model_filename(hidden)], model.SerializeToString())
        results.append((hidden, history, seconds, metrics))

    calib = np.sort(np.random.default_rng(args.seed).choice(len(train_x), CALIB_SIZE, replace=False))
    fileio.write_with(paths["mnist_calib.npz"], lambda tmp: np.savez_compressed(tmp, x=train_x[calib], y=train_y[calib]))
    fileio.write_with(paths["mnist_test.npz"], lambda tmp: np.savez_compressed(tmp, x=test_x, y=test_y))
    fileio.write_text(paths["README.md"], readme(args, results, args.out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OnnxPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
