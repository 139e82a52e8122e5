"""NNCF post-training int8 of an ONNX model, run inside the NNCF peer's own virtual
environment (``peers.nncf_int8``).

usage: python nncf_quantize.py MODEL.onnx CALIB.npz OUT.onnx
CALIB.npz holds the samples as ``<index>:<input name>`` arrays.
"""

import sys

import nncf
import numpy as np
import onnx

src, calib, out = sys.argv[1:4]
arrays = np.load(calib)
samples: dict[int, dict[str, np.ndarray]] = {}
for key in arrays.files:
    index, name = key.split(":", 1)
    samples.setdefault(int(index), {})[name] = arrays[key]
data = [samples[i] for i in sorted(samples)]
quantized = nncf.quantize(onnx.load(src), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(data))
onnx.save(quantized, out)
