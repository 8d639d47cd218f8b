"""Loading and saving ONNX models: corrupt files, external data and atomic writes in one place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import InputError
from .fileio import check_output_path
from .storage import check_sparse, check_storage, densify, sparsify

PROTOBUF_LIMIT = 2**31 - 2**20  # serialized protos above ~2 GB must keep tensors outside the file


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model with its external data; a one-line InputError for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{path} is not an ONNX model (no graph nodes)")
    if len(model.graph.sparse_initializer):
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise InputError(f"{path} fails onnx.checker: {_first_line(exc)}") from None
        try:
            densify(model)  # as onnxruntime does at load; --storage sparse writes them sparse again
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"{path}: cannot read its sparse initializers ({_first_line(exc)})") from None
    if uses_external_data(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
        model.metadata_props.add(key=_EXTERNAL_MARK, value="1")
    try:
        onnx.checker.check_model(model if model.ByteSize() < PROTOBUF_LIMIT else str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{path} fails onnx.checker: {_first_line(exc)}") from None
    _check_element_types(model, path)
    return model


def _check_element_types(model: onnx.ModelProto, path: Path) -> None:
    """Every initializer, graph input and output has an element type onnx knows (the checker lets an
    unknown number through, and everything after it would fail on it)."""
    graph = model.graph
    typed = [(t.name, t.data_type) for t in graph.initializer] + [
        (vi.name, vi.type.tensor_type.elem_type) for vi in [*graph.input, *graph.output]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type]
    for name, elem in typed:
        try:
            onnx.helper.tensor_dtype_to_np_dtype(elem)
        except (KeyError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has an element type ({elem}) onnx does not know") from None


_EXTERNAL_MARK = "onnxprune.loaded_external_data"


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)
    )


def had_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was loaded from a file that kept its tensors outside the .onnx file."""
    return any(p.key == _EXTERNAL_MARK for p in model.metadata_props)


def save_model(model: onnx.ModelProto, path: str | Path, *, force: bool = False, inputs=(), external_data: bool | None = None,
               storage: str = "dense") -> Path:
    """Write ``model`` atomically; tensors go to ``<name>.data`` when the input had them outside or
    the model exceeds protobuf's 2 GB limit. Refuses to overwrite an input, or any file without force.
    ``storage="sparse"`` stores initializers as sparse initializers where that is smaller (see
    ``onnxprune.storage``: it saves disk only; onnxruntime expands them at load)."""
    path = check_output_path(path, force=force, inputs=inputs)
    check_storage(storage)
    if external_data is None:
        external_data = had_external_data(model)
    model = _without_mark(model)
    if storage == "sparse":
        model, converted = sparsify(model)
        if converted:
            check_sparse(model)
    external_data = external_data or model.ByteSize() >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    if external_data:
        check_output_path(path.parent / data_name, force=force, inputs=inputs)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = workdir / path.name
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(workdir / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def _without_mark(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without our bookkeeping metadata (save_as_external_data also mutates its argument)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [p for p in copy.metadata_props if p.key != _EXTERNAL_MARK]
    del copy.metadata_props[:]
    copy.metadata_props.extend(keep)
    return copy


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
