"""Block-quantised weights in ``com.microsoft.MatMulNBits`` layout.

MatMulNBits computes ``Y = A @ dequant(B)`` with ``A[..., K]``; its B is stored
transposed and blocked along K:

- ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]``, codes packed low bits first along K;
- ``scales``: float ``[N, n_blocks]`` in the activations' type (stored as float16 they reach
  the kernel through a Cast, which ONNX Runtime folds into a constant when the session loads);
- ``zero_points``: uint8 ``[N, ceil(n_blocks * bits / 8)]``, packed the same way (4-bit:
  two blocks per byte, low nibble first); absent means the mid code (8 for 4-bit);

exactly what ORT's ``MatMulNBitsQuantizer`` (QOperator format) writes, so ORT's CPU
kernels and ours agree; ``tests/passes/quantize/test_quantize_numerics.py`` checks the layout by
running the op in ORT against the numpy dequantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxpress.passes.quantize.gptq import BlockQuantizer, gptq


@dataclass
class NBitsWeight:
    packed: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 (or float16) [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, packed blocks], None when symmetric
    dequantized: np.ndarray | None  # float32 [K, N], what the kernel will compute with (when kept)
    K: int
    N: int
    bits: int
    block_size: int


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis, low bits first (``8 // bits`` per byte)."""
    per = 8 // bits
    c = codes.astype(np.uint8)
    pad = (-c.shape[-1]) % per
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    c = c.reshape(*c.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= (c[..., j] & ((1 << bits) - 1)) << (bits * j)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    parts = [(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


# Columns quantised at a time: every column is rounded on its own (GPTQ spreads a row's error
# down its column only), and the float64 working copies of a large LM head take gigabytes.
COLUMN_CHUNK = 8192


def quantize_nbits(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    *,
    symmetric: bool = False,
    hessian: np.ndarray | None = None,
    damp: float = 0.01,
    clip_search: bool = True,
    act_order: bool = False,
    scale_dtype: type = np.float32,
    keep_dequantized: bool = True,
) -> NBitsWeight:
    """Quantise ``weight[K, N]``: round-to-nearest, or GPTQ when ``hessian`` (K x K) is given,
    ``COLUMN_CHUNK`` columns at a time. ``scale_dtype`` float16 stores the scales at half the
    bytes unless one would overflow it: then they stay float32. ``keep_dequantized=False``
    leaves out the float copy of the rounded weight (a rewrite needs only the codes)."""
    if np.dtype(scale_dtype) == np.float16 and np.abs(weight).max() / ((1 << bits) - 1) * 2 > np.finfo(np.float16).max:
        scale_dtype = np.float32  # decided for the whole matrix: one scale type per kernel
    parts = [_quantize_columns(weight[:, c : c + COLUMN_CHUNK], bits, block_size, symmetric, hessian, damp,
                               clip_search, act_order, scale_dtype, keep_dequantized)
             for c in range(0, weight.shape[1], COLUMN_CHUNK)]
    return parts[0] if len(parts) == 1 else join_columns(parts)


def _quantize_columns(weight, bits, block_size, symmetric, hessian, damp, clip_search, act_order, scale_dtype,
                      keep_dequantized) -> NBitsWeight:
    K, N = weight.shape
    nblocks = -(-K // block_size)
    padded = nblocks * block_size
    w = np.zeros((padded, N), dtype=np.float64)
    w[:K] = weight
    quantizer = BlockQuantizer((padded, N), bits, block_size, symmetric=symmetric, clip_search=clip_search,
                               scale_dtype=scale_dtype)
    if hessian is None:
        deq = quantizer.quantize_all(w)
    else:
        h = np.eye(padded, dtype=np.float64)
        h[:K, :K] = hessian
        deq = gptq(
            w,
            h,
            quantizer,
            block=max(128, block_size),
            damp=damp,
            group_size=block_size,
            act_order=act_order,
        )
    codes = quantizer.q.reshape(nblocks, block_size, N).transpose(2, 0, 1)  # [N, nblocks, block]
    packed = pack_codes(codes, bits)
    zps = None if symmetric else pack_codes(quantizer.zero_points.T, bits)
    return NBitsWeight(
        packed=np.ascontiguousarray(packed),
        scales=np.ascontiguousarray(quantizer.scales.T),
        zero_points=None if zps is None else np.ascontiguousarray(zps),
        dequantized=deq[:K].astype(np.float32) if keep_dequantized else None,
        K=K,
        N=N,
        bits=bits,
        block_size=block_size,
    )


def split_columns(nw: NBitsWeight, cols: slice) -> NBitsWeight:
    """The weight of output columns ``cols`` (a MatMul quantised together with others that
    share its input); every stored tensor is per column, so this is exact."""
    return NBitsWeight(
        packed=np.ascontiguousarray(nw.packed[cols]),
        scales=np.ascontiguousarray(nw.scales[cols]),
        zero_points=None if nw.zero_points is None else np.ascontiguousarray(nw.zero_points[cols]),
        dequantized=None if nw.dequantized is None else np.ascontiguousarray(nw.dequantized[:, cols]),
        K=nw.K,
        N=len(range(nw.N)[cols]),
        bits=nw.bits,
        block_size=nw.block_size,
    )


def join_columns(parts: list[NBitsWeight]) -> NBitsWeight:
    """One weight from parts quantised column range by column range (``split_columns`` undone)."""
    first = parts[0]
    return NBitsWeight(
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=None if first.zero_points is None else np.concatenate([p.zero_points for p in parts]),
        dequantized=None if first.dequantized is None else np.concatenate([p.dequantized for p in parts], axis=1),
        K=first.K,
        N=sum(p.N for p in parts),
        bits=first.bits,
        block_size=first.block_size,
    )


def dequantize_nbits(nw: NBitsWeight) -> np.ndarray:
    """Reference dequantisation from the packed tensors (the kernel's semantics)."""
    nblocks = nw.scales.shape[1]
    codes = unpack_codes(nw.packed, nw.bits, nw.block_size).astype(np.float64)  # [N, nb, block]
    if nw.zero_points is None:
        z = np.full((nw.N, nblocks), 1 << (nw.bits - 1), dtype=np.float64)
    else:
        z = unpack_codes(nw.zero_points, nw.bits, nblocks).astype(np.float64)
    deq = (codes - z[..., None]) * nw.scales.astype(np.float64)[..., None]
    return deq.reshape(nw.N, -1)[:, : nw.K].T.astype(np.float32)
