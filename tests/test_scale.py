"""The fast statistics path: the split gradient graph gives the tiled graph's rows, float32 products
with a shift keep float64 accuracy, and thread limits apply."""
import numpy as np
import pytest

from onnxprune.derivatives.engines.ort_training import OutputJacobians
from onnxprune.derivatives.statistics import LayerStatistics, collect_statistics
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output
from onnxprune.io.data import Dataset
from onnxprune.prepare.shapes import output_shape
from onnxprune.runtime import blas_threads

from engines import requires_training
from tinyconv import cnn, images, sequence_mlp
from tinynets import data, mlp

MODELS = {
    "mlp": lambda: (mlp((5, 4, 4, 3), activation="relu")[0], data(9)["x"]),
    "matmul": lambda: (mlp((5, 4, 4, 3), pattern="matmul_left")[0], data(9)["x"]),
    "cnn-maxpool": lambda: (cnn(groups=2, pool=True), images(9)["x"]),
    "cnn-batchnorm": lambda: (cnn(bias="none", batchnorm=True), images(9)["x"]),
    "sequence": lambda: (sequence_mlp(), np.random.default_rng(0).normal(size=(9, 4, 5)).astype(np.float32)),
}


@requires_training
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("probes", [None, 4])
def test_split_gradient_is_used_and_gives_the_tiled_rows(name, probes):
    model, x = MODELS[name]()
    layers = analyse_graph(model).layers
    output = protected_output(model)
    shape = output_shape(model, output, {"x": x})
    jac = OutputJacobians(model, layers, output, int(np.prod(shape)), probes=probes, seed=5)
    rows, inputs = jac.rows({"x": x}, shape)
    assert jac.split is not None, "the forward pass should run once per sample, not once per probe"
    twin = OutputJacobians(model, layers, output, int(np.prod(shape)), probes=probes, seed=5)
    twin._build({"x": x})
    twin.split = None
    want, want_inputs = twin.rows({"x": x}, shape)
    for layer in layers:
        np.testing.assert_allclose(rows[layer.name], want[layer.name], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(inputs[layer.name]), np.asarray(want_inputs[layer.name]))


def test_float32_products_keep_the_residual_when_the_mean_dwarfs_the_spread():
    """A - B^2/C (ECP's G-weighted variance) from float32 batches matches float64 numpy although
    |E z| is 10^4 times std z, where unshifted float32 sums would leave only rounding noise."""
    rng = np.random.default_rng(0)
    layer = analyse_graph(mlp((6, 3))[0]).layers[0]
    stats = LayerStatistics.zeros(layer)
    zs, gs = [], []
    for _ in range(5):
        z = (1000.0 + 0.1 * rng.normal(size=(64, 6))).astype(np.float32)
        g = rng.uniform(0.5, 2.0, size=(64, 3)).astype(np.float32)
        stats.add(g, z)
        zs.append(z.astype(np.float64))
        gs.append(g.astype(np.float64))
    z, g = np.concatenate(zs), np.concatenate(gs)
    a, b, c = g.T @ z**2 / len(z), g.T @ z / len(z), g.mean(0)
    mean = b / c[:, None]
    residual = (g.T @ (z**2) - 2 * mean * (g.T @ z) + mean**2 * g.sum(0)[:, None]) / len(z)  # A - B^2/C
    exact = np.stack([(g[:, i:i + 1] * (z - (g[:, i] @ z / g[:, i].sum())) ** 2).mean(0) for i in range(3)])
    np.testing.assert_allclose(residual, exact, rtol=1e-6)
    np.testing.assert_allclose(stats.A, a, rtol=1e-9)
    np.testing.assert_allclose(stats.B, b, rtol=1e-9)
    np.testing.assert_allclose(stats.C, c, rtol=1e-6)
    np.testing.assert_allclose(stats.A - stats.B**2 / stats.C[:, None], exact, rtol=1e-3)
    np.testing.assert_allclose(stats.mean_z, z.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.var_z, z.var(0), rtol=1e-3)


def test_blas_threads_limits_numpy_inside_and_restores_it():
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with blas_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


def test_statistics_do_not_depend_on_the_thread_count():
    model, _, _ = mlp((5, 8, 3))
    x = Dataset({"x": data(50)["x"]})
    layers = analyse_graph(model).layers
    one = collect_statistics(model, layers, x, "a1", threads=1)
    two = collect_statistics(model, layers, x, "a1", threads=2)
    for name in one:
        np.testing.assert_allclose(one[name].A, two[name].A, rtol=1e-5)
