"""Values of nodes computed from constants alone, by onnx's reference runtime: a Constant node's
tensor in whichever attribute it is given, one node's output on constant inputs. The ops it
evaluates are those exporters compute shapes and scalars with."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper

EVALUATED = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Sqrt", "Div", "Mul", "Add", "Sub", "Neg",
             "Reciprocal", "Pow", "Transpose", "Gather", "Slice", "ConstantOfShape", "Range", "Exp", "Log", "Floor",
             "Ceil", "Abs", "Max", "Min", "Erf", "Tanh", "Sigmoid", "Expand", "Tile", "Equal", "Where", "Not", "Less",
             "Greater", "Softplus", "Flatten"}
LARGEST = 1 << 16  # entries of a value computed here: shapes and scalars, not weights


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a Constant node holds, in whichever attribute it is given."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value = helper.get_attribute_value(attr)
            return np.asarray(value, np.float32 if "float" in attr.name else np.int64)
    return None


def evaluate_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray:
    """One node's first output on constant inputs, by onnx's reference runtime."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{k}" if i else "" for k, i in enumerate(node.input)]
    copy = helper.make_node(node.op_type, names, ["out"], domain=node.domain)
    copy.attribute.extend(node.attribute)
    feeds: dict[str, np.ndarray] = {n: v for n, v in zip(names, inputs) if n and v is not None}
    graph = helper.make_graph([copy], "constant", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                                 v.shape) for n, v in feeds.items()],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)])
    small = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # log(0) in a mask's constants is -inf, as intended
        warnings.simplefilter("ignore")
        outputs: list = list(ReferenceEvaluator(small).run(None, feeds))
    return np.asarray(outputs[0])
