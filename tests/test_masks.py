import numpy as np
import pytest

from onnxprune.errors import CheckFailed, InputError
from onnxprune.find.layers import Layer
from onnxprune.select.masks import choose_masks


def layer(name, out, inp):
    return Layer(name=name, op="Gemm", node=name, weight=f"{name}.weight", bias=None, input="x", preact=name,
                 out_features=out, in_features=inp, transposed=False)


LAYERS = [layer("fc1", 3, 4), layer("fc2", 2, 3)]


def test_global_threshold_prunes_the_exact_count_of_lowest_scores():
    rng = np.random.default_rng(0)
    scores = {"fc1": rng.random((3, 4)), "fc2": rng.random((2, 3))}
    masks = choose_masks(LAYERS, scores, 0.5)
    assert sum(m.sum() for m in masks.values()) == 9  # round(0.5 * 18)
    pruned = np.concatenate([scores[k][masks[k]] for k in scores])
    kept = np.concatenate([scores[k][~masks[k]] for k in scores])
    assert pruned.max() <= kept.min()


def test_ties_are_broken_in_graph_then_row_major_order():
    scores = {"fc1": np.zeros((3, 4)), "fc2": np.zeros((2, 3))}
    masks = choose_masks(LAYERS, scores, 7 / 18)
    assert masks["fc1"].ravel().tolist() == [True] * 7 + [False] * 5
    assert not masks["fc2"].any()


def test_layer_scope_and_exclusions():
    scores = {"fc1": np.arange(12.0).reshape(3, 4), "fc2": np.arange(6.0).reshape(2, 3)}
    masks = choose_masks(LAYERS, scores, 0.5, scope="layer")
    assert masks["fc1"].sum() == 6 and masks["fc2"].sum() == 3
    masks = choose_masks(LAYERS, scores, 0.5, exclude=["fc2*"])
    assert not masks["fc2"].any() and masks["fc1"].sum() == 6
    with pytest.raises(InputError, match="match no prunable layer"):
        choose_masks(LAYERS, scores, 0.5, exclude=["nothing"])


@pytest.mark.parametrize("sparsity", [-0.1, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(InputError):
        choose_masks(LAYERS, {"fc1": np.zeros((3, 4)), "fc2": np.zeros((2, 3))}, sparsity)


def test_nan_scores_are_refused():
    with pytest.raises(CheckFailed):
        choose_masks(LAYERS, {"fc1": np.full((3, 4), np.nan), "fc2": np.zeros((2, 3))}, 0.5)
