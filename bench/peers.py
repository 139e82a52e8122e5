"""The peers onnxpress is compared with, each as ``build(src, out_dir, calib) -> path``.

Each is the tool's documented one-call entry point with the settings its docs recommend
for transformers on an AVX2 CPU.
``calib`` is a list of feed batches from the calibration split (never the evaluation text).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

Build = Callable[[Path, Path, list], Path]
NNCF = "nncf==3.4.0"


def _shape(src: Path) -> tuple[int, int]:
    """(heads, hidden size) of the first attention layer, for ORT's optimizer."""
    from onnxpress.analysis import analyze
    from onnxpress.model_io import load_model

    att = analyze(load_model(src)).attentions()[0]
    return att.num_heads, att.num_heads * att.head_size


def ort_transformers_optimizer(src: Path, out: Path, calib) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _shape(src)
    kind = "gpt2" if _is_decoder(src) else "bert"
    path = out / "ort_optimizer.onnx"
    optimize_model(str(src), model_type=kind, num_heads=heads, hidden_size=hidden).save_model_to_file(str(path))
    return path


def ort_quantize_dynamic(src: Path, out: Path, calib) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = out / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return path


def ort_quantize_static(src: Path, out: Path, calib, batches: int = 8) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = out / "ort_static.onnx"
    calib = calib[:batches]
    length = max(b["input_ids"].shape[1] for b in calib)
    quantize_static(str(src), str(path), CalibReader(calib, length), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return path


def ort_matmul_nbits(src: Path, out: Path, calib) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = out / "ort_rtn_int4_b32.onnx"
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=False)
    q.process()
    q.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def onnxsim_head_pruning(src: Path, out: Path, calib, sparsity: float = 4 / 12) -> Path:
    """onnxsim 0.8.1's head pruning; it matches ORT-fused Attention ops, so fuse first."""
    import onnx
    import onnxsim
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _shape(src)
    fused = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden).model
    path = out / "onnxsim_heads.onnx"
    onnx.save(onnxsim.apply_attention_head_pruning(fused, sparsity=sparsity), str(path))
    return path


def _nncf(mode: str, src: Path, out: Path, calib) -> Path:
    """``nncf_quantize.py MODE`` on ``calib``'s samples, in NNCF's own environment; its last error line
    becomes the row's error where NNCF fails on the model."""
    from common import peer_python

    feeds = out / f"nncf_{mode}_calib.npz"
    length = max(b["input_ids"].shape[1] for b in calib)
    items = CalibReader(calib, length).items
    np.savez(feeds, **{f"{i}:{name}": v for i, item in enumerate(items) for name, v in item.items()})
    path = out / f"nncf_{mode}.onnx"
    done = subprocess.run([str(peer_python("nncf", [NNCF])), str(Path(__file__).with_name("nncf_quantize.py")),
                           mode, str(src), str(feeds), str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "NNCF failed")
    return path


def nncf_int8(src: Path, out: Path, calib) -> Path:
    """NNCF's post-training int8 with its transformer preset (SmoothQuant, min-max ranges, fast
    bias correction), the same samples as ORT's static quantizer (decoders: 32 of them)."""
    return _nncf("int8", src, out, calib[:4] if _is_decoder(src) else calib)


def nncf_int4(src: Path, out: Path, calib) -> Path:
    """NNCF's int4 weight compression (asymmetric, groups of 32, every MatMul), data-free."""
    return _nncf("int4", src, out, calib[:1])


def nncf_int4_awq(src: Path, out: Path, calib) -> Path:
    """NNCF's int4 weight compression with AWQ and scale estimation on 32 calibration samples."""
    return _nncf("int4-awq", src, out, calib[:4])


class CalibReader:
    """ORT CalibrationDataReader over our batches, padded to a fixed length (ORT's
    calibrators concatenate batches and fail on variable lengths)."""

    def __init__(self, batches, length: int):
        self.items = []
        for b in batches:
            for i in range(len(b["input_ids"])):
                self.items.append({k: _pad(v[i : i + 1], length) for k, v in b.items()})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def _pad(v: np.ndarray, length: int) -> np.ndarray:
    if v.ndim == 2 and v.shape[1] < length:
        return np.pad(v, ((0, 0), (0, length - v.shape[1])))
    return v


def optimum_avx2(src: Path, out: Path, calib=None) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    tmp = out / "optimum_in"
    tmp.mkdir(exist_ok=True)
    for f in src.parent.iterdir():
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    quantizer = ORTQuantizer.from_pretrained(tmp, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx2(is_static=False, per_channel=True)
    quantizer.quantize(save_dir=out / "optimum", quantization_config=qconfig)
    return out / "optimum" / "model_quantized.onnx"


def _is_decoder(src: Path) -> bool:
    import onnx

    return any(o.name == "logits" for o in onnx.load(str(src), load_external_data=False).graph.output)


# label -> build, per model kind (the order of the table)
ENCODER_PEERS: dict[str, Build] = {
    "ORT transformers optimizer": ort_transformers_optimizer,
    "ORT quantize_dynamic per-channel s8": ort_quantize_dynamic,
    "ORT quantize_static QDQ u8/s8": ort_quantize_static,
    "Optimum ORTQuantizer avx2": optimum_avx2,
    f"NNCF {NNCF.split('==')[1]} int8 (transformer preset)": nncf_int8,
    "onnxsim 0.8.1 head pruning 33%": onnxsim_head_pruning,
}
DECODER_PEERS: dict[str, Build] = {
    "ORT transformers optimizer": ort_transformers_optimizer,
    "ORT quantize_dynamic per-channel s8": ort_quantize_dynamic,
    # ORT's calibrator keeps the quantised tensors of every sample in memory until the end
    # (several hundred MB per 128-token sample on SmolLM2-135M, logits included): 8 samples.
    "ORT quantize_static QDQ u8/s8 (8 samples)": partial(ort_quantize_static, batches=1),
    "Optimum ORTQuantizer avx2": optimum_avx2,
    "ORT MatMulNBitsQuantizer int4 b32": ort_matmul_nbits,
    f"NNCF {NNCF.split('==')[1]} int8 (transformer preset)": nncf_int8,
    f"NNCF {NNCF.split('==')[1]} int4 weights g32 (data-free)": nncf_int4,
    f"NNCF {NNCF.split('==')[1]} int4 weights g32 (AWQ + scale estimation)": nncf_int4_awq,
}
