"""Loading and saving ONNX models.

Loads are lazy (onnx-ir keeps external data on disk until a tensor is read);
saves go to a temporary folder beside the target and are renamed into place, so a
failed save never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxpress import inline_weights
from onnxpress.errors import OnnxpressError

# Models above this size cannot be serialised into one protobuf (2 GiB limit).
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2
# Over the limit, initializers this large are kept out of the protobuf of an in-memory session.
EXTERNAL_MIN_BYTES = 1024
# Inline models from this size are compiled from a copy with their weights in a data file (``compile_input``).
INLINE_MAP_MIN_BYTES = 64 * 2**20
# The external data location those initializers are marked with (never written: the session gets the arrays).
IN_MEMORY_WEIGHTS = "onnxpress-in-memory-weights.bin"

# onnxruntime 1.31 (the newest we target) loads IR version 13 at most; onnx 1.23
# writes 14 by default. We write the lowest IR version the model's opsets need.
MAX_IR_VERSION = 13


def model_file(path: str | os.PathLike) -> Path:
    """``path``, or the one .onnx file in the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise OnnxpressError(
                f"{path} is a folder with {len(candidates)} .onnx files: pass the model file itself"
            )
        path = candidates[0]
    if not path.exists():
        raise OnnxpressError(f"{path} does not exist: check the model path")
    return path


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model lazily, with a one-line error for every bad-input case."""
    path = model_file(path)
    if path.stat().st_size == 0:
        raise OnnxpressError(f"{path} is empty: re-export or re-download the model")
    try:
        model = ir.load(path)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError, ValueError) as exc:
        raise OnnxpressError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: {type(exc).__name__}): "
            "re-export it or pass a .onnx file"
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise OnnxpressError(f"{path} holds no ONNX graph (not an ONNX file?): pass a .onnx model file")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.base_dir) / tensor.location
        folder = path.resolve().parent
        if not data_path.resolve().is_relative_to(folder):
            raise OnnxpressError(
                f"{path.name} keeps weights in {tensor.location!r}, outside the model's folder {folder} "
                "(ONNX Runtime refuses such paths): move the data file next to the model and re-save it"
            )
        if not data_path.exists():
            raise OnnxpressError(
                f"{path.name} keeps weights in {tensor.location!r}, which is missing from {data_path.parent}: "
                "copy the external data file next to the model"
            )
        needed = (tensor.offset or 0) + (tensor.length or 0)
        if data_path.stat().st_size < needed:
            raise OnnxpressError(
                f"external data file {data_path} is shorter than the model expects "
                f"({data_path.stat().st_size} < {needed} bytes; truncated copy?): copy it again"
            )


def target_ir_version(model: ir.Model) -> int:
    """The lowest IR version that covers the model's default-domain opset, capped for ORT."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
    needed = 7
    for _, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            needed = ir_version
            break
    return max(7, min(needed, MAX_IR_VERSION))


def model_nbytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def output_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created when missing; a one-line error when it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxpressError(f"cannot create the output folder {folder} ({exc.strerror}): "
                             "choose an output path in a folder you can write") from None
    return folder


def mapped_nbytes(model: ir.Model) -> int:
    """Bytes of the initializers still read from an external data file (memory-mapped, not held)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor))


class WeightSpill:
    """Weights a compile makes, written to a file in ``folder`` as they are made and read back
    memory-mapped (``ir.ExternalTensor``), so that rewriting a model whose weights are mapped from
    its data file holds no more of the new weights in memory than the kernel keeps cached: a pass
    rewriting every weight of a model past memory (int4 rounding) would otherwise hold its whole
    output. Sessions hand the mapped arrays to ONNX Runtime without a copy; the output's save
    copies them into its own data file."""

    FILE = "spilled-weights.data"
    ALIGN = 4096  # each tensor starts on a page, as mapping wants
    MIN_BYTES = 1 << 20  # smaller ones stay in memory

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._file = open(self.folder / self.FILE, "ab")  # noqa: SIM115 -- open for the compile's life, see close
        self.nbytes = 0

    def tensor(self, array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
        """``array`` as a tensor: written to the file when it is a large weight (floats, or
        whole-byte codes; never integers shape inference may have to read)."""
        dtype = ir.DataType.from_numpy(array.dtype)
        weight = array.dtype.kind == "f" or (array.dtype.itemsize == 1 and dtype.bitwidth == 8)
        if array.nbytes < self.MIN_BYTES or not weight or array.ndim == 0:  # onnx-ir maps a scalar back 1-D
            return ir.tensor(array, name=name)
        f = self._file
        f.write(b"\0" * (-f.tell() % self.ALIGN))
        offset = f.tell()
        f.write(np.ascontiguousarray(array).data)
        f.flush()
        self.nbytes += array.nbytes
        return ir.ExternalTensor(self.FILE, offset=offset, length=array.nbytes, dtype=dtype,
                                 shape=ir.Shape(array.shape), name=name, base_dir=str(self.folder))

    def close(self) -> None:
        self._file.close()


@dataclass
class CompileInput:
    """The model a compile reads (``compile_input``), where its passes write new weights, and
    the input's size on disk as given."""

    model: ir.Model
    spill: WeightSpill | None  # None for a model held in memory
    size: int


@contextlib.contextmanager
def compile_input(path: str | os.PathLike, folder: str | os.PathLike) -> Iterator[CompileInput]:
    """The model at ``path`` loaded for a compile writing into ``folder``.

    A model whose weights are mapped from its data file gets a ``WeightSpill`` for the weights its
    passes make. A model stored inline in a file of ``INLINE_MAP_MIN_BYTES`` or more is compiled
    from a copy whose weights were moved to a data file (``inline_weights``), mapped the same way:
    parsed whole, its weights would sit in memory for the whole compile, and each ONNX Runtime
    session would copy them again from the serialised model. Copy and spill file live in a
    temporary folder inside ``folder`` (on the output's disk), removed after the block."""
    path = model_file(path)
    model = None if path.stat().st_size >= INLINE_MAP_MIN_BYTES else load_model(path)
    if model is not None and not mapped_nbytes(model):
        yield CompileInput(model, None, files_size(path, model))
        return
    scratch = Path(tempfile.mkdtemp(prefix=".onnxpress-scratch-", dir=output_folder(folder)))
    spill = None
    try:
        if model is None:
            model = _load_with_weights_moved(path, scratch)
        moved = data_folder(model) is not None and Path(data_folder(model)) == scratch
        spill = WeightSpill(scratch) if mapped_nbytes(model) else None
        yield CompileInput(model, spill, path.stat().st_size if moved else files_size(path, model))
    finally:
        if spill is not None:
            spill.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _load_with_weights_moved(path: Path, folder: Path) -> ir.Model:
    """``path`` loaded from a copy in ``folder`` whose weights are in a data file beside it; the
    model as it is when it cannot be copied so (``load_model`` then names what is wrong)."""
    copy = folder / "input.onnx"
    try:
        inline_weights.move_weights_out(path, copy, copy.name + ".data")
        return load_model(copy)
    except (inline_weights.NotMovable, OnnxpressError):  # the error names the user's file, not the copy
        return load_model(path)
    except OSError as exc:
        raise OnnxpressError(f"cannot write a copy of {path.name}'s weights into {folder.parent} ({exc.strerror}): "
                             "free disk space there, or choose an output folder on another disk") from None


def files_size(path: Path, model: ir.Model | None = None) -> int:
    """The model file and its external data: the files ``model``'s initializers read (any name
    an exporter gave them), else onnxpress's ``.data`` beside it."""
    files = {path.with_name(path.name + ".data")} if model is None else {
        Path(v.const_value.base_dir) / v.const_value.location for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.exists())


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically.

    External data (``<name>.data`` beside the model) is used when asked for, or
    automatically when the weights do not fit in one protobuf.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise OnnxpressError(f"output {path} must end in .onnx: choose a name like model.onnx")
    output_folder(path.parent)
    if external_data is None:
        external_data = model_nbytes(model) > PROTOBUF_LIMIT
    model.ir_version = target_ir_version(model)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxpress-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        # without external data, weights still read from the input's external data file are written inline
        ir.save(model if external_data else _inlined(model), tmp_model,
                external_data=data_name if external_data else None)
        if external_data:
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def move_into_place(files: list[Path], folder: Path) -> None:
    """Rename ``files`` (written in a temporary folder on the same disk) into ``folder`` in order,
    all or nothing: when one fails, those already moved are removed again."""
    placed: list[Path] = []
    try:
        for f in files:
            os.replace(f, folder / f.name)
            placed.append(folder / f.name)
    except BaseException:
        for f in placed:
            f.unlink(missing_ok=True)
        raise


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto of ``model`` with the target IR version (weights loaded into memory)."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = target_ir_version(model)
    return proto


@dataclass(frozen=True)
class SessionModel:
    """A model as ONNX Runtime takes it from memory: the serialised protobuf and the weights
    kept out of it (``session_model`` says which; ``proto`` marks them external, at offsets of
    a file that is never written), handed to the session as OrtValues over the same memory
    (``onnxpress.runtime.make_session``)."""

    proto: bytes
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    over_limit: bool = False  # the weights alone pass the protobuf limit
    # the folder of the external data files ``proto`` still points to (weights no pass rewrote):
    # ONNX Runtime maps them itself, so this process never reads them, and no copy is made
    data_folder: str | None = None

    @property
    def nbytes(self) -> int:
        return len(self.proto) + sum(a.nbytes for a in self.weights.values())

    def check(self) -> None:
        """The ONNX checker (``onnx.checker.ValidationError`` if it fails). The checker wants the
        external data files beside the model (and refuses links): sparse files of the right sizes
        stand in for them and for the weights handed over in memory."""
        if not self.weights and self.data_folder is None:
            onnx.checker.check_model(self.proto)
            return
        with tempfile.TemporaryDirectory(prefix="onnxpress-check-") as tmp:
            path = Path(tmp) / "onnxpress-check.onnx"
            path.write_bytes(self.proto)
            sizes = {IN_MEMORY_WEIGHTS: sum(a.nbytes for a in self.weights.values())}
            if self.data_folder is not None:
                sizes |= {f.name: f.stat().st_size for f in Path(self.data_folder).iterdir()
                          if f.is_file() and f.name not in (path.name, IN_MEMORY_WEIGHTS)}
            for name, size in sizes.items():
                stand_in = Path(tmp) / name
                stand_in.touch()
                os.truncate(stand_in, size)
            onnx.checker.check_model(str(path))


def session_model(model: ir.Model) -> SessionModel:
    """``model`` for an ONNX Runtime session without writing it anywhere. Weights still in the
    input's external data file stay references to it, which ONNX Runtime maps itself
    (``data_folder``); weights mapped from another file (the compile's ``WeightSpill``) and the
    other weights of a model over the protobuf limit (every initializer of ``EXTERNAL_MIN_BYTES``
    or more) stay out of the protobuf and are handed over as arrays, over the mapping for the former."""
    over_limit = model_nbytes(model) > PROTOBUF_LIMIT
    if not over_limit and not _reads_external_data(model):
        return SessionModel(model_proto(model).SerializeToString())
    copy = model.clone()  # tensors shared, not copied
    graph = copy.graph
    _read_external_attributes(copy)
    folder = data_folder(copy)
    weights = {}
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]  # ORT drops unused initializers, and then cannot be handed them
            continue
        if tensor is None or (isinstance(tensor, ir.ExternalTensor) and str(tensor.base_dir) == folder):
            continue  # inline, or read by ORT from the data file
        if not (isinstance(tensor, ir.ExternalTensor) or (over_limit and tensor.nbytes >= EXTERNAL_MIN_BYTES)):
            continue
        value.const_value = handed_over(tensor, name, weights)
    return SessionModel(model_proto(copy).SerializeToString(), weights, over_limit, folder)


def weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """``model``'s protobuf without the data of its initializers of ``EXTERNAL_MIN_BYTES`` or more
    (marked external, at a file never written): what shape inference reads, at the size of the graph."""
    copy = model.clone()  # tensors shared, not copied
    _read_external_attributes(copy)
    for name, value in copy.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= EXTERNAL_MIN_BYTES:
            value.const_value = _left_out(tensor, name)
    return model_proto(copy)


def handed_over(tensor: ir.TensorProtocol, name: str, weights: dict[str, np.ndarray]) -> ir.ExternalTensor:
    """``tensor`` marked as handed to the session in memory (``SessionModel.weights``); its array
    joins ``weights``."""
    offset = sum(a.nbytes for a in weights.values())
    weights[name] = np.ascontiguousarray(tensor.numpy())
    return _left_out(tensor, name, offset)


def _left_out(tensor: ir.TensorProtocol, name: str, offset: int = 0) -> ir.ExternalTensor:
    """``tensor`` marked as kept out of the protobuf, at ``offset`` of a file never written."""
    return ir.ExternalTensor(IN_MEMORY_WEIGHTS, offset=offset, length=tensor.nbytes, dtype=tensor.dtype,
                             shape=tensor.shape, name=name, base_dir="")


def data_folder(model: ir.Model) -> str | None:
    """The folder of the external data files the model's initializers read from its input (the
    first such initializer's, should there be several folders; weights this compile spilled are
    not the input's); None when none does."""
    return next((str(v.const_value.base_dir) for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location != WeightSpill.FILE),
                None)


def _inlined(model: ir.Model) -> ir.Model:
    """``model``, or a copy holding in memory the tensors it reads from external data files."""
    if not _reads_external_data(model):
        return model
    copy = model.clone()  # tensors shared, not copied
    ir.external_data.load_to_model(copy)
    _read_external_attributes(copy)
    return copy


def _reads_external_data(model: ir.Model) -> bool:
    return bool(_external_attributes(model)) or any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _read_external_attributes(model: ir.Model) -> None:
    """Read into memory the tensor attributes (Constant nodes') stored in external data: small ones."""
    for node, key in _external_attributes(model):
        node.attributes[key] = ir.AttrTensor(key, ir.tensor(node.attributes[key].value.numpy()))


def _external_attributes(model: ir.Model) -> list[tuple[ir.Node, str]]:
    """(node, attribute name) of every tensor attribute stored in an external data file."""
    return [(node, key) for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for key, attr in node.attributes.items()
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor)]

