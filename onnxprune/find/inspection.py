"""``inspect``: what onnxprune sees in a model before pruning it: prunable layers, skipped nodes with
their reasons, weights left unpruned, unit groups, the analysis copy and the runtime stamping."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.find.inventory import unpruned_weights
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output, protected_outputs, reaching
from onnxprune.find.patterns import detect_pattern
from onnxprune.graph import passes
from onnxprune.graph.index import FLOAT_TYPES, read_initializer
from onnxprune.io.data import model_inputs
from onnxprune.io.models import as_model
from onnxprune.prepare.analysis import AnalysisCopy


def inspect(model) -> dict:
    """Prunable layers with shapes and current sparsity, skipped nodes with reasons, model stamping."""
    model = as_model(model)
    analysis = AnalysisCopy.of(model)  # what prune analyses: Constants as initializers, shared ones unshared
    work = analysis.model
    found = analyse_graph(work)
    layers = []
    for layer in found.layers:
        w = read_initializer(work, layer.weight)
        rows = layer.to_rows(w)
        layers.append({"layer": layer.name, "op": layer.op, "kind": layer.kind, "weight": layer.weight, "bias": layer.bias,
                       "shape": [layer.out_features, layer.in_features], "dtype": str(w.dtype),
                       "weights": layer.size, "sparsity": float(np.count_nonzero(rows == 0) / w.size),
                       "pattern": detect_pattern(layer, rows)})
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    try:
        protected, every = protected_output(work), protected_outputs(work)
    except InputError:
        protected, every = None, []
    return {
        "ir_version": model.ir_version, "opsets": opsets, "producer": model.producer_name,
        "inputs": [vi.name for vi in model_inputs(model)], "outputs": [o.name for o in model.graph.output],
        "protected_output": protected, "protected_outputs": every, "layers": layers, "parameters": parameter_count(model),
        "skipped": [asdict(s) for s in found.skipped],
        "unpruned_weights": [asdict(s) for s in unpruned_weights(work, found)],
        "analysis_copy": analysis.notes,
        "units": _unit_groups(work, found.layers, every),
        "runtime_copy": model.ir_version > passes.MAX_IR_VERSION or any(
            v > passes.MAX_OPSET for d, v in opsets.items() if d == "ai.onnx"),
    }


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the main graph's float tensors (initializers, sparse ones at their dense shape,
    Constant nodes): all the weights that the prunable ones are a share of."""
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    dense = [t.dims for t in [*model.graph.initializer, *constants] if t.data_type in FLOAT_TYPES]
    sparse = [t.dims for t in model.graph.sparse_initializer if t.values.data_type in FLOAT_TYPES]
    return sum(int(np.prod(dims)) for dims in dense + sparse)


def _unit_groups(model: onnx.ModelProto, layers, protected: list[str]) -> dict:
    """inspect's section on structured pruning: the unit groups of the layers that reach the protected
    outputs (the ones ``prune --structured`` finds) and the layers whose units cannot go."""
    from onnxprune.find.units import find_units

    units = find_units(model, reaching(model, layers, protected)[0] if protected else layers)
    return {"groups": [g.to_dict() for g in units.groups], "rejected": [asdict(r) for r in units.rejected]}
