"""Loading and saving ONNX models: corrupt files, external data and atomic writes in one place.

A model's external data files are inputs like the model file itself (``note_inputs``: no output
replaces them), and they are read only from inside the model's folder: a location that resolves
elsewhere (through a symlinked folder or file) is refused unless the user allows it
(``allow_external_data_outside``, the CLI's ``--allow-external-data-outside``)."""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxprune.errors import InputError, first_line
from onnxprune.io.files import DATA_SUFFIX, Outputs, note_inputs, usual_mode
from onnxprune.io.storage import check_sparse, check_storage, densify, sparsify

PROTOBUF_LIMIT = 2**31 - 2**20  # serialized protos above ~2 GB must keep tensors outside the file
DEFAULT_DOMAINS = ("", "ai.onnx")

_outside_allowed = contextvars.ContextVar("external_data_outside_allowed", default=False)


@contextlib.contextmanager
def allow_external_data_outside(allowed: bool = True) -> Iterator[None]:
    """Within the block, models may read external data that resolves outside their folder."""
    token = _outside_allowed.set(allowed)
    try:
        yield
    finally:
        _outside_allowed.reset(token)


def load_model(path: str | Path, allow_outside: bool | None = None) -> onnx.ModelProto:
    """Read an ONNX model with its external data; a one-line InputError for anything unreadable.
    ``allow_outside``: read external data that resolves outside the model's folder (default: as
    ``allow_external_data_outside`` says, else no)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable ONNX model ({first_line(exc)})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InputError(f"{path} is not an ONNX model (no graph nodes)")
    _check_opsets(model, path)
    _check_node_names(model, path)
    if len(model.graph.sparse_initializer):
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise InputError(f"{path} fails onnx.checker: {first_line(exc)}") from None
        try:
            densify(model)  # as onnxruntime does at load; --storage sparse writes them sparse again
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"{path}: cannot read its sparse initializers ({first_line(exc)})") from None
    if uses_external_data(model):
        files = _load_external_data(model, path, _outside_allowed.get() if allow_outside is None else allow_outside)
        model.metadata_props.add(key=_EXTERNAL_MARK, value=json.dumps(files))
    try:
        onnx.checker.check_model(str(path) if _oversized(model) else model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{path} fails onnx.checker: {first_line(exc)}") from None
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


def _check_opsets(model: onnx.ModelProto, path: Path) -> None:
    """The default domain's opset is one the installed onnx knows: the meaning of an op at a later
    opset (99) is unknown, and analysing it at the last known one would guess."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and opset.version > newest:
            raise InputError(f"{path} imports opset {opset.version} of the default domain; the installed onnx "
                             f"{onnx.__version__} knows opsets up to {newest}")


def _check_node_names(model: onnx.ModelProto, path: Path) -> None:
    """No two nodes of the main graph share a name: onnxruntime refuses such a model."""
    repeated = [name for name, count in Counter(n.name for n in model.graph.node if n.name).items() if count > 1]
    if repeated:
        raise InputError(f"{path}: {len(repeated)} node name(s) are used by several nodes ({repeated[0]!r} first); "
                         "onnxruntime refuses such models: give every node its own name")


def _load_external_data(model: onnx.ModelProto, path: Path, allow_outside: bool) -> list[str]:
    """Read every external tensor's data into the model, from files that resolve inside the model's
    folder (unless ``allow_outside``); the files read, which become inputs of the running command."""
    folder = os.path.realpath(path.parent)
    files: dict[str, str] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        where = os.path.join(path.parent, location)
        real = os.path.realpath(where)
        if location and os.path.commonpath([folder, real]) != folder and not os.path.isabs(location) \
                and ".." not in Path(location).parts and not allow_outside:
            raise InputError(f"{path}: the external data of tensor {tensor.name!r} ({location}) resolves to {real}, "
                             f"outside the model's folder; pass --allow-external-data-outside if you trust it")
        base = str(path.parent)
        if location and real != os.path.abspath(where) and os.path.isfile(real):
            for entry in tensor.external_data:  # read the file the symlinks lead to, where it is
                if entry.key == "location":
                    entry.value = os.path.basename(real)
            base = os.path.dirname(real)
        try:
            external_data_helper.load_external_data_for_tensor(tensor, base)
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise InputError(f"{path}: cannot read its external data ({first_line(exc)})") from None
        files.setdefault(real, os.path.abspath(where))
    note_inputs([path, *files.values()], f"the external data of {path}")
    return sorted(files.values())


_EXTERNAL_MARK = "onnxprune.loaded_external_data"  # its value: the external data files read (JSON)


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)
    )


def had_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` was loaded from a file that kept its tensors outside the .onnx file."""
    return any(p.key == _EXTERNAL_MARK for p in model.metadata_props)


def external_data_sources(model: onnx.ModelProto) -> list[Path]:
    """The external data files ``model`` was loaded from (none when it had its tensors inside)."""
    for p in model.metadata_props:
        if p.key == _EXTERNAL_MARK:
            with contextlib.suppress(ValueError, TypeError):
                return [Path(f) for f in json.loads(p.value)]
    return []


def save_model(model: onnx.ModelProto, path: str | Path, *, force: bool = False, inputs=(), external_data: bool | None = None,
               storage: str = "dense") -> Path:
    """Write ``model`` atomically; tensors go to ``<name>.data`` when the input had them outside or
    the model exceeds protobuf's 2 GB limit. Refuses to overwrite an input, or any file without force.
    ``storage="sparse"`` stores initializers as sparse initializers where that is smaller (see
    ``onnxprune.io.storage``: it saves disk only; onnxruntime expands them at load)."""
    with Outputs(inputs, force) as outputs:
        path = stage_model(model, path, outputs, external_data=external_data, storage=storage)
    return path


def stage_model(model: onnx.ModelProto, path: str | Path, outputs: Outputs, *, external_data: bool | None = None,
                storage: str = "dense") -> Path:
    """Claim ``path`` (and ``path.data`` when tensors go outside) in ``outputs`` and stage the model's
    files there; they appear when ``outputs`` commits."""
    outputs.add_inputs(external_data_sources(model), "the external data the model was read from")
    path = outputs.claimed_or_claim(path)
    check_storage(storage)
    if external_data is None:
        external_data = had_external_data(model)
    model = _without_mark(model)
    if storage == "sparse":
        model, converted = sparsify(model)
        if converted:
            check_sparse(model)
    external_data = external_data or _oversized(model)
    if not external_data:
        outputs.stage(path, lambda tmp: onnx.save_model(model, str(tmp)))
        return path
    data_path = outputs.claim(path.parent / (path.name + DATA_SUFFIX))
    workdir = outputs.scratch_folder(path)
    # onnx.save_model(save_as_external_data=True) looks for an existing data file relative to the
    # working directory, and keeps tensors under 1 KB inside; we mark every tensor with raw data
    # ourselves and write them into the scratch folder, which is then renamed into place.
    for tensor in external_data_helper._get_initializer_tensors(model):
        if tensor.HasField("raw_data"):
            external_data_helper.set_external_data(tensor, data_path.name)
    external_data_helper.write_external_data_tensors(model, str(workdir))
    onnx.save_model(model, str(workdir / path.name))
    if (workdir / data_path.name).exists():
        usual_mode(workdir / data_path.name)  # onnx makes it 0600; the .onnx beside it gets the umask's mode
        outputs.stage_file(workdir / data_path.name, data_path)
    outputs.stage_file(workdir / path.name, path)
    return path


def _oversized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is over protobuf's limit; without ByteSize, which fails above 2 GB."""
    return serialized_size(model) >= PROTOBUF_LIMIT


def serialized_size(model: onnx.ModelProto) -> int:
    """An upper bound of ``model``'s serialized size that never serializes more than the graph's
    structure: the tensors' raw bytes are counted by their lengths."""
    tensors = [t for t in external_data_helper._get_all_tensors(model) if t.HasField("raw_data")]
    raw = sum(len(t.raw_data) for t in tensors)
    if raw < PROTOBUF_LIMIT // 2:
        return model.ByteSize()
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for t in external_data_helper._get_all_tensors(skeleton):
        t.ClearField("raw_data")
    return skeleton.ByteSize() + raw + 16 * len(tensors)


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


def as_model(model) -> onnx.ModelProto:
    """``model`` itself when it is a ModelProto, else the model loaded from that path."""
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(model)
