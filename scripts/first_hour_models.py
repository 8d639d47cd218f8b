"""The newcomer's own models for scripts/first_hour.sh: a small torch CNN and a scikit-learn MLP, both
trained on scikit-learn's digits (8x8 images, shipped with scikit-learn: nothing is downloaded) and
exported to ONNX by their own exporters, plus the newcomer's arrays as .npy files.

    EXPORTER_PYTHON scripts/first_hour_models.py OUT_DIR     # a Python with torch, onnxscript, scikit-learn, skl2onnx

Writes OUT_DIR/digits_cnn.onnx (torch.onnx.export), OUT_DIR/digits_mlp.onnx (skl2onnx) and
OUT_DIR/{x_train,y_train,x_test,y_test}.npy (images as (N, 1, 8, 8) float32 in [0, 1]).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

SEED = 0


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y.astype(np.int64), test_size=500, random_state=SEED,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


def torch_cnn(x_train: np.ndarray, y_train: np.ndarray, path: Path) -> None:
    """Conv 16 -> ReLU -> Conv 32 -> ReLU -> MaxPool -> Linear 64 -> ReLU -> Linear 10, Adam, 40 epochs."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(40):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def sklearn_mlp(x_train: np.ndarray, y_train: np.ndarray, path: Path) -> None:
    """MLPClassifier(64, 32), exported with skl2onnx (probabilities as a tensor, not a ZipMap)."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    flat = x_train.reshape(len(x_train), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=SEED).fit(flat, y_train)
    onx = to_onnx(clf, flat[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits()
    for name, array in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        np.save(out / f"{name}.npy", array)
    torch_cnn(x_train, y_train, out / "digits_cnn.onnx")
    sklearn_mlp(x_train, y_train, out / "digits_mlp.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
