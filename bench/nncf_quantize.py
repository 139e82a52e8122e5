"""NNCF post-training compression of an ONNX model, run inside the NNCF peer's own virtual
environment (``peers.nncf_*``).

usage: python nncf_quantize.py MODE MODEL.onnx CALIB.npz OUT.onnx
MODE: int8 (``nncf.quantize`` with the transformer preset), int4 (``compress_weights``, int4
asymmetric in groups of 32, data-free) or int4-awq (the same with the calibration samples, AWQ
and scale estimation). CALIB.npz holds the samples as ``<index>:<input name>`` arrays.
"""

import sys

import nncf
import numpy as np
import onnx

mode, src, calib, out = sys.argv[1:5]
arrays = np.load(calib)
samples: dict[int, dict[str, np.ndarray]] = {}
for key in arrays.files:
    index, name = key.split(":", 1)
    samples.setdefault(int(index), {})[name] = arrays[key]
data = nncf.Dataset([samples[i] for i in sorted(samples)])
model = onnx.load(src)
if mode == "int8":
    compressed = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples))
else:
    awq = mode == "int4-awq"
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32, ratio=1.0,
                                       dataset=data if awq else None, awq=awq, scale_estimation=awq,
                                       subset_size=len(samples))
onnx.save(compressed, out)
