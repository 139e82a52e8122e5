"""Tiny random-weight transformer exports for tests.

Every test that needs "a real exported transformer" calls :func:`tiny_model`; it
builds a seeded, few-layer HF model from a transformers config, exports it with the
requested exporter and caches the ``.onnx`` on disk, so only the first run pays for
the export (a few seconds each). ``config.json`` and a tiny tokenizer lie next to
each ``model.onnx``, as after ``onnxpress export``.

Cache: ``$ONNXPRESS_TINY_CACHE`` or ``~/.cache/onnxpress/tiny/<transformers version>/
<torch version>/<arch>-<exporter>-<attn>-<past|nopast>/model.onnx``; each entry is
written into a temporary folder and renamed into place, so an interrupted export
never leaves a half-written model and concurrent test workers cannot collide.

The signature of :func:`tiny_model` and the ``*_ARCHS`` lists are a stable API
the pass tests build on.

Exported graph inputs: encoders ``input_ids``, ``attention_mask`` (+ ``token_type_ids``
for optimum BERT/ELECTRA, values must be 0/1); decoders ``input_ids``,
``attention_mask`` (+ ``position_ids`` with optimum) and, with ``with_past``,
``past_key_values.<i>.key/value`` [batch, kv_heads, past, head] -> ``present.<i>.key/value``;
ViT ``pixel_values`` [batch, 3, 32, 32]. All weights (biases and norms included) are
seeded random, so no two initializers are equal.

Known limits (torch 2.13 / transformers 4.57 / onnxruntime 1.31):
* ELECTRA and MPNet have no SDPA implementation: ``attn="sdpa"`` exports eager
  attention for them (the cache entry says ``eager``).
* TorchScript cannot trace transformers' vmap-based mask builders; the export swaps in
  optimum's vectorised equivalents (as optimum itself does).
* ``exporter="dynamo", opset=23`` graphs use the ONNX ``Attention`` /
  ``RotaryEmbedding`` ops; ORT 1.31 rejects the rotary ones (cos/sin cache shape), so
  those exports are for graph analysis only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENCODER_ARCHS = ["bert", "roberta", "distilbert", "electra", "mpnet", "xlm-roberta", "modernbert"]
DECODER_ARCHS = ["gpt2", "llama", "qwen2", "mistral", "phi", "gpt-neox", "qwen3", "gemma", "phi3", "granite"]
VISION_ARCHS = ["vit"]
ALL_ARCHS = ENCODER_ARCHS + DECODER_ARCHS + VISION_ARCHS
EXPORTERS = ["optimum", "torchscript", "dynamo"]
# archs whose config uses grouped-query attention (num_kv_heads < num_heads): arch -> KV heads
KV_HEADS = {"qwen2": 2, "mistral": 2, "qwen3": 2, "gemma": 1, "phi3": 2, "granite": 2}
GQA_ARCHS = list(KV_HEADS)
ROTARY_ARCHS = ["llama", "qwen2", "mistral", "phi", "gpt-neox", "qwen3", "gemma", "phi3", "granite", "modernbert"]

HIDDEN = 64
HEADS = 4
HEAD_SIZE = HIDDEN // HEADS
FFN = 128
LAYERS = 2
VOCAB = 1000
MAX_POS = 128
SEED = 0
IMAGE_SIZE = 32
PATCH_SIZE = 8


# arch -> (transformers config class, its own names for the shared sizes, arch-specific fields)
_LAYOUT = dict(hidden="hidden_size", layers="num_hidden_layers", heads="num_attention_heads",
               ffn="intermediate_size", positions="max_position_embeddings")
_CONFIGS = {
    "bert": ("BertConfig", _LAYOUT, {}),
    "roberta": ("RobertaConfig", _LAYOUT, {"max_position_embeddings": MAX_POS + 2}),
    "xlm-roberta": ("XLMRobertaConfig", _LAYOUT, {"max_position_embeddings": MAX_POS + 2}),
    # embedding_size != hidden_size: exercises a weight MatMul outside the layers
    "electra": ("ElectraConfig", _LAYOUT, {"embedding_size": 32}),
    "mpnet": ("MPNetConfig", _LAYOUT, {"max_position_embeddings": MAX_POS + 2}),
    "distilbert": ("DistilBertConfig", dict(hidden="dim", layers="n_layers", heads="n_heads", ffn="hidden_dim",
                                            positions="max_position_embeddings"), {}),
    "gpt2": ("GPT2Config", dict(hidden="n_embd", layers="n_layer", heads="n_head", ffn="n_inner",
                                positions="n_positions"), {}),
    "llama": ("LlamaConfig", _LAYOUT, {"num_key_value_heads": HEADS}),
    "qwen2": ("Qwen2Config", _LAYOUT, {"num_key_value_heads": KV_HEADS["qwen2"]}),
    "mistral": ("MistralConfig", _LAYOUT, {"num_key_value_heads": KV_HEADS["mistral"], "sliding_window": None}),
    "phi": ("PhiConfig", _LAYOUT, {}),
    "gpt-neox": ("GPTNeoXConfig", _LAYOUT, {}),
    # head_dim given: these configs default to their large models' head size
    "qwen3": ("Qwen3Config", _LAYOUT, {"num_key_value_heads": KV_HEADS["qwen3"], "head_dim": HEAD_SIZE}),
    "gemma": ("GemmaConfig", _LAYOUT, {"num_key_value_heads": KV_HEADS["gemma"], "head_dim": HEAD_SIZE}),
    # packed qkv_proj and gate_up_proj
    "phi3": ("Phi3Config", _LAYOUT, {"num_key_value_heads": KV_HEADS["phi3"], "pad_token_id": 0}),
    # scores scaled by a configured multiplier instead of 1/sqrt(head size)
    "granite": ("GraniteConfig", _LAYOUT, {"num_key_value_heads": KV_HEADS["granite"], "attention_multiplier": 1.0}),
    # packed Wqkv, GeGLU, local (windowed) attention in every other layer
    "modernbert": ("ModernBertConfig", _LAYOUT, {"global_attn_every_n_layers": 2, "local_attention": 16,
                                                 "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
                                                 "cls_token_id": 2, "sep_token_id": 3}),
    "vit": ("ViTConfig", {k: v for k, v in _LAYOUT.items() if k != "positions"},
            {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}),
}


def _make_config(arch: str, attn: str, config: dict | None = None):
    import transformers as tf

    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ALL_ARCHS}")
    class_name, names, extra = _CONFIGS[arch]
    sizes = dict(hidden=HIDDEN, layers=LAYERS, heads=HEADS, ffn=FFN, positions=MAX_POS)
    kwargs = {names[key]: value for key, value in sizes.items() if key in names}
    if arch != "vit":
        kwargs["vocab_size"] = VOCAB
    cfg = getattr(tf, class_name)(**{**kwargs, **extra, **(config or {})})
    cfg._attn_implementation = attn
    return cfg


def tiny_config_values(arch: str) -> dict:
    """What the analysis must find for ``arch``: num_layers, num_heads, num_kv_heads,
    head_size, ffn_size, hidden_size, causal, rotary, kind."""
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ALL_ARCHS}")
    return {
        "num_layers": LAYERS,
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS.get(arch, HEADS),
        "head_size": HEAD_SIZE,
        "ffn_size": FFN,
        "hidden_size": HIDDEN,
        "causal": arch in DECODER_ARCHS,
        "rotary": arch in ROTARY_ARCHS,
        "kind": "encoder" if arch in ENCODER_ARCHS else "decoder" if arch in DECODER_ARCHS else "vision",
    }


def cache_root() -> Path:
    import torch
    import transformers

    base = os.environ.get("ONNXPRESS_TINY_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "onnxpress" / "tiny"
    return root / transformers.__version__ / torch.__version__.split("+")[0]


def _build_hf_model(arch: str, attn: str, config: dict | None = None):
    import torch
    import transformers as tf

    torch.manual_seed(SEED)
    cfg = _make_config(arch, attn, config)
    if arch in ENCODER_ARCHS:
        model = tf.AutoModel.from_config(cfg, attn_implementation=attn)
    elif arch in DECODER_ARCHS:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    else:
        model = tf.ViTModel(cfg, add_pooling_layer=False)  # attn set on the config
    _randomize(model)
    model.eval()
    return model


def _randomize(model) -> None:
    """Give every parameter distinct random values.

    HF init leaves biases at 0 and norm weights at 1; exporters then fold equal
    initializers into one (Identity-shared) tensor and fidelity checks of passes see
    a degenerate model. Seeded, so exports are reproducible.
    """
    import torch

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            lname = name.lower()
            if p.ndim == 1 and (
                "norm" in lname
                or lname.endswith("ln_1.weight")
                or lname.endswith("ln_2.weight")
                or lname.endswith("ln_f.weight")
            ):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.1 * noise)


def effective_attn(arch: str, attn: str) -> str:
    """The attention implementation actually used: archs without SDPA support
    (ELECTRA, MPNet in transformers 4.57) always export eager attention."""
    if attn == "sdpa":
        import transformers as tf

        cls = {"electra": tf.ElectraModel, "mpnet": tf.MPNetModel}.get(arch)
        if cls is not None and not getattr(cls, "_supports_sdpa", False):
            return "eager"
    return attn


_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _save_tokenizer(arch: str, out: Path) -> None:
    """A tiny byte-level BPE tokenizer (vocab < VOCAB, trained in well under a second
    on a fixed text, so it is deterministic) that turns any text into varied ids, for
    tests that calibrate from text. Vision models get none."""
    if arch in VISION_ARCHS:
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (__doc__ or "") + " ".join(ALL_ARCHS) + " the quick brown fox jumps over the lazy dog " * 4
    tok.train_from_iterator([corpus] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=MAX_POS,
        model_input_names=(
            ["input_ids", "token_type_ids", "attention_mask"]
            if arch in ("bert", "electra")
            else ["input_ids", "attention_mask"]
        ),
    )
    fast.save_pretrained(out)


def _ensure_side_files(arch: str, attn: str, entry: Path, config: dict | None = None) -> None:
    """``config.json`` and the tokenizer next to ``model.onnx`` (what ``onnxpress
    compile`` looks for), added to cache entries written before they were kept."""
    marker = entry / ("config.json" if arch in VISION_ARCHS else "tokenizer.json")
    if marker.exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".side-", dir=entry))
    try:
        _make_config(arch, attn, config).save_pretrained(tmp)
        _save_tokenizer(arch, tmp)
        for f in tmp.iterdir():
            if not (entry / f.name).exists():
                os.replace(f, entry / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tiny_hf(arch: str, out: Path, model=None) -> Path:
    """The tiny random-weight Hugging Face model of ``arch`` (``model``, or built) with its
    tokenizer, saved into the folder ``out`` as ``save_pretrained`` does."""
    (model if model is not None else _build_hf_model(arch, "sdpa")).save_pretrained(out)
    _save_tokenizer(arch, out)
    return out


def _export_optimum(model, arch: str, with_past: bool, hf_dir: Path, out_dir: Path) -> None:
    from optimum.exporters.onnx import main_export

    save_tiny_hf(arch, hf_dir, model)
    if arch in DECODER_ARCHS:
        task = "text-generation-with-past" if with_past else "text-generation"
    else:
        task = "feature-extraction"
    main_export(
        str(hf_dir),
        output=str(out_dir),
        task=task,
        opset=None,
        device="cpu",
        do_validation=False,
        no_post_process=True,
        local_files_only=True,
        library_name="transformers",
    )


def _torch_inputs(arch: str):
    import torch

    g = torch.Generator().manual_seed(SEED)
    if arch in VISION_ARCHS:
        return (
            ("pixel_values",),
            (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),),
            {"pixel_values": {0: "batch"}},
        )
    ids = torch.randint(5, VOCAB, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.int64)
    names = ("input_ids", "attention_mask")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return names, (ids, mask), axes


@contextlib.contextmanager
def _masks_without_vmap():
    """transformers >= 4.53 builds attention masks with torch.vmap, which the
    TorchScript exporter cannot trace (``RuntimeError: unordered_map::at``); swap in
    optimum's vectorised equivalents for the duration of the export, as optimum does."""
    try:
        from optimum.exporters.onnx.model_patcher import eager_mask_without_vmap, sdpa_mask_without_vmap
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # older transformers: nothing to patch
        yield
        return
    saved = {k: ALL_MASK_ATTENTION_FUNCTIONS[k] for k in ("sdpa", "eager")}
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", sdpa_mask_without_vmap)
    ALL_MASK_ATTENTION_FUNCTIONS.register("eager", eager_mask_without_vmap)
    try:
        yield
    finally:
        for k, fn in saved.items():
            ALL_MASK_ATTENTION_FUNCTIONS.register(k, fn)


def _export_torch(model, arch: str, with_past: bool, out_dir: Path, dynamo: bool, opset: int | None) -> None:
    if not dynamo:
        with _masks_without_vmap():
            return _export_torch_impl(model, arch, with_past, out_dir, dynamo, opset or 17)
    return _export_torch_impl(model, arch, with_past, out_dir, dynamo, opset)


def _export_torch_impl(
    model, arch: str, with_past: bool, out_dir: Path, dynamo: bool, opset: int | None
) -> None:
    import torch

    if with_past:
        return _export_torch_with_past(model, arch, out_dir, dynamo, opset)
    names, args, axes = _torch_inputs(arch)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def _run(self, **kwargs):
            if arch in DECODER_ARCHS:
                kwargs["use_cache"] = False
            out = self.inner(**kwargs, return_dict=True)
            return out.logits if arch in DECODER_ARCHS else out.last_hidden_state

    class TextWrapper(Wrapper):
        def forward(self, input_ids, attention_mask):
            return self._run(input_ids=input_ids, attention_mask=attention_mask)

    class VisionWrapper(Wrapper):
        def forward(self, pixel_values):
            return self._run(pixel_values=pixel_values)

    Wrapper = VisionWrapper if arch in VISION_ARCHS else TextWrapper  # noqa: N806
    wrapper = Wrapper(model).eval()
    out_name = "logits" if arch in DECODER_ARCHS else "last_hidden_state"
    dyn = {n: {k: torch.export.Dim.AUTO for k in ax} for n, ax in axes.items()}
    _onnx_export(wrapper, args, out_dir / "model.onnx", list(names), [out_name], dynamo, opset,
                 dynamic_axes={**axes, out_name: {0: "batch"}}, dynamic_shapes=tuple(dyn[n] for n in names))


def _onnx_export(wrapper, args, path: Path, in_names: list[str], out_names: list[str], dynamo: bool,
                 opset: int | None, *, dynamic_axes: dict, dynamic_shapes: tuple) -> None:
    """torch.onnx.export with either exporter: dynamo takes ``dynamic_shapes``, TorchScript ``dynamic_axes``."""
    import torch

    with torch.no_grad():
        if dynamo:
            prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=in_names, output_names=out_names,
                                     dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
                                     opset_version=opset)
            prog.save(str(path))
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=in_names,
                              output_names=out_names, dynamic_axes=dynamic_axes, opset_version=opset or 17)


def _export_torch_with_past(model, arch: str, out_dir: Path, dynamo: bool, opset: int | None) -> None:
    """Decoder with KV cache through torch.onnx: past key/values are flat graph inputs."""
    import torch
    from transformers import DynamicCache

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(SEED)
    past_len, seq = 5, 3
    ids = torch.randint(5, VOCAB, (2, seq), generator=g)
    mask = torch.ones(2, past_len + seq, dtype=torch.int64)
    past = [torch.randn(2, n_kv, past_len, head, generator=g) for _ in range(2 * n_layers)]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, *flat_past):
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(flat_past[2 * i], flat_past[2 * i + 1], i)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            pkv = out.past_key_values
            flat = []
            for i in range(n_layers):
                if hasattr(pkv, "layers"):
                    flat += [pkv.layers[i].keys, pkv.layers[i].values]
                else:
                    flat += [pkv.key_cache[i], pkv.value_cache[i]]
            return (out.logits, *flat)

    in_names = ["input_ids", "attention_mask"]
    out_names = ["logits"]
    for i in range(n_layers):
        in_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        out_names += [f"present.{i}.key", f"present.{i}.value"]
    auto = torch.export.Dim.AUTO
    dyn = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple([{0: auto, 2: auto}] * (2 * n_layers)))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    axes.update({n: {0: "batch", 2: "past"} for n in in_names[2:]})
    axes.update({n: {0: "batch", 2: "total"} for n in out_names[1:]})
    _onnx_export(Wrapper(model).eval(), (ids, mask, *past), out_dir / "model.onnx", in_names, out_names, dynamo,
                 opset, dynamic_axes=axes, dynamic_shapes=dyn)


def tiny_model(
    arch: str,
    exporter: str = "optimum",
    *,
    with_past: bool = False,
    attn: str = "sdpa",
    opset: int | None = None,
    config: dict | None = None,
) -> Path:
    """Path to a cached ONNX export of a tiny random-weight ``arch``.

    ``exporter``: "optimum" (optimum ``main_export``), "torchscript"
    (``torch.onnx.export(dynamo=False)``) or "dynamo" (``torch.onnx.export(dynamo=True)``).
    ``with_past``: decoders only; export with KV-cache inputs/outputs.
    ``attn``: HF ``attn_implementation`` ("sdpa", the HF and optimum default, or "eager").
    ``opset``: torch exporters only; None = the exporter's default (TorchScript: 17,
    dynamo: 18). Dynamo with ``opset=23`` emits the ONNX ``Attention`` op.
    ``config``: transformers config fields over the tiny ones (e.g. ``{"sliding_window": 4}``).
    """
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ALL_ARCHS}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', not {attn!r}")
    if with_past and arch not in DECODER_ARCHS:
        raise ValueError(f"with_past is for decoders ({DECODER_ARCHS}), not {arch!r}")
    if opset is not None and exporter == "optimum":
        raise ValueError("opset is for the torch exporters; optimum picks its own")
    attn = effective_attn(arch, attn)
    name = f"{arch}-{exporter}-{attn}-{'past' if with_past else 'nopast'}"
    name += "".join(f"-{key}{value}" for key, value in sorted((config or {}).items()))
    entry = cache_root() / (name if opset is None else f"{name}-opset{opset}")
    path = entry / "model.onnx"
    if path.exists():
        _ensure_side_files(arch, attn, entry, config)
        return path
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        out_dir = tmp / "onnx"
        out_dir.mkdir()
        model = _build_hf_model(arch, attn, config)
        if exporter == "optimum":
            _export_optimum(model, arch, with_past, tmp / "hf", out_dir)
        else:
            _export_torch(model, arch, with_past, out_dir, dynamo=exporter == "dynamo", opset=opset)
        if not (out_dir / "model.onnx").exists():
            raise RuntimeError(f"export of {arch} with {exporter} wrote no model.onnx")
        _ensure_side_files(arch, attn, out_dir, config)
        try:
            os.replace(out_dir, entry)
        except OSError:
            if not path.exists():  # someone else won the race only if the model is there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _derived_entry(src: Path, suffix: str, rewrite) -> Path:
    """``src``'s folder copied beside it as ``<folder><suffix>`` with ``rewrite(model.onnx path)``
    applied to the copy, once (the cache entry appears whole or not at all)."""
    entry = src.parent.with_name(src.parent.name + suffix)
    if not (entry / "model.onnx").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            shutil.copytree(src.parent, tmp / "onnx")
            rewrite(tmp / "onnx" / "model.onnx")
            try:
                os.replace(tmp / "onnx", entry)
            except OSError:
                if not (entry / "model.onnx").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / "model.onnx"


def tiny_model_fp16(arch: str, *, with_past: bool = False) -> Path:
    """The optimum export of ``arch`` converted to float16 as ``onnxpress export --dtype fp16``
    converts it (inputs, outputs and the KV cache included), cached beside it."""
    from onnxpress.export import to_float16

    return _derived_entry(tiny_model(arch, with_past=with_past), "-fp16", to_float16)


def tiny_model_tied(arch: str, *, with_past: bool = False) -> Path:
    """The optimum export of decoder ``arch`` with its LM head reading ``Transpose(embedding
    table)``, as exports of models with tied embeddings (SmolLM2) write it; cached beside it."""
    import onnx_ir as ir

    from onnxpress.model_io import load_model, save_model

    def tie(path: Path) -> None:
        model = load_model(path)
        gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                      and len(n.inputs[0].shape) == 2)
        vocab = gather.inputs[0].shape[0]
        head = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                    and n.inputs[1].shape[1] == vocab)
        transpose = ir.node("Transpose", [gather.inputs[0]], {"perm": [1, 0]}, name="tied_lm_head_Transpose")
        model.graph.insert_before(head, transpose)
        head.replace_input_with(1, transpose.outputs[0])
        save_model(model, path)

    return _derived_entry(tiny_model(arch, with_past=with_past), "-tied", tie)


def hf_layer_params(arch: str, layer: int = 0) -> int:
    """Parameters of one transformer block of the tiny HF model (weights, biases and
    norms of ``layer``), to check the analysis' per-layer count against."""
    import re

    model = _build_hf_model(arch, "eager")
    pat = re.compile(rf"(^|\.)(layer|layers|h)\.{layer}\.")
    return sum(p.numel() for name, p in model.named_parameters() if pat.search(name))


def random_token_batches(model, n_batches: int, batch: int, seq: int, seed: int) -> list[dict]:
    """Random-token feeds with some right padding (exercises the padding mask)."""
    import numpy as np

    from onnxpress.calibration import make_feeds

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        ids = rng.integers(5, VOCAB, (batch, seq))
        mask = np.ones_like(ids)
        mask[0, seq - seq // 4:] = 0
        batches.append(make_feeds(model, ids, mask, seed=seed))
    return batches


def random_token_context(model, seed: int = 0):
    """A compile context whose calibration (4 batches of 4 x 24) and verification (2 x 16) are
    random tokens with some padding, and whose reference is ``model``'s own outputs."""
    from onnxpress.calibration import CalibrationSet
    from onnxpress.fidelity import primary_outputs
    from onnxpress.pipeline import CompileContext

    calib = CalibrationSet(random_token_batches(model, 4, 4, 24, seed), "random tokens")
    ctx = CompileContext(verification=random_token_batches(model, 1, 2, 16, seed + 100), calibration=calib, threads=1)
    ctx.output_names = primary_outputs(model)
    ctx.reference = ctx.run(model)
    return ctx


def greedy_tokens(session, model, prompt, steps: int, use_cache: bool) -> list[int]:
    """Greedy tokens of a decoder ``session`` (``model``: its graph, for the feeds) after
    ``prompt`` ([1, n] ids); with ``use_cache`` one token per step through the KV cache."""
    import numpy as np

    from onnxpress.calibration import make_feeds

    ids = prompt.copy()
    feeds = make_feeds(model, ids, np.ones_like(ids))
    out = []
    past = None
    for _ in range(steps):
        if use_cache and past is not None:
            step_ids = ids[:, -1:]
            feeds = {"input_ids": step_ids, "attention_mask": np.ones((1, ids.shape[1]), np.int64),
                     "position_ids": np.array([[ids.shape[1] - 1]], np.int64), **past}
        elif not use_cache:
            feeds = make_feeds(model, ids, np.ones_like(ids))
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        results = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))
        token = int(results["logits"][0, -1].argmax())
        out.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
        past = {n.replace("present", "past_key_values"): v for n, v in results.items() if n.startswith("present")}
    return out
