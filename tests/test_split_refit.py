"""Structured pruning in steps of a layer split into several unit groups (YOLOv8's C2f cv1): its
rows per unit for the scores and the dense rows its kept units hold for the refit."""
import numpy as np
from couplings import Graph, feeds
from onnx import helper
from test_couplings import silu

import onnxprune
from onnxprune import runtime


def c2f_after_stem():
    """stem -> SiLU -> C2f (cv1 split in halves, each half its own unit group): cv1 reads the stem's
    units, so it is refit, and its two halves keep different counts."""
    g = Graph()
    s = silu(g, g.conv("x", "stem", 2, 8), "act0")
    a = silu(g, g.conv(s, "cv1", 8, 8), "act1")
    g.nodes.append(helper.make_node("Split", [a, g.const("halves", [4, 4], np.int64)], ["y0", "y1"], name="split", axis=1))
    inner = silu(g, g.conv("y1", "m.cv1", 4, 4, k=3, pads=1), "m.act1")
    m = g.add("Add", ["y1", silu(g, g.conv(inner, "m.cv2", 4, 4, k=3, pads=1), "m.act2")], "m")
    out = silu(g, g.conv(g.add("Concat", ["y0", "y1", m], "cat", axis=1), "cv2", 12, 6), "act2")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [out], "gap")], "flat"), g.w("fc.w", 3, 6)], "fc", "y", transB=1)
    return g.model(["N", 2, 5, 5], "y", ["N", 3])


def test_a_split_layer_is_refit_on_the_dense_rows_of_the_units_both_halves_kept():
    model = c2f_after_stem()
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
