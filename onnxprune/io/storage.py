"""How pruned weights are stored in the written file: dense, or as sparse initializers.

ONNX can keep an initializer as a ``SparseTensorProto`` in ``graph.sparse_initializer``: the non-zero
values and their int64 linear indices (COO; onnx.checker rejects any other index type). That costs
12 bytes per non-zero float32 instead of 4 bytes per weight, so it is smaller only above 2/3
sparsity; ``sparsify`` converts a tensor only where it is. It saves disk and download size, nothing
else: onnxruntime expands sparse initializers to dense tensors when it loads the model, so memory
and speed are those of the dense model, and a dense file compressed with zlib is usually smaller
still. ``storage_report`` gives the byte counts to decide with.
"""
from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputError
from onnxprune.io.files import available_memory

STORAGES = ("dense", "sparse")
SPARSE_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
MIN_IR_VERSION = 6  # sparse_initializer exists from IR 6 (ONNX 1.6) on


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise InputError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    return storage


def _sparse_size(nonzero: int, itemsize: int) -> int:
    return nonzero * (itemsize + 8)


def sparsify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose float initializers are stored as sparse initializers (values and
    int64 linear indices) where that takes fewer bytes; and the names of the converted tensors.

    Initializers that are also listed as graph inputs (overridable defaults) stay dense, and so does
    everything in a model stamped below IR 6, which has no sparse initializers.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.ir_version < MIN_IR_VERSION:
        return out, []
    graph = out.graph
    inputs = {vi.name for vi in graph.input}
    keep, converted = [], []
    for tensor in graph.initializer:
        if (tensor.data_type not in SPARSE_TYPES or tensor.name in inputs or not tensor.dims
                or tensor.data_location == TensorProto.EXTERNAL):
            keep.append(tensor)
            continue
        array = numpy_helper.to_array(tensor)
        flat = array.reshape(-1)
        indices = np.flatnonzero(flat)
        if _sparse_size(len(indices), array.itemsize) >= array.nbytes:
            keep.append(tensor)
            continue
        values = numpy_helper.from_array(flat[indices], tensor.name)
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, numpy_helper.from_array(indices.astype(np.int64), ""), list(tensor.dims)))
        converted.append(tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, converted


def check_sparse(model: onnx.ModelProto) -> None:
    """The sparse form passes onnx.checker and onnxruntime loads it; a CheckFailed otherwise.

    (onnx.checker's ``full_check`` runs shape inference, which does not accept a sparse
    initializer as an input of Gemm or MatMul; the plain check does, as onnxruntime does.)"""
    from onnxprune import runtime
    from onnxprune.errors import CheckFailed

    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckFailed(f"the sparse model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    try:
        runtime.make_session(model)
    except Exception as exc:  # onnxruntime's own exception types
        raise CheckFailed(f"onnxruntime cannot load the sparse model: {str(exc).splitlines()[0][:300]}") from None


def densify(model: onnx.ModelProto) -> list[str]:
    """Turn ``model``'s sparse initializers into ordinary ones, in place (what onnxruntime does at
    load), so that its layers can be read, pruned and trained; the names of the converted tensors."""
    graph = model.graph
    if not len(graph.sparse_initializer):
        return []
    _check_dense_size(graph.sparse_initializer)
    names = []
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(int(np.prod(dims)) if dims else 1, values.dtype)
        if indices.ndim == 2 and len(dims) > 1:
            indices = np.ravel_multi_index(tuple(indices.T), dims)
        try:
            dense[indices.reshape(-1)] = values.reshape(-1)
        except (IndexError, ValueError):
            raise InputError(f"sparse initializer {sparse.values.name!r} has indices outside its shape {list(dims)}") from None
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
        names.append(sparse.values.name)
    del graph.sparse_initializer[:]
    return names


def _check_dense_size(sparse_initializers) -> None:
    """Refuse before allocating when the dense tensors would not fit in memory (twice: the array and
    its serialized copy): a 65536 x 65536 sparse tensor of one value is a few bytes on disk and 16 GB
    dense."""
    total, largest = 0, ("", 0)
    for sparse in sparse_initializers:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(sparse.values.data_type).itemsize
        except (KeyError, ValueError):
            raise InputError(f"sparse initializer {sparse.values.name!r} has an element type "
                             f"({sparse.values.data_type}) onnx does not know") from None
        size = int(np.prod([int(d) for d in sparse.dims], dtype=object)) * itemsize
        total += size
        largest = max(largest, (sparse.values.name, size), key=lambda item: item[1])
    available = available_memory()
    if 2 * total > available:
        raise InputError(f"the sparse initializers expand to {total / 1e9:,.1f} GB of dense tensors ({largest[0]!r}: "
                         f"{largest[1] / 1e9:,.1f} GB), as onnxruntime and onnxprune read them; that needs more "
                         f"memory than the {available / 1e9:,.1f} GB available")


def storage_report(model: onnx.ModelProto, storage: str = "dense") -> dict:
    """Bytes of the serialized model stored dense and sparse, raw and zlib-compressed (level 6),
    the storage written and the tensors stored sparse."""
    check_storage(storage)
    dense = model.SerializeToString()
    sparse_model, converted = sparsify(model)
    sparse = sparse_model.SerializeToString()
    return {
        "storage": storage,
        "dense_bytes": len(dense), "dense_zlib_bytes": len(zlib.compress(dense, 6)),
        "sparse_bytes": len(sparse), "sparse_zlib_bytes": len(zlib.compress(sparse, 6)),
        "sparse_tensors": converted if storage == "sparse" else [],
        "written_bytes": len(sparse) if storage == "sparse" else len(dense),
    }
