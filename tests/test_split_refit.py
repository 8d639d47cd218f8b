"""Structured pruning in steps of a layer split into several unit groups (YOLOv8's C2f cv1): its
rows per unit for the scores and the dense rows its kept units hold for the refit."""
import numpy as np
from couplings import feeds
from test_couplings import c2f

import onnxprune
from onnxprune import runtime


def test_a_split_layer_is_refit_on_the_dense_rows_of_the_units_both_halves_kept():
    model = c2f(stem=True)
    data = feeds(model, {"N": 64})
    result = onnxprune.prune_structured(model, data, sparsity=0.5, multiple=1, steps=2, refit=True, seed=0)
    groups = result.summary["groups"]
    kept = {name: groups[name]["units_after"] for name in ("stem", "cv1[0]", "cv1[1]")}
    assert kept["stem"] < 8 and kept["cv1[0]"] != kept["cv1[1]"]  # cv1 refit, its halves of unequal size
    assert "cv1" in {r.layer for r in result.refits}
    x = {"x": data["x"][:8]}
    (y,) = runtime.make_session(result.model).run(None, x)
    (dense,) = runtime.make_session(model).run(None, x)
    assert np.all(np.isfinite(y)) and np.linalg.norm(y - dense) < np.linalg.norm(dense)
