"""Efficient-attention substitution: each decomposed attention core -> one fused node.

Exported transformers spell attention as MatMul / Transpose / Reshape / scale /
mask Add / Softmax / MatMul, plus repeat-KV and KV-cache Concat in decoders. This
pass replaces every core the analysis map recognises with one fused node, keeping
the projections and the rotary subgraph (the fused node reads the post-rotary Q/K):

* ``target: onnxruntime``: ``com.microsoft.GroupQueryAttention`` for causal cores
  (decoders, with or without GQA and KV cache), ``com.microsoft.MultiHeadAttention``
  otherwise (encoders, ViT);
* ``target: onnx``: ONNX ``Attention`` (opset 23; the model is version-converted);
* ``target: onnxpress``: ``onnxpress.Attention`` from onnxpress's op library.

Exact (``window: 0``) substitution is lossless: the fused ops compute the same
softmax(QK^T * scale + mask) V, with the scale re-collected from every factor the
exporter spread over Q, K and the scores, and the model's own mask. ``window > 0``
(target onnxpress only) restricts each query to the ``window`` nearest keys: an
approximation whose error is measured and reported like any lossy pass.

Chunked / speculative decoding (several new tokens after a KV cache at batch > 1):
ORT's GroupQueryAttention refuses it at run time, so with ``chunked_decoding: true`` the
onnxruntime target uses MultiHeadAttention (the model's own mask as bias) for cached
layers, and leaves grouped-query layers alone with a one-line reason (use the onnxpress
or onnx target there); both of those take such steps at any batch.

KV cache: the fused node takes the cache graph inputs as past_key / past_value
(BNSH, as exported) and takes over the ``present.*`` graph outputs, names included.
Layers are matched by the analysis map (head counts per layer, so head-pruned models
work); a layer the pass does not understand is left as it is, with the reason in the
details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxpress.analysis import analyze
from onnxpress.analysis.attention.fused_ops import ONNX_ATTENTION
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.attention.build import AttentionTape, build_fused, replace_shape_reads, wire
from onnxpress.passes.attention.match import Site, match_site

ONNX_ATTENTION_OPSET = ONNX_ATTENTION.since_version


@dataclass
class AttentionConfig(PassConfig):
    target: Literal["onnxruntime", "onnx", "onnxpress"] = "onnxruntime"
    # >0: each query attends only to keys within this many positions (approximate; onnxpress only)
    window: int = 0
    layers: list[int] | None = None  # layer indices to substitute; None = all
    # True: the model will be run with several new tokens after a KV cache at batch > 1
    # (chunked / speculative decoding); target onnxruntime then avoids GroupQueryAttention there
    chunked_decoding: bool = False

    def validate(self) -> None:
        if self.window < 0:
            self.fail("window", "must be >= 0 (0 = exact attention)")
        if self.window and self.target != "onnxpress":
            self.fail("window", f"needs target onnxpress (the {self.target} ops have no sliding window here)")
        if self.layers is not None and any(i < 0 for i in self.layers):
            self.fail("layers", "must be non-negative layer indices, e.g. [0, 1]")


@register_pass
class AttentionPass(Pass):
    name = "attention"
    config_class = AttentionConfig
    lossless = True
    mapped_memory_multiple = 0.0  # rewires the graph; weights stay where they are
    needs_attention = True

    def __init__(self, config=None):
        super().__init__(config)
        # only the exact substitution is checked as lossless; a window is verified against its reported error
        self.lossless = self.config.window == 0

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: AttentionConfig = self.config
        # the onnx target may version-convert the graph first: the map must be of the converted one
        tmap = ctx.analysis(model) if cfg.target != "onnx" else None
        return substitute_attention(model, cfg.target, window=cfg.window, layers=cfg.layers,
                                    chunked_decoding=cfg.chunked_decoding, tmap=tmap)


def substitute_attention(
    model: ir.Model, target: str = "onnxruntime", *, window: int = 0, layers: list[int] | None = None,
    chunked_decoding: bool = False, tmap=None,
) -> Outcome:
    """Rewrite ``model`` in place; the pass's work, callable without a compile context
    (``tmap``: the model's analysis map when the caller has it)."""
    if target == "onnx":
        _ensure_opset(model, ONNX_ATTENTION_OPSET)
    tmap = tmap or analyze(model)
    wanted = set(layers) if layers is not None else None
    sites: list[tuple[int, Site]] = []
    per_layer: list[dict] = []
    for layer in tmap.layers:
        if wanted is not None and layer.index not in wanted or layer.attention is None:
            continue
        site = match_site(layer.attention)
        if isinstance(site, str):
            per_layer.append({"layer": layer.index, "skipped": site})
        else:
            sites.append((layer.index, site))

    graph = model.graph
    done: list[Site] = []
    ops: dict[str, int] = {}
    opsets: dict[str, int] = {}
    shared: dict = {}
    for index, site in sites:
        tape = AttentionTape(graph, f"/attention_fused/layer{index}", shared=shared)
        built = build_fused(tape, site, target, window, chunked_decoding)
        if isinstance(built, str):
            per_layer.append({"layer": index, "skipped": built})
            continue
        node, spec = built
        wire(graph, tape, site, node)
        done.append(site)
        ops[spec.kind] = ops.get(spec.kind, 0) + 1
        opsets[spec.domain] = spec.since_version
        att = site.att
        per_layer.append({"layer": index, "op": spec.kind, "num_heads": att.num_heads,
                          "num_kv_heads": att.num_kv_heads, "head_size": att.head_size,
                          "scale": site.scale, "kv_cache": site.past_key is not None})
    if done:
        for domain, version in opsets.items():
            model.opset_imports.setdefault(domain, version)
        common.RemoveUnusedNodesPass()(model)
        replaced = replace_shape_reads(graph, done)
        if replaced:
            common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
    per_layer.sort(key=lambda r: r["layer"])
    details = {"target": target, "window": window, "chunked_decoding": chunked_decoding, "ops": ops,
               "layers": per_layer, "skipped": sum(1 for r in per_layer if "skipped" in r)}
    if window:
        details["note"] = f"approximate: sliding window of {window} keys; the error is measured, not zero"
    return Outcome(changes={"attention_fused": len(done)}, details=details)


def _ensure_opset(model: ir.Model, version: int) -> None:
    """ONNX ``Attention`` exists from opset 23; older models are version-converted first."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return
    if current < 18:
        # opset 18 moved Reduce* axes from attribute to input; onnxscript's converter (0.7)
        # leaves the attribute in place, onnx's reference converter adapts it
        import onnx.version_converter

        from onnxpress.model_io import model_proto

        converted = ir.from_proto(onnx.version_converter.convert_version(model_proto(model), version))
        model.graph = converted.graph  # the opset imports live on the graph
        return
    import onnxscript.version_converter

    onnxscript.version_converter.convert_version(model, version)
