"""Calibration data: feed batches that match a model's inputs, deterministic given a seed.

Feeds are built from the model's graph inputs by name (``make_feeds``): token ids and
mask come from the text; ``token_type_ids`` are zeros, ``position_ids`` count from each text's
first token (``counted_positions``), ``past_key_values.*`` are empty (zero-length past), so
decoder exports with a KV cache run as plain prefill. Texts are right-padded per batch (the
mask marks padding).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxpress.datasets import (
    EVALUATION_MIN_CHARS,
    expand_text_paths,
    load_tokenizer,
    read_text,
    split_sentences,
    text_chunks,
)
from onnxpress.errors import OnnxpressError

Feeds = dict[str, np.ndarray]

_NAMED_DIMS = {
    "input_ids": "[batch, sequence]",
    "attention_mask": "[batch, sequence]",
    "token_type_ids": "[batch, sequence]",
    "position_ids": "[batch, sequence]",
    "pixel_values": "[batch, channels, height, width]",
}


class InputSpec(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None for symbolic / unknown dims


def input_specs(model) -> list[InputSpec]:
    """Graph inputs of an onnx_ir.Model or an onnxruntime.InferenceSession."""
    if isinstance(model, ir.Model):
        initializers = set(model.graph.initializers)
        return [
            InputSpec(
                v.name, v.dtype.numpy(), tuple(d if isinstance(d, int) else None for d in (v.shape or ()))
            )
            for v in model.graph.inputs
            if v.name not in initializers
        ]
    return [
        InputSpec(i.name, _ort_dtype(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
        for i in model.get_inputs()
    ]


def _ort_dtype(type_str: str) -> np.dtype:
    name = type_str.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "float16": "float16"}.get(name, name))


def is_past_input(name: str) -> bool:
    return name.startswith("past_key_values") or name.startswith("past.")


def make_feeds(
    model, input_ids: np.ndarray, attention_mask: np.ndarray, *, seed: int = 0,
    image_dims: tuple[int, ...] | None = None,
) -> Feeds:
    """Feeds for every graph input of ``model`` from token ids and their mask (see module doc);
    ``image_dims``: (channels, height, width) of random ``pixel_values`` where the input's are dynamic."""
    batch = input_ids.shape[0]
    feeds: Feeds = {}
    for spec in input_specs(model):
        if spec.name == "input_ids":
            value = input_ids
        elif spec.name == "attention_mask":
            value = attention_mask
        elif spec.name == "token_type_ids":
            value = np.zeros_like(input_ids)
        elif spec.name == "position_ids":
            value = counted_positions(attention_mask)
        elif is_past_input(spec.name):
            value = np.zeros(_empty_past_shape(spec, batch), dtype=spec.dtype)
        elif spec.name == "pixel_values":
            value = synthetic_pixels(spec, batch, seed, image_dims)
        else:
            raise OnnxpressError(
                f"model input {spec.name!r} cannot be built from text: pass calibration data as .npz with that key"
            )
        feeds[spec.name] = np.ascontiguousarray(value.astype(spec.dtype, copy=False))
    return feeds


def counted_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Each row's token positions counted from its first token (0 before it, for left padding),
    on through right padding: the padding's positions continue the text's, as a graph that
    takes positions from the cache length (rotary fused into the attention) counts them."""
    first = np.argmax(np.asarray(attention_mask) != 0, axis=1)
    return np.clip(np.arange(attention_mask.shape[1]) - first[:, None], 0, None)


def _empty_past_shape(spec: InputSpec, batch: int) -> tuple[int, ...]:
    if len(spec.shape) != 4 or spec.shape[1] is None or spec.shape[3] is None:
        raise OnnxpressError(
            f"past input {spec.name!r} has shape {spec.shape}; expected [batch, kv_heads, past, head_size] "
            "with static heads/head size: re-export with optimum"
        )
    return (batch, spec.shape[1], 0, spec.shape[3])


def synthetic_pixels(spec: InputSpec, batch: int, seed: int, dims: tuple[int, ...] | None = None) -> np.ndarray:
    dims = tuple(dims or spec.shape[1:])
    if any(d is None for d in dims):
        raise OnnxpressError(
            f"input {spec.name!r} has dynamic image dims {spec.shape}: pass real images as .npz calibration data "
            "or keep the model's config.json (image_size, num_channels) beside it"
        )
    return np.random.default_rng(seed).standard_normal((batch, *dims)).astype(np.float32)


def image_dims(model, spec: InputSpec, model_dir: str | os.PathLike | None = None) -> tuple[int, ...] | None:
    """(channels, height, width) of the images ``model`` takes, or None when they cannot be told:
    the input's static dims where it has them; the rest from ``config.json`` in ``model_dir``
    (``image_size``, ``num_channels``), else from the weights (an ``ir.Model``): the patch
    embedding's Conv gives the channels and patch size, the position-embedding table the
    number of patches (its rows less one for a CLS token), and the image side is
    sqrt(patches) x patch size."""
    dims = spec.shape[1:]
    if len(dims) != 3:
        return None
    if all(d is not None for d in dims):
        return tuple(dims)
    found = _image_dims_from_config(model_dir) or (_image_dims_from_weights(model) if isinstance(model, ir.Model)
                                                   else None)
    if found is None:
        return None
    return tuple(d if d is not None else f for d, f in zip(dims, found, strict=True))


def _image_dims_from_config(model_dir) -> tuple[int, int, int] | None:
    path = Path(model_dir) / "config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("vision_config", config) if isinstance(config, dict) else {}
    size = config.get("image_size")
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return None
    return (int(config.get("num_channels", 3)), size[0], size[1])


def _image_dims_from_weights(model: ir.Model) -> tuple[int, int, int] | None:
    pixels = next((v for v in model.graph.inputs if v.name == "pixel_values"), None)
    conv = _first_consumer(pixels, "Conv") if pixels is not None else None
    weight = conv.inputs[1] if conv is not None and len(conv.inputs) > 1 else None
    if weight is None or weight.shape is None or len(weight.shape) != 4 or not weight.shape.is_static():
        return None
    hidden, channels, kernel_h, kernel_w = (int(d) for d in weight.shape)
    strides = conv.attributes.get("strides")
    stride_h, stride_w = strides.as_ints() if strides is not None else (kernel_h, kernel_w)
    group = conv.attributes.get("group")
    channels *= group.as_int() if group is not None else 1
    for value in model.graph.initializers.values():
        shape = value.shape
        if shape is None or len(shape) not in (2, 3) or shape[-1] != hidden or not shape.is_static():
            continue
        rows = int(shape[-2])
        for patches in (rows - 1, rows):  # a CLS token's row first
            side = math.isqrt(max(patches, 0))
            if patches > 1 and side * side == patches:
                return (channels, side * stride_h, side * stride_w)
    return None


def _first_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The first ``op_type`` node reading ``value``, looking through casts and reshapes."""
    frontier, seen = [value], {value}
    while frontier:
        current = frontier.pop(0)
        for node, index in current.uses():
            if node.op_type == op_type and index == 0:
                return node
            if node.op_type in _ID_PASSTHROUGH and index == 0:
                fresh = [out for out in node.outputs if out not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    return None


# Ops an exporter puts between input_ids and the embedding Gather (GPT-2 reshapes the ids first).
_ID_PASSTHROUGH = {"Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def vocab_size(model: ir.Model) -> int:
    """Rows of the token embedding table: the Gather that reads ``input_ids``."""
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        raise OnnxpressError("model has no input_ids input: synthetic token data needs a text model")
    frontier, seen = [ids], {ids}
    while frontier:
        value = frontier.pop()
        for node, index in value.uses():
            if node.op_type == "Gather" and index == 1:
                table = _source_table(node.inputs[0])
                if table is not None:
                    return table
            elif node.op_type in _ID_PASSTHROUGH and index == 0:
                fresh = [out for out in node.outputs if out not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    raise OnnxpressError(
        "cannot find the token embedding table (a Gather on input_ids): pass real calibration text"
    )


def _source_table(value: ir.Value | None, depth: int = 4) -> int | None:
    """First dim of the 2-D weight behind ``value``, looking through a few producer nodes
    (a quantized table reaches the Gather through DequantizeLinear and friends)."""
    if value is None or depth < 0:
        return None
    if value.const_value is not None or value.is_initializer():
        shape = value.shape if value.shape is not None else value.const_value.shape
        return int(shape[0]) if shape is not None and len(shape) == 2 else None
    producer = value.producer()
    if producer is None:
        return None
    for inp in producer.inputs:
        found = _source_table(inp, depth - 1)
        if found is not None:
            return found
    return None


# Samples in a calibration batch. The passes' batch limits (``max_batches``, ``calibration_batches``)
# count batches of this many samples: a decoder with a large vocabulary runs its calibration one
# sample a batch (compile.default_batch_size) and must still fit on as much text.
BATCH_SIZE = 8


def leading_batches(batches: Sequence[Feeds], n_batches: int | None) -> list[Feeds]:
    """The batches holding the first ``n_batches * BATCH_SIZE`` samples (all of them for 0 or None),
    however many samples each batch holds."""
    if not n_batches:
        return list(batches)
    out, samples = [], 0
    for batch in batches:
        if samples >= n_batches * BATCH_SIZE:
            break
        out.append(batch)
        samples += _batch_size(batch)
    return out


@dataclass
class CalibrationSet:
    """Feed batches keyed by model input names, plus a description for reports, and (when built
    from text) each sample's text in sample order."""

    batches: list[Feeds]
    source: str
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(_batch_size(b) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        total = 0
        for b in self.batches:
            if "attention_mask" in b and "input_ids" in b:
                total += int(b["attention_mask"][:, -b["input_ids"].shape[1] :].sum())
            elif "input_ids" in b:
                total += b["input_ids"].size
        return total

    def take(self, n_batches: int) -> CalibrationSet:
        batches = self.batches[:n_batches]
        texts = self.texts[: sum(_batch_size(b) for b in batches)] if self.texts is not None else None
        return CalibrationSet(batches, f"{self.source}, first {n_batches} batches", texts)

    def split(self, holdout_fraction: float) -> tuple[CalibrationSet, CalibrationSet]:
        """(calibration, holdout) by sample: the last ``holdout_fraction`` of samples, re-batched.

        Samples keep their order (from_texts already shuffled them with the seed), so the
        split is deterministic; holdout gets at least one sample when there are two or more.
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise OnnxpressError(f"holdout fraction {holdout_fraction} must be between 0 and 1: e.g. 0.1")
        samples = [s for b in self.batches for s in _unbatch(b)]
        if len(samples) < 2:
            raise OnnxpressError(f"cannot split {len(samples)} calibration sample(s): give at least two")
        n_hold = min(len(samples) - 1, max(1, round(len(samples) * holdout_fraction)))
        size = max(_batch_size(b) for b in self.batches)
        keep, hold = samples[: len(samples) - n_hold], samples[len(samples) - n_hold :]
        texts = self.texts
        return (
            CalibrationSet(_rebatch(keep, size), f"{self.source}, calibration part ({len(keep)} samples)",
                           texts[: len(keep)] if texts else None),
            CalibrationSet(_rebatch(hold, size), f"{self.source}, holdout part ({len(hold)} samples)",
                           texts[len(keep) :] if texts else None),
        )

    def sentences(self, tokenizer_dir, model: ir.Model, **kwargs) -> CalibrationSet | None:
        """The sentences of this set's texts (those an evaluation would take: ``EVALUATION_MIN_CHARS``
        or longer) as a set of their own, or None without texts or sentences."""
        found = [s for text in self.texts or [] for s in split_sentences(text, EVALUATION_MIN_CHARS)]
        if not found:
            return None
        kwargs.setdefault("source", f"{len(found)} sentences of {self.num_samples} samples")
        return CalibrationSet.from_texts(found, tokenizer_dir, model, **kwargs)

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer_dir,
        model: ir.Model,
        *,
        max_length: int = 128,
        batch_size: int = 8,
        max_samples: int | None = None,
        seed: int = 0,
        source: str | None = None,
    ) -> CalibrationSet:
        """Tokenize ``texts`` (shuffled with ``seed``, cut to ``max_samples``) into padded batches."""
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise OnnxpressError("no calibration text: pass non-empty texts or files")
        order = np.random.default_rng(seed).permutation(len(texts))[: max_samples or len(texts)]
        tokenizer = load_tokenizer(tokenizer_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = []
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
            input_ids, mask = pad_right(ids, pad_id)
            batches.append(make_feeds(model, input_ids, mask, seed=seed + start))
        desc = source or f"{len(texts)} texts"
        return cls(batches, f"{desc}: {len(order)} samples, max_length {max_length}, seed {seed}",
                   [texts[i] for i in order])

    @classmethod
    def from_files(cls, paths, tokenizer_dir, model: ir.Model, **kwargs) -> CalibrationSet:
        """Text from .txt (sentence chunks) / .jsonl ("text" field) files or folders of them."""
        files = expand_text_paths([paths] if isinstance(paths, str | os.PathLike) else paths)
        max_chars = 4 * kwargs.get("max_length", 128)  # ~4 characters per token: fill the window
        texts: list[str] = []
        for path in files:
            texts.extend(
                _jsonl_texts(path) if path.suffix == ".jsonl" else text_chunks(read_text(path), max_chars)
            )
        names = files[0].name if len(files) == 1 else f"{files[0].name} .. {files[-1].name}"
        kwargs.setdefault("source", f"{len(files)} file(s) [{names}] in {files[0].parent}")
        return cls.from_texts(texts, tokenizer_dir, model, **kwargs)

    @classmethod
    def from_npz(cls, path, model: ir.Model, *, batch_size: int = 8) -> CalibrationSet:
        """Arrays keyed by input names, first axis = samples; missing text inputs are derived."""
        path = Path(path)
        if not path.exists():
            raise OnnxpressError(f"calibration file {path} does not exist: check the path")
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise OnnxpressError(
                f"{path} is not a readable .npz ({type(exc).__name__}): save it with np.savez"
            ) from None
        specs = {s.name: s for s in input_specs(model)}
        arrays = _validate_arrays(arrays, specs, path.name)
        n = len(next(iter(arrays.values())))
        batches = []
        for start in range(0, n, batch_size):
            part = {k: v[start : start + batch_size] for k, v in arrays.items()}
            batches.append(_complete_feeds(model, part, specs))
        return cls(batches, f"{path.name}: {n} samples, batch size {batch_size}")

    @classmethod
    def synthetic(
        cls, model: ir.Model, *, batch_size: int = 2, seq_len: int = 16, seed: int = 0, num_batches: int = 1,
        model_dir: str | os.PathLike | None = None,
    ) -> CalibrationSet:
        """Random tokens within the vocabulary (or random pixels, of the size ``image_dims`` finds
        with ``model_dir``, the model's folder): for checking lossless passes."""
        specs = {s.name: s for s in input_specs(model)}
        pixels = image_dims(model, specs["pixel_values"], model_dir) if "pixel_values" in specs else None
        rng = np.random.default_rng(seed)
        if not any(name in _NAMED_DIMS or is_past_input(name) for name in specs):
            # Not a transformer's inputs (e.g. a plain MLP): random data of each input's shape.
            batches = [_random_feeds(specs.values(), batch_size, seq_len, rng) for _ in range(num_batches)]
            return cls(batches, f"synthetic: {num_batches} random batch(es), seed {seed}")
        batches = []
        for i in range(num_batches):
            if "input_ids" in specs:
                ids = rng.integers(0, vocab_size(model), size=(batch_size, seq_len), dtype=np.int64)
            else:
                ids = np.zeros((batch_size, seq_len), np.int64)  # vision: only pixel_values is used
            batches.append(make_feeds(model, ids, np.ones_like(ids), seed=seed + i, image_dims=pixels))
        return cls(batches, f"synthetic: {num_batches} batch(es) of {batch_size}x{seq_len}, seed {seed}")


def _random_feeds(specs: Iterable[InputSpec], batch: int, seq_len: int, rng: np.random.Generator) -> Feeds:
    feeds = {}
    for spec in specs:
        shape = tuple(
            d if d is not None else (batch if i == 0 else seq_len) for i, d in enumerate(spec.shape)
        )
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feeds


def replace_tokens(ids: np.ndarray, mask: np.ndarray, rate: float, replaceable: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """``ids`` with a ``rate`` share of its real, non-special tokens replaced by random ones (word
    replacement as in TinyBERT's augmentation): inputs beyond the text's vocabulary, so that what
    is fitted or trained on them also holds for words that text never uses."""
    special = ~np.isin(ids, replaceable)
    pick = (rng.random(ids.shape) < rate) & mask.astype(bool) & ~special
    out = ids.copy()
    out[pick] = rng.choice(replaceable, size=int(pick.sum()))
    return out


def replaceable_ids(tokenizer) -> np.ndarray:
    """Every token id of the tokenizer's vocabulary except its special ones."""
    ids = np.arange(len(tokenizer))
    return ids[~np.isin(ids, list(tokenizer.all_special_ids))]


def with_replaced_tokens(batches: Sequence[Feeds], rate: float, replaceable: np.ndarray, seed: int) -> list[Feeds]:
    """``batches`` with ``rate`` of their real tokens replaced (:func:`replace_tokens`), the same
    for the same seed; batches without ``input_ids`` are returned as they are."""
    rng = np.random.default_rng(seed)
    out = []
    for batch in batches:
        ids = batch.get("input_ids")
        if ids is not None:
            mask = batch.get("attention_mask", np.ones_like(ids))
            batch = {**batch, "input_ids": replace_tokens(ids, mask, rate, replaceable, rng)}
        out.append(batch)
    return out


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise OnnxpressError(
                f"{path.name} line {lineno} is not JSON: write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise OnnxpressError(
                f'{path.name} line {lineno} has no "text" string field: add one to every record'
            )
        texts.append(record["text"])
    return texts


def _validate_arrays(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec], where: str) -> dict:
    if not arrays:
        raise OnnxpressError(f"{where} holds no arrays: save one array per model input")
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise OnnxpressError(
            f"calibration input {unknown[0]!r} in {where} is not a model input: use the names {sorted(specs)}"
        )
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1:
        raise OnnxpressError(
            f"arrays in {where} have different sample counts {sorted(counts)}: make axis 0 match"
        )
    out = {}
    for name, array in arrays.items():
        spec = specs[name]
        dims = _NAMED_DIMS.get(name, "")
        if array.ndim != len(spec.shape):
            raise OnnxpressError(
                f"calibration input {name!r} has rank {array.ndim}, the model expects rank {len(spec.shape)} "
                f"{dims}: reshape it (first axis = samples)".replace("  ", " ")
            )
        if _kind(array.dtype) != _kind(spec.dtype):
            raise OnnxpressError(
                f"calibration input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}: convert it"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if want is not None and axis > 0 and want != got:
                raise OnnxpressError(
                    f"calibration input {name!r} has shape {array.shape}, the model expects size {want} "
                    f"on axis {axis}: resize it"
                )
        out[name] = array.astype(spec.dtype, copy=False)  # same kind: int32 -> int64 etc. is safe
    return out


def _kind(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.integer):
        return "int"
    return "float" if np.issubdtype(dtype, np.floating) else str(dtype)


def _complete_feeds(model: ir.Model, part: Feeds, specs: dict[str, InputSpec]) -> Feeds:
    """Fill inputs the npz leaves out (mask, token types, positions, empty past) like text feeds do."""
    missing = set(specs) - set(part)
    if not missing:
        return part
    if "input_ids" not in part:
        raise OnnxpressError(f"calibration data lacks model input {sorted(missing)[0]!r}: add it to the .npz")
    mask = part.get("attention_mask", np.ones_like(part["input_ids"]))
    derived = make_feeds(model, part["input_ids"], mask)
    return {name: part.get(name, derived[name]) for name in specs}


def _batch_size(batch: Feeds) -> int:
    return next(iter(batch.values())).shape[0]


def _unbatch(batch: Feeds) -> list[Feeds]:
    """Per-sample feeds; padding past a sample's own length is trimmed so re-batching can re-pad."""
    samples = []
    for i in range(_batch_size(batch)):
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        if "attention_mask" in sample and "input_ids" in sample:
            n = int(sample["attention_mask"].sum()) if sample["attention_mask"].size else 0
            seq = sample["input_ids"].shape[1]
            if n and sample["attention_mask"].shape[1] == seq and sample["attention_mask"][0, :n].all():
                sample = {k: (v[:, :n] if _is_token_axis(k, v, seq) else v) for k, v in sample.items()}
        samples.append(sample)
    return samples


def _is_token_axis(name: str, value: np.ndarray, seq: int) -> bool:
    return name in ("input_ids", "attention_mask", "token_type_ids", "position_ids") and value.shape[1] == seq


def _rebatch(samples: list[Feeds], size: int) -> list[Feeds]:
    batches = []
    for start in range(0, len(samples), size):
        group = samples[start : start + size]
        batches.append({k: _stack([s[k] for s in group], k) for k in group[0]})
    return batches


def _stack(parts: list[np.ndarray], name: str) -> np.ndarray:
    if name in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        length = max(p.shape[1] for p in parts)
        if name == "position_ids":  # the padding's positions continue the text's (counted_positions)
            parts = [np.concatenate([p, p[:, -1:] + np.arange(1, length - p.shape[1] + 1)], axis=1) if p.shape[1]
                     else np.zeros((p.shape[0], length), p.dtype) for p in parts]
        parts = [np.pad(p, ((0, 0), (0, length - p.shape[1]))) for p in parts]
    return np.concatenate(parts, axis=0)


def trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch without its trailing all-padding positions (a batch of short sentences padded
    to max_length is mostly padding): every [batch, seq] feed cut at the last real token.
    Exact: padded positions are masked, so the real tokens' values do not depend on them."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2 or not mask.any():
        return feeds
    length = int(np.flatnonzero(mask.any(0))[-1]) + 1
    # a non-empty KV cache, or a 2-D feed not aligned with the mask: the positions are not just the mask's
    if length == mask.shape[1] or any((a.ndim >= 3 and a.size) or (a.ndim == 2 and a.shape != mask.shape)
                                      for a in feeds.values()):
        return feeds
    return {k: a[:, :length] if a.ndim == 2 else a for k, a in feeds.items()}
