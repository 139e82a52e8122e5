"""The files beside a compiled decoder that let other runtimes load it from its folder.

* ``genai_config.json`` for onnxruntime-genai (``onnxruntime_genai.Model(folder)``): the model
  type, the cache geometry, the graph's input and output names as the graph has them, token ids
  and greedy ``search`` defaults. ``past_present_share_buffer`` (GenAI then keeps each layer's past
  and present in one context-long buffer and the attention appends to it in place, instead of
  copying the cache into a new present every step) is set where the graph allows it: only
  GroupQueryAttention reads the cache, and no attention's sequence lengths come from the cache's
  shape (which, shared, is the buffer's).
* The Hugging Face files that optimum's ``ORTModelForCausalLM.from_pretrained(folder,
  file_name=...)`` and GenAI's tokenizer read: config.json and generation_config.json from the
  model's source folder, and the tokenizer files from the tokenizer folder, copied when the output
  folder is another one.

A file already in the output folder is never overwritten when it differs from the source's (the
report notes it kept it); identical files are left as they are. ``genai_config.json`` describes
the model just written (a folder holds one GenAI model, named by its ``decoder.filename``), so it
replaces an earlier one. ``compile_model`` writes these files with the model, all or nothing;
``write_runtime_files`` adds them beside a model compiled before. ``genai_runner`` and
``optimum_runner`` load such a folder in those runtimes and decode greedily, for the tests and the
bench that check their tokens against ``onnxpress.generation``'s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from onnxpress.analysis.graph_utils import ancestors
from onnxpress.calibration import is_past_input
from onnxpress.datasets import TOKENIZER_FILES
from onnxpress.generation import (
    config_context_length,
    config_head_size,
    present_name,
    read_json,
    stop_ids,
    tokenizer_eos_id,
)
from onnxpress.model_io import load_model, move_into_place

GENAI_CONFIG = "genai_config.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "vocab.json", "merges.txt",
                        "added_tokens.json", "chat_template.jinja")
# onnxruntime-genai 0.18's decoder-only types (src/models/model_type.h) that it runs with one key and
# one value cache input per layer, as the graphs have them. It runs "gpt2" with one combined cache
# input per layer, so gpt2, and the types it does not know, get its generic decoder-only type.
GENAI_DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "granite", "internlm2", "llama", "mistral",
    "nemotron", "olmo", "phi", "phi3", "phi3small", "phimoe", "qwen2", "qwen3", "smollm3"})
GENAI_GENERIC_TYPE = "decoder"
GENAI_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class RuntimeFiles:
    """What goes beside a model: file name -> contents, and notes on what was left out and why."""

    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_runtime_files(model: ir.Model, output: Path, *, source_dir: Path | None,
                       tokenizer_dir: Path | None = None) -> RuntimeFiles:
    """The runtime files for ``model`` saved as ``output`` (none unless it is a decoder with a
    ``logits`` output); config files come from ``source_dir`` (else ``tokenizer_dir``), tokenizer
    files from ``tokenizer_dir`` (else ``source_dir``)."""
    plan = RuntimeFiles()
    if "logits" not in [v.name for v in model.graph.outputs]:
        return plan
    folders = [Path(f) for f in (source_dir, tokenizer_dir) if f is not None]
    config_dir = next((f for f in folders if (f / "config.json").is_file()), None)
    tok_dir = next((f for f in reversed(folders) if any((f / n).is_file() for n in TOKENIZER_FILES)), None)
    for folder, names in ((config_dir, CONFIG_FILES), (tok_dir, TOKENIZER_SIDE_FILES)):
        for name in names:
            if folder is not None and (folder / name).is_file():
                _add(plan, output.parent, name, (folder / name).read_bytes(), keep_existing=True)
    if config_dir is None:
        plan.notes.append(f"no {GENAI_CONFIG} or config.json written: no config.json in "
                          f"{', '.join(map(str, folders)) or 'the source folder'}; pass --tokenizer with "
                          "the model's Hugging Face folder")
        return plan
    config, generation = read_json(config_dir / "config.json"), read_json(config_dir / "generation_config.json")
    genai, note = genai_config(model, output.name, config, generation, tokenizer_eos_id(tok_dir))
    if note:
        plan.notes.append(note)
    if genai is not None:
        _add(plan, output.parent, GENAI_CONFIG, (json.dumps(genai, indent=4) + "\n").encode(), keep_existing=False)
    return plan


def write_runtime_files(model_path: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                        tokenizer_dir: str | os.PathLike | None = None) -> RuntimeFiles:
    """Write the runtime files beside an already compiled ``model_path`` (source folders as
    ``plan_runtime_files``; default: the model's own folder), all or nothing."""
    path = Path(model_path)
    plan = plan_runtime_files(load_model(path), path, source_dir=Path(source_dir or path.parent),
                              tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None)
    tmp = Path(tempfile.mkdtemp(prefix=".onnxpress-", dir=path.parent))
    try:
        move_into_place(save_files(plan, tmp), path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan


def save_files(plan: RuntimeFiles, folder: Path) -> list[Path]:
    """Write the plan's files into ``folder``; returns their paths."""
    paths = []
    for name, data in plan.files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def genai_config(model: ir.Model, filename: str, config: dict, generation: dict,
                 tokenizer_eos: int | None) -> tuple[dict | None, str | None]:
    """onnxruntime-genai's config for ``model`` saved as ``filename`` (from the graph's names and
    shapes, the rest from its Hugging Face ``config`` and ``generation`` config), and a note: why
    there is none, or which type stands in for the model's."""
    initializers = set(model.graph.initializers)
    inputs = {v.name: v for v in model.graph.inputs if v.name not in initializers}
    outputs = {v.name: v for v in model.graph.outputs}
    past = [name for name in inputs if is_past_input(name)]
    other = [name for name in inputs if name not in GENAI_INPUTS and name not in past]
    if not past:
        return None, (f"no {GENAI_CONFIG} written: the model has no KV cache, and onnxruntime-genai feeds only "
                      "the new token after the prompt; export with the text-generation-with-past task")
    if any(node.domain == "onnxpress" for node in ir.traversal.RecursiveGraphIterator(model.graph)):
        return None, (f"no {GENAI_CONFIG} written: the model runs onnxpress's operator library, which "
                      "onnxruntime-genai does not load; compile with attention:target=onnxruntime")
    if other or "input_ids" not in inputs:
        return None, (f"no {GENAI_CONFIG} written: onnxruntime-genai feeds input_ids, attention_mask, position_ids "
                      f"and the cache, not {other or 'a graph without input_ids'}")
    names = _cache_names(past, set(outputs))
    if names is None:
        return None, (f"no {GENAI_CONFIG} written: the cache inputs {past[:2]}... are not one key and one value "
                      "input per layer numbered from 0 with a present.* output each, as GenAI names them")
    first = inputs[past[0]].shape
    kv_heads = _dim(first, 1) or config.get("num_key_value_heads", config.get("num_attention_heads"))
    head_size = _dim(first, 3) or config_head_size(config)
    context = config_context_length(config)
    if not (kv_heads and head_size and context):
        return None, (f"no {GENAI_CONFIG} written: config.json gives no context length (max_position_embeddings) "
                      "or cache geometry")
    vocab = _dim(outputs["logits"].shape, -1) or config.get("vocab_size")

    def in_vocab(token: int | None) -> bool:  # GenAI refuses ids the logits cannot reach
        return token is not None and (vocab is None or 0 <= token < vocab)

    eos = [i for i in stop_ids(generation, config, tokenizer_eos) if in_vocab(i)]
    model_type = config.get("model_type")
    genai_type = model_type if model_type in GENAI_DECODER_TYPES else GENAI_GENERIC_TYPE
    pad = next((c["pad_token_id"] for c in (config, generation) if in_vocab(c.get("pad_token_id"))),
               eos[0] if eos else None)
    bos = next((c["bos_token_id"] for c in (generation, config) if in_vocab(c.get("bos_token_id"))), None)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": int(head_size),
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "num_attention_heads": config.get("num_attention_heads", config.get("n_head")),
        "num_hidden_layers": names["layers"],
        "num_key_value_heads": int(kv_heads),
        "inputs": {**{n: n for n in GENAI_INPUTS if n in inputs},
                   "past_key_names": names["past_key"], "past_value_names": names["past_value"]},
        "outputs": {"logits": "logits", "present_key_names": names["present_key"],
                    "present_value_names": names["present_value"]},
    }
    body = {"type": genai_type, "context_length": int(context), "vocab_size": vocab,
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad, "bos_token_id": bos,
            "decoder": {k: v for k, v in decoder.items() if v is not None}}
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(context),
              "min_length": 0, "past_present_share_buffer": cache_shares_buffer(model, past), "temperature": 1.0, "top_k": 50, "top_p": 1.0,
              "repetition_penalty": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
              "no_repeat_ngram_size": 0, "early_stopping": True}
    note = None
    if genai_type != model_type:
        note = (f"{GENAI_CONFIG}: model type {GENAI_GENERIC_TYPE!r}, onnxruntime-genai's generic decoder: it runs no "
                f"{model_type!r} model with one key and one value cache input per layer")
    body = {k: v for k, v in body.items() if v is not None and v != []}
    return {"model": body, "search": search}, note


def cache_shares_buffer(model: ir.Model, past: Sequence[str]) -> bool:
    """Whether the cache inputs ``past`` may share their buffers with the present outputs: each
    is read only as a GroupQueryAttention's past key or value, and no GroupQueryAttention's
    sequence lengths (seqlens_k, total_sequence_length) are computed from such a reader's
    outputs (a present's shape is, shared, the buffer's) or by a node with subgraphs (not
    followed; the answer is then no)."""
    inputs = {v.name: v for v in model.graph.inputs}
    readers = {}
    for name in past:
        for node, index in inputs[name].uses():
            if not (node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and index in (3, 4)):
                return False
            readers[id(node)] = node
    for node in readers.values():
        for upstream in ancestors([v for v in node.inputs[5:7] if v is not None]):
            if id(upstream) in readers or any(
                    a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in upstream.attributes.values()):
                return False
    return True


def _cache_names(past: Sequence[str], outputs: set[str]) -> dict | None:
    """GenAI's name templates of the cache (``past_key_names``: past_key_values.%d.key, ...) and
    the layer count, or None when the names do not follow one template per key and value."""
    layers: dict[str, set[int]] = {}
    for name in past:
        match = re.search(r"\d+", name)
        if match is None:
            return None
        template = name[: match.start()] + "%d" + name[match.end():]
        layers.setdefault(template, set()).add(int(match.group()))
    keys = [t for t in layers if "key" in t.split("%d")[1]]
    values = [t for t in layers if "value" in t.split("%d")[1]]
    if len(layers) != 2 or len(keys) != 1 or len(values) != 1:
        return None
    key, value = keys[0], values[0]
    count = len(layers[key])
    if layers[key] != set(range(count)) or layers[value] != layers[key]:
        return None
    if any(present_name(name) not in outputs for name in past):
        return None
    return {"past_key": key, "past_value": value, "present_key": present_name(key),
            "present_value": present_name(value), "layers": count}


def _dim(shape: ir.Shape | None, axis: int) -> int | None:
    """A static dim of ``shape``, or None (no shape, or a symbolic dim)."""
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    value = shape[axis]
    return value if isinstance(value, int) else None


def _add(plan: RuntimeFiles, folder: Path, name: str, data: bytes, *, keep_existing: bool) -> None:
    """Plan ``name`` unless ``folder`` holds it already: the same bytes, or (``keep_existing``)
    other bytes the user's file keeps."""
    existing = folder / name
    if existing.is_file():
        old = existing.read_bytes()
        if old == data:
            return
        if keep_existing:
            plan.notes.append(f"kept the {name} already in {folder} (it differs from the source's)")
            return
        plan.notes.append(f"replaced the earlier {name} in {folder}")
    plan.files[name] = data


# ---- loading a folder in the other runtimes (onnxruntime-genai, optimum: not dependencies) --------


def genai_runner(folder: str | os.PathLike):
    """Load ``folder`` with onnxruntime-genai; returns ``run(prompt_ids, max_new_tokens) -> new ids``:
    its greedy search from its config, stopping on the config's eos ids, the prompt given as ids."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run(prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompt, np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    return run


def optimum_runner(model_path: str | os.PathLike, eos_ids: Sequence[int]):
    """Load ``model_path`` with optimum's ``ORTModelForCausalLM`` from its folder; returns
    ``run(prompt_ids, max_new_tokens) -> new ids``: ``generate(do_sample=False)`` stopping on ``eos_ids``."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    path = Path(model_path)
    model = ORTModelForCausalLM.from_pretrained(path.parent, file_name=path.name, local_files_only=True)

    def run(prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([list(prompt)], dtype=torch.int64)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0] if eos_ids else None)
        return out[0, len(prompt):].tolist()

    return run
