"""Graph rewrites of the quantize pass (onnx-ir, in place).

Every rewrite emits the node patterns ONNX Runtime's CPU provider fuses into integer
kernels, never kernels of our own:

- static: ``QuantizeLinear -> DequantizeLinear`` on the input (per tensor) and an int8
  weight behind ``DequantizeLinear(axis=1)`` (per output channel) -> ``MatMulIntegerToFloat``
  (or ``QLinearMatMul``), bias Add included;
- dynamic: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)``
  (what ``quantize_dynamic`` writes) -> ``DynamicQuantizeMatMul``;
- weight-only: the MatMul becomes ``com.microsoft.MatMulNBits``.

MatMuls reading one input (q/k/v, gate/up) may share one kernel (``pack``), split after it or
read packed by GroupQueryAttention. An LM head tied to the embedding table (its weight is
``Transpose(table)``) gets weights of its own; under weight-only, the embedding Gather then
reads the head's codes (``GatherBlockQuantized``), so the table is stored once. An LM head may
be split by vocabulary rows into kernels of different bits, their outputs concatenated (a tied
embedding then looks each token up in the codes of its rows' kernel).

Half-precision models: MatMulNBits and the int8 embedding rows take the model's float
type; the int8 MatMul kernels (and DynamicQuantizeLinear) take float32 only, so a float16
MatMul is first cast to float32 around it (``float32_island``) and then rewritten.

Also: finding the MatMuls to quantise (from the analysis when it recognises the model,
else every MatMul with a constant 2-D weight) and SmoothQuant's per-channel scaling,
folded into the producer of the input where that is exact and cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import stored_array, unmap
from onnxpress.editing import GraphEditor, drop_unused_initializers, editor_of, remove_dead_nodes

EMBEDDING_ROWS_AT_A_TIME = 4096

NORM_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
}


@dataclass(eq=False)
class QLinear:
    """A MatMul with a constant weight ``[K, N]``, with what the analysis knows of it."""

    node: ir.Node
    role: str  # q k v qkv o up gate down lm_head other
    layer: int | None = None

    # read through the node: smoothing may swap the weight or put a Mul before the input
    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "matmul"

    def weight_array(self) -> np.ndarray:
        """The stored weight as float32, a copy: a weight still in the input's data file is
        unmapped again, so reading every weight once does not hold the whole file in memory."""
        array = weight_source(self.weight).astype(np.float32)
        producer = self.weight.producer()
        unmap(producer.inputs[0] if producer is not None and producer.op_type == "Transpose" else self.weight)
        return array

    @property
    def dtype(self) -> np.dtype:
        """The float type the MatMul computes in (its weight's: MatMul's inputs share one type)."""
        return weight_source(self.weight).dtype

    @property
    def transposed(self) -> bool:
        """The weight is read through a Transpose of a stored table (a tied LM head)."""
        return stored_array(self.weight) is None


@dataclass
class CodeTable:
    """Block-quantised rows ``[N, K]`` as MatMulNBits and GatherBlockQuantized read them."""

    codes: ir.Value  # uint8 [N, blocks, blob]
    scales: ir.Value  # [N, blocks], the activations' type
    zero_points: ir.Value | None
    bits: int
    block_size: int
    K: int
    N: int

    @classmethod
    def of_kernel(cls, node: ir.Node) -> CodeTable:
        """The table a MatMulNBits node computes with."""
        zero_points = node.inputs[3] if len(node.inputs) > 3 else None
        return cls(node.inputs[1], node.inputs[2], zero_points,
                   *(node.attributes.get_int(a) for a in ("bits", "block_size", "K", "N")))


def weight_source(value: ir.Value) -> np.ndarray | None:
    """The ``[K, N]`` array a MatMul weight holds: stored, or a stored ``[N, K]`` table read through
    ``Transpose`` (an LM head tied to the embedding table reads it so); else None."""
    stored = stored_array(value)
    if stored is not None:
        return stored
    node = value.producer()
    if node is None or node.op_type != "Transpose" or tuple(node.attributes.get_ints("perm", (1, 0))) != (1, 0):
        return None
    table = stored_array(node.inputs[0])
    return table.T if table is not None and table.ndim == 2 else None


def find_linears(model: ir.Model, tmap=None, *, transposed: bool = False) -> tuple[list[QLinear], dict[str, str]]:
    """The MatMuls to quantise and, for other weight-bearing nodes, why they stay float.
    ``transposed``: also those whose weight is a transposed stored table (rewrites that store a
    new weight of their own can take those; rewrites that edit the weight in place cannot)."""
    roles: dict[int, tuple[str, int | None]] = {}
    if tmap is not None:
        for layer in getattr(tmap, "layers", []):
            att, ffn = layer.attention, layer.ffn
            pairs = []
            if att is not None:
                pairs += [("q", att.q), ("k", att.k), ("v", att.v), ("qkv", att.qkv), ("o", att.o)]
            if ffn is not None:
                pairs += [("up", ffn.up), ("gate", ffn.gate), ("down", ffn.down)]
            for role, lin in pairs:
                if lin is not None:
                    roles[id(lin.node)] = (role, layer.index)
    linears: list[QLinear] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type == "Gemm" and stored_array(node.inputs[1]) is not None:
            skipped[node.name] = "op type (Gemm)"
            continue
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = weight_source(node.inputs[1]) if transposed else stored_array(node.inputs[1])
        if w is None or stored_array(node.inputs[0]) is not None:
            continue  # activation x activation (attention scores) stays float
        if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
            skipped[node.name] = f"op type (weight rank {w.ndim} / {w.dtype})"
            continue
        role, layer = roles.get(id(node), ("other", None))
        linears.append(QLinear(node, role, layer))
    if linears and tmap is not None and getattr(tmap, "causal", False):
        # the LM head is the widest non-layer MatMul of a decoder
        others = [lin for lin in linears if lin.role == "other"]
        if others:
            head = max(others, key=lambda lin: weight_source(lin.weight).shape[1])
            head.role = "lm_head"
    return linears, skipped


def _stem(name: str) -> str:
    return name.replace("/", "_").strip("_")


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    node.replace_input_with(index, value)


class QuantRewriter:
    """Applies the rewrites to one model; shares one activation quantiser per input tensor."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.editor = GraphEditor(model)
        self._static_q: dict[str, ir.Value] = {}
        self._dynamic_q: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self._float32_inputs: dict[str, ir.Value] = {}  # half-precision input -> its float32 cast

    def _insert(self, before: ir.Node, nodes: Iterable[ir.Node]) -> None:
        self.graph.insert_before(before, list(nodes))

    def float32_island(self, lin: QLinear) -> None:
        """A MatMul on half-precision activations reads a float32 cast of its input (one per
        input tensor, shared by q/k/v) and its output is cast back, so the int8 rewrite that
        follows sees a float32 MatMul."""
        x, y = lin.input, lin.node.outputs[0]
        if lin.dtype == np.float32:
            return
        x32 = self._float32_inputs.get(x.name)
        if x32 is None:
            cast_in = ir.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{_stem(x.name)}_CastFloat32")
            x32 = cast_in.outputs[0]
            x32.name = self.editor.fresh_name(f"{x.name}_float32")
            x32.type, x32.shape = ir.TensorType(ir.DataType.FLOAT), x.shape
            self._insert(lin.node, [cast_in])
            self._float32_inputs[x.name] = x32
        _set_input(lin.node, 0, x32)
        cast_out = ir.node("Cast", [], {"to": ir.DataType.from_numpy(lin.dtype)}, num_outputs=1,
                           name=f"{_stem(lin.name)}_CastBack")
        back = cast_out.outputs[0]
        back.type, back.shape = y.type, y.shape
        ir.convenience.replace_all_uses_with(y, back, replace_graph_outputs=True)
        cast_out.resize_inputs(1)
        cast_out.replace_input_with(0, y)
        name = y.name
        y.name = self.editor.fresh_name(f"{name}_float32")
        y.type = ir.TensorType(ir.DataType.FLOAT)
        back.name = name
        self.graph.insert_after(lin.node, [cast_out])

    def static(
        self,
        lin: QLinear,
        w_codes: np.ndarray,
        w_scale: np.ndarray,
        x_scale: float,
        x_zp: int,
        x_type: str,
        emit: str = "qdq",
    ) -> None:
        self.float32_island(lin)
        if emit == "contrib" and x_type == "uint8":
            return self._static_contrib(lin, w_codes, w_scale, x_scale, x_zp)
        base = _stem(lin.name)
        xq, xs, xz, new = self._quantized_input(lin, base, x_scale, x_zp, x_type)
        dq_x = ir.node("DequantizeLinear", [xq, xs, xz], name=f"{base}_DequantizeInput")
        wq = self.editor.add_initializer(f"{base}_weight_int8", w_codes.astype(np.int8))
        ws = self.editor.add_initializer(f"{base}_weight_scale", w_scale.astype(np.float32))
        wz = self.editor.add_initializer(f"{base}_weight_zero_point", np.zeros(w_scale.shape, np.int8))
        dq_w = ir.node("DequantizeLinear", [wq, ws, wz], {"axis": 1}, name=f"{base}_DequantizeWeight")
        dq_x.outputs[0].name = self.editor.fresh_name(f"{base}_input_dq")
        dq_w.outputs[0].name = self.editor.fresh_name(f"{base}_weight_dq")
        new += [dq_x, dq_w]
        self._insert(lin.node, new)
        _set_input(lin.node, 0, dq_x.outputs[0])
        _set_input(lin.node, 1, dq_w.outputs[0])

    def _quantized_input(self, lin: QLinear, base: str, x_scale: float, x_zp: int, x_type: str):
        """(quantized input, its scale, its zero point, new nodes): one QuantizeLinear per
        input tensor and range, shared by the MatMuls that read it (q/k/v, gate/up)."""
        x = lin.input
        xs = self.editor.add_initializer(f"{base}_x_scale", np.array(x_scale, np.float32))
        zp_type = np.uint8 if x_type == "uint8" else np.int8
        xz = self.editor.add_initializer(f"{base}_x_zero_point", np.array(x_zp, zp_type))
        key = f"{x.name}|{x_scale}|{x_zp}|{x_type}"
        xq = self._static_q.get(key)
        if xq is not None:
            return xq, xs, xz, []
        q = ir.node("QuantizeLinear", [x, xs, xz], name=f"{base}_QuantizeInput")
        xq = q.outputs[0]
        xq.name = self.editor.fresh_name(f"{x.name}_quantized_{len(self._static_q)}")
        self._static_q[key] = xq
        return xq, xs, xz, [q]

    def _static_contrib(self, lin: QLinear, w_codes, w_scale, x_scale: float, x_zp: int) -> None:
        """``QuantizeLinear -> com.microsoft.MatMulIntegerToFloat`` with the bias inside: the node
        ORT's QDQ fusion makes of our pattern, plus the bias Add that fusion leaves outside
        (one elementwise pass over the output per MatMul, measured on MiniLM at batch 8)."""
        base = _stem(lin.name)
        xq, xs, xz, new = self._quantized_input(lin, base, x_scale, x_zp, "uint8")
        inputs = [
            xq,
            self.editor.add_initializer(f"{base}_weight_int8", w_codes.astype(np.int8)),
            xs,
            self.editor.add_initializer(f"{base}_weight_scale", w_scale.astype(np.float32)),
            xz,
            self.editor.add_initializer(f"{base}_weight_zero_point", np.zeros(w_scale.shape, np.int8)),
        ]
        add, bias = bias_add(lin.node, w_codes.shape[1])
        if bias is not None:
            inputs.append(bias)
        mm = ir.node(
            "MatMulIntegerToFloat", inputs, domain="com.microsoft", name=f"{base}_MatMulIntegerToFloat"
        )
        new.append(mm)
        self._insert(lin.node, new)
        self._replace_node_output(lin.node, mm)
        if add is not None:
            self._replace_node_output(add, mm)
        if "com.microsoft" not in self.model.opset_imports:
            self.model.opset_imports["com.microsoft"] = 1

    def shift_bias(self, lin: QLinear, shift: np.ndarray) -> None:
        """Subtract ``shift`` from the bias the MatMul's output is added to (bias correction)."""
        add, bias = bias_add(lin.node, shift.size)
        if add is None:
            return
        value = stored_array(bias)
        corrected = self.editor.add_initializer(f"{bias.name}_corrected", (value - shift).astype(value.dtype))
        add.replace_input_with(list(add.inputs).index(bias), corrected)

    def dynamic(self, linears: list[QLinear], w_codes: np.ndarray, w_scale: np.ndarray) -> None:
        """``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` for MatMuls reading one input,
        their weights side by side (several: one kernel, split after it; float32 models only)."""
        first = linears[0]
        if len(linears) == 1:
            self.float32_island(first)
        base = _stem(first.name) if len(linears) == 1 else f"{_stem(first.name)}_packed{len(linears)}"
        x = first.input
        new: list[ir.Node] = []
        if x.name not in self._dynamic_q:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}_DynamicQuantize")
            for out, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point"), strict=True):
                out.name = self.editor.fresh_name(f"{x.name}_{suffix}_{len(self._dynamic_q)}")
            self._dynamic_q[x.name] = tuple(dql.outputs)
            new.append(dql)
        xq, xs, xz = self._dynamic_q[x.name]
        wq = self.editor.add_initializer(f"{base}_weight_int8", w_codes.astype(np.int8))
        ws = self.editor.add_initializer(f"{base}_weight_scale", w_scale.astype(np.float32))
        wz = self.editor.add_initializer(f"{base}_weight_zero_point", np.zeros(w_scale.shape, np.int8))
        scale = ir.node("Mul", [xs, ws], name=f"{base}_ScaleProduct")
        mmi = ir.node("MatMulInteger", [xq, wq, xz, wz], name=f"{base}_MatMulInteger")
        cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
        mul = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{base}_Rescale")
        for n, suffix in ((scale, "scale_product"), (mmi, "int32"), (cast, "float")):
            n.outputs[0].name = self.editor.fresh_name(f"{base}_{suffix}")
        new += [scale, mmi, cast, mul]
        self._insert(first.node, new)
        self._take_outputs(linears, mul, base)

    def nbits(self, linears: list[QLinear], nw, accuracy_level: int = 0) -> ir.Node:
        """One MatMulNBits in the activations' float type (its scales too) for MatMuls that read one
        input (q/k/v, gate/up), ``nw`` holding their weights side by side; several are split
        after it (one kernel call and one activation quantisation instead of several)."""
        first = linears[0]
        base = _stem(first.name) if len(linears) == 1 else f"{_stem(first.name)}_packed{len(linears)}"
        node = self._nbits_node(first, nw, base, accuracy_level)
        self._take_outputs(linears, node, base)
        return node

    def nbits_by_rows(self, lin: QLinear, parts: list, accuracy_level: int = 0) -> list[ir.Node]:
        """One MatMulNBits per consecutive range of ``lin``'s output columns (an LM head's
        vocabulary rows), each with bits and blocks of its own, their outputs concatenated."""
        base = _stem(lin.name)
        nodes = [self._nbits_node(lin, nw, f"{base}_rows{i}", accuracy_level) for i, nw in enumerate(parts)]
        for node in nodes:
            node.outputs[0].name = self.editor.fresh_name(f"{node.name}_out")
        concat = ir.node("Concat", [n.outputs[0] for n in nodes], {"axis": -1}, name=f"{base}_ConcatRows")
        self._insert(lin.node, [concat])
        self._replace_node_output(lin.node, concat)
        return nodes

    def _nbits_node(self, first: QLinear, nw, base: str, accuracy_level: int) -> ir.Node:
        inputs = [first.input, *self.code_table(first.node, nw, base, first.dtype)]
        node = ir.node(
            "MatMulNBits",
            [v for v in inputs if v is not None],
            {"K": nw.K, "N": nw.N, "bits": nw.bits, "block_size": nw.block_size, "accuracy_level": accuracy_level},
            domain="com.microsoft",
            name=f"{base}_MatMulNBits",
        )
        if "com.microsoft" not in self.model.opset_imports:
            self.model.opset_imports["com.microsoft"] = 1
        self._insert(first.node, [node])
        return node

    def code_table(self, before: ir.Node, nw, base: str, dtype: np.dtype) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """``nw``'s (codes, scales, zero points) as initializers, the scales in the activations'
        ``dtype``: float16 storage reaches a float32 kernel through a Cast that ORT folds into a
        constant when it loads the model."""
        scales = self.editor.add_initializer(f"{base}_weight_scales", nw.scales)
        if nw.scales.dtype != dtype:
            cast = ir.node("Cast", [scales], {"to": ir.DataType.from_numpy(dtype)}, name=f"{base}_ScalesCast")
            cast.outputs[0].name = self.editor.fresh_name(f"{base}_weight_scales_{np.dtype(dtype)}")
            self._insert(before, [cast])
            scales = cast.outputs[0]
        zero_points = None
        if nw.zero_points is not None:
            zero_points = self.editor.add_initializer(f"{base}_weight_zero_points", nw.zero_points)
        return self.editor.add_initializer(f"{base}_weight_q{nw.bits}", nw.packed), scales, zero_points

    def _take_outputs(self, linears: list[QLinear], node: ir.Node, base: str) -> None:
        """``node`` (computing ``linears``' outputs side by side) replaces them: directly for one,
        through a Split along the last axis for several."""
        if len(linears) == 1:
            self._replace_node_output(linears[0].node, node)
            return
        attention = _packed_qkv_reader(linears)
        if attention is not None:  # GroupQueryAttention takes q, k and v packed in its query input
            attention.replace_input_with(0, node.outputs[0])
            for i in (1, 2):
                attention.replace_input_with(i, None)
            node.outputs[0].name = self.editor.fresh_name(f"{base}_qkv")
            for lin in linears:
                self.graph.remove(lin.node, safe=True)
            return
        widths = [weight_source(lin.weight).shape[1] for lin in linears]
        node.outputs[0].name = self.editor.fresh_name(f"{base}_out")
        split = ir.node(
            "Split",
            [node.outputs[0], self.editor.add_initializer(f"{base}_widths", np.array(widths, np.int64))],
            {"axis": -1},
            num_outputs=len(linears),
            name=f"{base}_Split",
        )
        self._insert(linears[0].node, [split])
        for lin, out in zip(linears, split.outputs, strict=True):
            self._replace_output_with(lin.node, out)

    def tied_embedding(self, gather: ir.Node, tables: list[CodeTable]) -> bool:
        """The embedding ``gather`` reads its rows from the int8/int4 codes of the LM head tied to
        its table (``tables``: the MatMulNBits inputs of the head's row ranges in order, each the
        transposed table of its rows): ``GatherBlockQuantized`` over each range's codes, scales
        and zero points, so the file stores the table once, quantised. With several ranges (a head
        split by rows) every token id is looked up in each range, clipped into it, and ``Where``
        keeps the lookup of the range it falls in."""
        if gather.attributes.get_int("axis", 0) != 0 or any(t.K % t.block_size for t in tables):
            return False
        base = _stem(gather.name or "embedding")
        ids = gather.inputs[1]
        id_type = ids.dtype.numpy() if ids.dtype is not None else np.int64
        nodes, lookups, start = [], [], 0
        for i, table in enumerate(tables):
            shape = self.editor.add_initializer(f"{base}_code_rows{i}",
                                                np.array([table.N, table.K * table.bits // 8], np.int64))
            rows = ir.node("Reshape", [table.codes, shape], name=f"{base}_CodeRows{i}")  # [N, blocks, blob] -> [N, K]
            rows.outputs[0].name = self.editor.fresh_name(f"{base}_code_rows{i}")
            nodes.append(rows)
            local = ids
            if len(tables) > 1:  # this range's row of each id, clipped into the range
                first, zero, last = (self.editor.add_initializer(f"{base}_rows{i}_{what}", np.array(v, id_type))
                                     for what, v in (("first", start), ("zero", 0), ("last", table.N - 1)))
                shift = ir.node("Sub", [ids, first], name=f"{base}_Rows{i}Sub")
                clip = ir.node("Clip", [shift.outputs[0], zero, last], name=f"{base}_Rows{i}Clip")
                nodes += [shift, clip]
                local = clip.outputs[0]
            zero_points = [table.zero_points] if table.zero_points is not None else []
            lookup = ir.node(
                "GatherBlockQuantized",
                [rows.outputs[0], local, table.scales, *zero_points],
                {"bits": table.bits, "block_size": table.block_size, "gather_axis": 0, "quantize_axis": 1},
                domain="com.microsoft",
                name=f"{base}_GatherBlockQuantized{i if len(tables) > 1 else ''}",
            )
            nodes.append(lookup)
            lookups.append((start + table.N, lookup))
            start += table.N
        result = lookups[-1][1]
        if len(lookups) > 1:
            axes = self.editor.add_initializer(f"{base}_last_axis", np.array([-1], np.int64))
        for end, lookup in reversed(lookups[:-1]):  # an earlier range's lookup where the id is below its end
            below = ir.node("Less", [ids, self.editor.add_initializer(f"{base}_rows_end{end}", np.array(end, id_type))],
                            name=f"{base}_Below{end}")
            column = ir.node("Unsqueeze", [below.outputs[0], axes], name=f"{base}_Below{end}Column")
            pick = ir.node("Where", [column.outputs[0], lookup.outputs[0], result.outputs[0]], name=f"{base}_Pick{end}")
            nodes += [below, column, pick]
            result = pick
        self._insert(gather, nodes)
        self._replace_node_output(gather, result)
        return True

    def embedding(self, node: ir.Node) -> bool:
        """Store a Gather's embedding table as int8 with one scale per row (weight-only: the
        gathered rows are dequantised exactly, LayerNorm and everything after stay float).
        Tables shared with a MatMul (tied LM heads) are left alone: the MatMul needs the floats."""
        table = stored_array(node.inputs[0])
        if table is None or table.ndim != 2 or table.dtype not in (np.float32, np.float16):
            return False
        if any(n is not node for n, _ in node.inputs[0].uses()):
            return False
        base = _stem(node.name or node.inputs[0].name)
        scale, codes = np.empty((len(table), 1), np.float32), np.empty(table.shape, np.int8)
        for r in range(0, len(table), EMBEDDING_ROWS_AT_A_TIME):  # float temporaries of a few rows, not of the table
            block = table[r : r + EMBEDDING_ROWS_AT_A_TIME].astype(np.float32)
            part = np.maximum(np.abs(block).max(axis=1, keepdims=True), 1e-12) / 127
            part = part.astype(table.dtype).astype(np.float32)  # the codes are rounded against the stored scale
            scale[r : r + len(block)], codes[r : r + len(block)] = part, np.clip(np.round(block / part), -127, 127)
        axis = node.attributes.get_int("axis", 0)
        if axis != 0:
            return False
        rows = ir.node(
            "Gather", [self.editor.add_initializer(f"{base}_table_int8", codes), node.inputs[1]],
            name=f"{base}_GatherInt8",
        )
        cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.from_numpy(table.dtype)}, name=f"{base}_Cast")
        scales = ir.node(
            "Gather",
            [self.editor.add_initializer(f"{base}_row_scales", scale.astype(table.dtype)), node.inputs[1]],
            name=f"{base}_GatherScale",
        )
        mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{base}_Dequantize")
        for n, suffix in ((rows, "rows_int8"), (cast, "rows_float"), (scales, "row_scales_gathered")):
            n.outputs[0].name = self.editor.fresh_name(f"{base}_{suffix}")
        self._insert(node, [rows, cast, scales, mul])
        self._replace_node_output(node, mul)
        return True

    def _replace_node_output(self, old: ir.Node, new: ir.Node) -> None:
        """``new`` takes over ``old``'s output value (name, type, consumers, graph output slot)."""
        self._replace_output_with(old, new.outputs[0])

    def _replace_output_with(self, old: ir.Node, replacement: ir.Value) -> None:
        out = old.outputs[0]
        replacement.type, replacement.shape = out.type, out.shape
        ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
        name = out.name
        self.graph.remove(old, safe=True)
        replacement.name = name

    def finish(self) -> None:
        # a tied LM head's Transpose of the embedding table goes once its MatMul stores weights
        # of its own (the table then serves the Gather alone and may be stored int8 too)
        remove_dead_nodes(self.model)
        self.graph.sort()
        drop_unused_initializers(self.graph)
        opset = self.model.opset_imports.get("", 13)
        if opset < 13:  # per-axis DequantizeLinear needs opset 13
            self.model.opset_imports[""] = 13


def _packed_qkv_reader(linears: list[QLinear]) -> ir.Node | None:
    """The GroupQueryAttention whose query, key and value inputs are ``linears``' outputs, in that
    order and read by nothing else; else None."""
    if len(linears) != 3:
        return None
    uses = [list(lin.node.outputs[0].uses()) for lin in linears]
    if any(len(u) != 1 or lin.node.outputs[0].is_graph_output() for u, lin in zip(uses, linears, strict=True)):
        return None
    node = uses[0][0][0]
    if node.op_type != "GroupQueryAttention" or [u[0] for u in uses] != [(node, 0), (node, 1), (node, 2)]:
        return None
    return node


def bias_add(node: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The ``Add(MatMul, bias[n])`` right after ``node`` (its only consumer), if there is one."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, None
    add = uses[0][0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = stored_array(other)
    if bias is None or bias.dtype not in (np.float32, np.float16) or bias.shape != (n,):
        return None, None
    if other.const_value is None:  # a Constant node: MatMulIntegerToFloat wants an initializer
        return None, None
    return add, other


# -- SmoothQuant ---------------------------------------------------------------------------------


def _only_consumers(value: ir.Value, nodes: set[int]) -> bool:
    return all(id(node) in nodes for node, _ in value.uses()) and not value.is_graph_output()


def _scale_const_input(editor: GraphEditor, node: ir.Node, index: int, factor: np.ndarray,
                       axis_len: int) -> bool:
    """Multiply ``node``'s constant input ``index`` (a per-channel vector or scalar) by ``factor``."""
    c = stored_array(node.inputs[index])
    if c is None or c.size not in (1, axis_len) or (c.ndim and c.shape[-1] != c.size):
        return False
    scaled = (np.broadcast_to(c.reshape(-1), (axis_len,)) * factor).astype(c.dtype)
    value = editor.add_initializer(f"{node.inputs[index].name}_smoothed", scaled)
    node.replace_input_with(index, value)
    return True


def fold_channel_scale(
    graph: ir.Graph | GraphEditor, value: ir.Value, factor: np.ndarray, consumers: set[int]
) -> str | None:
    """Make ``value`` (channels last) come out multiplied by ``factor`` by editing its producer
    exactly; returns where it was folded, or None when no exact fold applies. Only values
    consumed by ``consumers`` alone are edited (others would see the change)."""
    editor = editor_of(graph)
    if not _only_consumers(value, consumers):
        return None
    node = value.producer()
    if node is None:
        return None
    k = factor.size
    op = node.op_type
    if op in NORM_OPS and node.outputs[0] is value:
        # y = normed * gamma (+ beta): scale gamma and beta
        gamma_idx = 2 if op.startswith("Skip") else 1
        beta_idx = {"LayerNormalization": 2, "SkipLayerNormalization": 3}.get(op)
        has_beta = beta_idx is not None and len(node.inputs) > beta_idx and node.inputs[beta_idx] is not None
        if stored_array(node.inputs[gamma_idx]) is None or (
            has_beta and stored_array(node.inputs[beta_idx]) is None
        ):
            return None
        if not _scale_const_input(editor, node, gamma_idx, factor, k):
            return None
        if has_beta:
            _scale_const_input(editor, node, beta_idx, factor, k)
        return op
    if op in ("Mul", "Add"):
        # only per-channel vector constants (gamma, beta, biases): folding into a scalar
        # (GELU's 0.5) would be exact but break ORT's Gelu/LayerNorm fusions
        consts = [i for i in (0, 1) if getattr(stored_array(node.inputs[i]), "size", None) == k]
        if op == "Mul" and consts:
            return "Mul constant" if _scale_const_input(editor, node, consts[0], factor, k) else None
        if op == "Add" and consts:
            other = node.inputs[1 - consts[0]]
            # (x + b) * f = x * f + b * f: fold into b and recurse into x
            where = fold_channel_scale(editor, other, factor, {id(node)})
            if where is None:
                return None
            _scale_const_input(editor, node, consts[0], factor, k)
            return where
        if op == "Mul" and not consts:
            # gated FFN: act(gate) * up -> scale the up branch (a linear, exact)
            for i in (1, 0):
                where = fold_channel_scale(editor, node.inputs[i], factor, {id(node)})
                if where is not None:
                    return where
        return None
    if op == "MatMul":
        w = stored_array(node.inputs[1])
        if w is None or w.ndim != 2 or w.shape[1] != k:
            return None
        scaled = (w * factor[None, :]).astype(w.dtype)
        node.replace_input_with(1, editor.add_initializer(f"{node.inputs[1].name}_smoothed", scaled))
        return "MatMul weight"
    return None


def apply_smoothing(graph: ir.Graph | GraphEditor, x: ir.Value, linears: list[QLinear], s: np.ndarray) -> str:
    """Divide input ``x`` by ``s`` (folded upstream if exact, else a Mul on this branch) and
    multiply the rows of every consumer's weight by ``s``. Returns where the division went.
    ``graph`` may be an editor of it (one for a pass smoothing many inputs)."""
    editor = editor_of(graph)
    graph = editor.graph
    consumers = {id(lin.node) for lin in linears}
    where = fold_channel_scale(editor, x, (1.0 / s).astype(np.float32), consumers)
    if where is None:
        inv = editor.add_initializer(f"{x.name}_smooth_inv", (1.0 / s).astype(linears[0].dtype))
        mul = ir.node("Mul", [x, inv], name=f"{x.name}_Smooth")
        mul.outputs[0].name = editor.fresh_name(f"{x.name}_smoothed")
        mul.outputs[0].type = x.type
        mul.outputs[0].shape = x.shape
        graph.insert_before(linears[0].node, [mul])
        for lin in linears:
            lin.node.replace_input_with(0, mul.outputs[0])
        where = "inserted Mul"
    for lin in linears:
        w = stored_array(lin.weight)
        scaled = (w.astype(np.float32) * s[:, None]).astype(w.dtype)
        lin.node.replace_input_with(1, editor.add_initializer(f"{lin.weight.name}_smoothed", scaled))
    return where
