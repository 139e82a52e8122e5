"""CUDA build of the ops library: compiles wherever nvcc is; kernels run where a CUDA EP is."""

import numpy as np
import onnxruntime as ort
import pytest

import onnxpress.runtime_ops as rt
from onnxpress.runtime_ops.builder import CUDA_ARCHS_ENV, find_nvcc

from attention_reference import attention_op_model, padding_mask, random_inputs, reference_attention

NO_CUDA_EP = "CUDAExecutionProvider" not in ort.get_available_providers()
skip_without_gpu = pytest.mark.skipif(NO_CUDA_EP, reason="no CUDA GPU / onnxruntime-gpu here")


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (PATH, CUDACXX, CUDA_HOME)")
def test_nvcc_compiles_the_cuda_library(monkeypatch, make_session):
    """The CUDA library builds, exports the probes, and its CPU kernels run in a CPU-only ORT
    (cudart is linked statically, so loading needs no CUDA runtime)."""
    if NO_CUDA_EP:  # only the compile matters here: one architecture keeps it quick
        monkeypatch.setenv(CUDA_ARCHS_ENV, "80")
    library = rt.build(cuda=True)
    assert library.name == "libonnxpress_ops_cuda.so"
    assert rt.library_has_cuda(library)
    assert rt.library_api_version(library) == 17

    feeds = random_inputs(np.random.default_rng(0), 2, 9, 9, 4, 2, 16)
    session = make_session(attention_op_model(feeds, num_heads=4, kv_num_heads=2), library=library)
    expected, _, _ = reference_attention(feeds["query"], feeds["key"], feeds["value"], 4, 2)
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def cuda_library():
    return rt.build(cuda=True)


def _cuda_session(model, library):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # the node must run on CUDA
    rt.register(options, library=library)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


CASES = {
    "mha": dict(shape=(2, 37, 37, 12, 12, 32), attrs={}),
    "gqa-d17": dict(shape=(2, 70, 70, 5, 1, 17), attrs={}),
    "gqa-causal": dict(shape=(2, 70, 70, 9, 3, 64), attrs={"causal": True}),
    "causal-window": dict(shape=(2, 70, 70, 6, 2, 32), attrs={"causal": True, "window": 16}),
    "window": dict(shape=(2, 70, 70, 6, 2, 32), attrs={"window": 16}),
    "d128": dict(shape=(1, 40, 40, 4, 4, 128), attrs={"causal": True}),
}


@pytest.mark.gpu
@skip_without_gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_mask", [False, True])
def test_cuda_matches_reference(cuda_library, case, with_mask):
    batch, q_len, kv_len, heads, kv_heads, d = CASES[case]["shape"]
    attrs = dict(CASES[case]["attrs"], num_heads=heads, kv_num_heads=kv_heads)
    feeds = random_inputs(np.random.default_rng(1), batch, q_len, kv_len, heads, kv_heads, d)
    if with_mask:
        feeds["attention_mask"] = padding_mask([kv_len, kv_len // 2][:batch], kv_len)
    out = _cuda_session(attention_op_model(feeds, **attrs), cuda_library).run(None, feeds)[0]
    expected, _, _ = reference_attention(feeds["query"], feeds["key"], feeds["value"],
                                         mask=feeds.get("attention_mask"), **attrs)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


@pytest.mark.gpu
@skip_without_gpu
def test_cuda_decode_with_past_and_masked_rows(cuda_library):
    feeds = random_inputs(np.random.default_rng(2), 2, 1, 1, 6, 2, 32, past_len=7)
    feeds["attention_mask"] = padding_mask([8, 0], 8)  # batch 1: nothing to attend -> zeros
    attrs = dict(num_heads=6, kv_num_heads=2, causal=True)
    model = attention_op_model(feeds, with_present=True, **attrs)
    out, present_key, present_value = _cuda_session(model, cuda_library).run(None, feeds)
    expected, key_all, value_all = reference_attention(
        feeds["query"], feeds["key"], feeds["value"], mask=feeds["attention_mask"],
        past_key=feeds["past_key"], past_value=feeds["past_value"], **attrs)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(present_key, key_all)
    np.testing.assert_array_equal(present_value, value_all)

