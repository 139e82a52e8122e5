"""onnxpress.generation (the one decoding loop) and onnxpress.runtime_files (the folder other
runtimes load a compiled decoder from): a tiny Llama compiled with each decoder recipe is
loaded by onnxruntime-genai and by optimum, whose greedy tokens must equal ours."""

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpress.compile import compile_model
from onnxpress.errors import OnnxpressError
from onnxpress.generation import DecoderRunner, Sampling, eos_token_ids, next_token
from onnxpress.model_io import load_model
from onnxpress.runtime import make_session
from onnxpress.runtime_files import (
    cache_shares_buffer,
    genai_runner,
    optimum_runner,
    plan_runtime_files,
    write_runtime_files,
)

from tiny_models import (
    HEAD_SIZE,
    LAYERS,
    MAX_POS,
    greedy_tokens,
    tiny_model,
    tiny_model_fp16,
    tiny_model_tied,
)

RECIPES = ["lossless", "balanced", "small", "edge-int4"]
CALIB = dict(calib=["sotu"], max_samples=48, max_length=32)
PROMPT = [5, 17, 300, 42, 99, 7, 123, 456, 88, 12]
# longer than the 32 tokens a call may have and still run as a decode step where small and
# edge-int4 end with prefill_path (the pass splits the graph where that is faster on this host)
LONG_PROMPT = list(range(40, 80))
NEW = 24
SIDE_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """recipe -> (output path, report) of the tiny Llama with its KV cache, compiled once per recipe
    into a folder of its own (not the source's: the side files are copied)."""
    done = {}

    def get(recipe: str, tied: bool = False):
        if (recipe, tied) not in done:
            out = tmp_path_factory.mktemp(recipe) / "llama.compressed.onnx"
            calib = {} if recipe == "lossless" else CALIB
            src = (tiny_model_tied if tied else tiny_model)("llama", with_past=True)
            report = compile_model(src, out, recipe=recipe, threads=1, progress=False, **calib)
            done[recipe, tied] = out, report
        return done[recipe, tied]

    return get


def our_tokens(path, prompt=PROMPT, new=NEW):
    return DecoderRunner(path, threads=1).generate(prompt, new, eos_ids=eos_token_ids(path.parent)).tokens


def test_a_compiled_decoder_gets_its_runtime_files(compiled):
    out, report = compiled("lossless")
    folder = out.parent
    assert set(report.extra["runtime_files"]) == SIDE_FILES | {"genai_config.json"}
    # the weights in a data file beside the model: ONNX Runtime maps them rather than copying them
    assert {p.name for p in folder.iterdir()} == SIDE_FILES | {"genai_config.json", out.name, out.name + ".data",
                                                               "llama.compressed.report.json"}
    assert report.size_after == out.stat().st_size + (folder / (out.name + ".data")).stat().st_size
    source = tiny_model("llama", with_past=True).parent
    for name in SIDE_FILES:
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert "runtime files written beside the model: config.json, genai_config.json" in report.format_table()

    genai = json.loads((folder / "genai_config.json").read_text())
    model, decoder = genai["model"], genai["model"]["decoder"]
    graph = onnx.load(out)
    inputs, outputs = {i.name for i in graph.graph.input}, {o.name for o in graph.graph.output}
    assert decoder["filename"] == out.name and model["type"] == "llama"
    assert set(decoder["inputs"].values()) - inputs == {"past_key_values.%d.key", "past_key_values.%d.value"}
    assert {decoder["inputs"]["past_key_names"] % i for i in range(LAYERS)} <= inputs
    assert {decoder["outputs"]["present_value_names"] % i for i in range(LAYERS)} <= outputs
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert (decoder["num_hidden_layers"], decoder["head_size"], decoder["num_key_value_heads"]) == (LAYERS, HEAD_SIZE, 4)
    assert model["context_length"] == genai["search"]["max_length"] == MAX_POS
    assert model["eos_token_id"] == sorted(eos_token_ids(source)) == [2, 3]  # config's and the tokenizer's
    assert genai["search"]["do_sample"] is False
    # fused into GroupQueryAttention, whose sequence lengths come from the attention mask
    assert genai["search"]["past_present_share_buffer"] is True


@pytest.mark.parametrize("recipe", RECIPES)
def test_onnxruntime_genai_decodes_our_greedy_tokens(compiled, recipe):
    """With past and present in one buffer: GenAI's cache is context-long from the first step."""
    out, _ = compiled(recipe)
    assert json.loads((out.parent / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    ours = our_tokens(out)
    assert ours == greedy_tokens(make_session(out, threads=1), load_model(out), np.array([PROMPT]), len(ours), True)
    assert genai_runner(out.parent)(PROMPT, NEW) == ours
    assert genai_runner(out.parent)(LONG_PROMPT, NEW) == our_tokens(out, LONG_PROMPT)


@pytest.mark.parametrize("recipe", RECIPES)
def test_optimum_decodes_our_greedy_tokens(compiled, recipe):
    out, _ = compiled(recipe)
    run = optimum_runner(out, sorted(eos_token_ids(out.parent)))
    assert run(PROMPT, NEW) == our_tokens(out)
    assert run(LONG_PROMPT, NEW) == our_tokens(out, LONG_PROMPT)


@pytest.mark.parametrize("recipe", ["balanced", "edge-int4"])
def test_a_tied_lm_head_quantized_with_the_embedding_decodes_our_tokens_in_genai_and_optimum(compiled, recipe):
    out, report = compiled(recipe, tied=True)
    quantize = next(p for p in report.passes if p.name == "quantize" and p.changes.get("matmuls_quantized"))
    # the head is int8 (weight-only) and the embedding reads its codes (GatherBlockQuantized)
    assert quantize.changes["lm_head_from_tied_table"] == quantize.changes["embeddings_from_lm_head_codes"] == 1
    for prompt in (PROMPT, LONG_PROMPT):
        ours = our_tokens(out, prompt)
        assert genai_runner(out.parent)(prompt, NEW) == ours
        assert optimum_runner(out, sorted(eos_token_ids(out.parent)))(prompt, NEW) == ours


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_runtime_files_for_an_exported_model(tmp_path, arch):
    """gpt2 has no GenAI type with separate key / value caches: the generic decoder type runs it."""
    src = tiny_model(arch, with_past=True)
    shutil.copy(src, tmp_path / "model.onnx")
    written = write_runtime_files(tmp_path / "model.onnx", source_dir=src.parent)
    assert SIDE_FILES | {"genai_config.json"} <= set(written.files)
    genai = json.loads((tmp_path / "genai_config.json").read_text())
    # the exporter's attention concatenates the cache: its present is a new tensor every step
    assert genai["search"]["past_present_share_buffer"] is False
    genai = genai["model"]
    assert genai["type"] == ("decoder" if arch == "gpt2" else arch)
    assert any("generic decoder" in n for n in written.notes) == (arch == "gpt2")
    assert genai_runner(tmp_path)(PROMPT, NEW) == our_tokens(tmp_path / "model.onnx")
    # again: everything is already there
    assert write_runtime_files(tmp_path / "model.onnx", source_dir=src.parent).files == {}


def test_no_shared_cache_buffer_where_the_cache_or_a_present_length_feeds_another_node(compiled):
    """A cache input read by anything but GroupQueryAttention, or a sequence length taken from a
    present's shape (a shared buffer's is the context's), rules the shared buffer out."""
    out, _ = compiled("lossless")
    model = load_model(out)
    past = [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    assert cache_shares_buffer(model, past)

    extra_reader = load_model(out)
    shape = ir.node("Shape", [next(v for v in extra_reader.graph.inputs if v.name == past[0])])
    extra_reader.graph.append(shape)
    extra_reader.graph.outputs.append(shape.outputs[0])
    assert not cache_shares_buffer(extra_reader, past)

    length_from_present = load_model(out)
    first, second = [n for n in length_from_present.graph if n.op_type == "GroupQueryAttention"][:2]
    shape = ir.node("Shape", [first.outputs[1]], {"start": 2, "end": 3})
    squeeze = ir.node("Squeeze", [shape.outputs[0]])
    total = ir.node("Cast", [squeeze.outputs[0]], {"to": ir.DataType.INT32})
    length_from_present.graph.insert_before(second, [shape, squeeze, total])
    second.replace_input_with(6, total.outputs[0])
    assert not cache_shares_buffer(length_from_present, past)


def test_files_the_user_has_are_kept_and_a_failed_compile_writes_nothing(tmp_path, monkeypatch):
    import onnxpress.compile

    src = tiny_model("llama", with_past=True)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    (out.parent / "config.json").write_text('{"mine": true}')
    shutil.copy(src.parent / "tokenizer.json", out.parent / "tokenizer.json")
    report = compile_model(src, out, recipe="lossless", threads=1, progress=False)
    assert (out.parent / "config.json").read_text() == '{"mine": true}'
    assert any("kept the config.json" in n for n in report.extra["notes"])
    assert "config.json" not in report.extra["runtime_files"] and "tokenizer.json" not in report.extra["runtime_files"]
    # the GenAI config still comes from the source's config.json
    assert json.loads((out.parent / "genai_config.json").read_text())["model"]["type"] == "llama"

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnxpress.compile, "save_model", fail)
    with pytest.raises(RuntimeError):
        compile_model(src, tmp_path / "other" / "m.onnx", recipe="lossless", threads=1, progress=False)
    assert list((tmp_path / "other").iterdir()) == []


def test_no_genai_config_for_a_graph_that_needs_onnxpress_operators(tmp_path):
    src = tiny_model("llama", with_past=True)
    model = load_model(src)
    next(iter(model.graph)).domain = "onnxpress"  # as attention:target=onnxpress leaves it
    plan = plan_runtime_files(model, tmp_path / "m.onnx", source_dir=src.parent)
    assert "genai_config.json" not in plan.files and "config.json" in plan.files
    assert any("onnxpress's operator library" in n for n in plan.notes)


def test_a_decoder_without_kv_cache_generates_the_same_tokens_and_gets_no_genai_config(tmp_path):
    with_cache, without = tiny_model("llama", with_past=True), tiny_model("llama")
    runner = DecoderRunner(without, threads=1)
    assert not runner.has_cache
    assert runner.generate(PROMPT, NEW).tokens == DecoderRunner(with_cache, threads=1).generate(PROMPT, NEW).tokens
    shutil.copy(without, tmp_path / "model.onnx")
    written = write_runtime_files(tmp_path / "model.onnx", source_dir=without.parent)
    assert "genai_config.json" not in written.files and "config.json" in written.files
    assert any("no KV cache" in n for n in written.notes)


def test_symbolic_cache_dims_come_from_the_config(tmp_path):
    """GenAI's model builder leaves the cache's head size symbolic."""
    src = tiny_model("llama", with_past=True)
    model = onnx.load(src)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values", "present")):
            value.type.tensor_type.shape.dim[3].dim_param = "head_size"
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(OnnxpressError, match="head size is symbolic"):
        DecoderRunner(tmp_path / "model.onnx")
    assert DecoderRunner(tmp_path / "model.onnx", head_size=HEAD_SIZE).past["past_key_values.0.key"][1:] == (4, HEAD_SIZE)
    shutil.copy(src.parent / "config.json", tmp_path)
    assert our_tokens(tmp_path / "model.onnx") == our_tokens(src)


def test_a_float16_cache_stays_float16():
    path = tiny_model_fp16("llama", with_past=True)
    runner = DecoderRunner(path, threads=1)
    _, cache = runner.run(np.array([PROMPT]))
    assert {a.dtype for a in cache.values()} == {np.dtype(np.float16)}
    assert len(runner.generate(PROMPT, 8).tokens) == 8


def test_eos_stops_generation_after_it():
    path = tiny_model("llama", with_past=True)
    runner = DecoderRunner(path, threads=1)
    free = runner.generate(PROMPT, NEW).tokens
    eos = free[5]
    stopped = runner.generate(PROMPT, NEW, eos_ids={eos}).tokens
    assert stopped == free[: free.index(eos) + 1]


def test_eos_ids_from_the_generation_config_and_the_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_token_ids(tmp_path) == {9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))  # wins over config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "added_tokens_decoder": {"11": {"content": "</s>"}}}))
    assert eos_token_ids(tmp_path) == {5, 7, 11}


def test_sampling_is_reproducible_and_differs_from_greedy():
    runner = DecoderRunner(tiny_model("llama", with_past=True), threads=1)
    greedy = runner.generate(PROMPT, NEW).tokens
    hot = runner.generate(PROMPT, NEW, sampling=Sampling(temperature=5.0, seed=3)).tokens
    assert hot == runner.generate(PROMPT, NEW, sampling=Sampling(temperature=5.0, seed=3)).tokens
    assert hot != greedy
    assert hot != runner.generate(PROMPT, NEW, sampling=Sampling(temperature=5.0, seed=4)).tokens
    # one candidate left: sampling is greedy
    assert runner.generate(PROMPT, NEW, sampling=Sampling(temperature=5.0, top_k=1, seed=3)).tokens == greedy
    assert runner.generate(PROMPT, NEW, sampling=Sampling(top_p=1e-6, seed=3)).tokens == greedy


def test_top_k_and_top_p_draw_from_the_likeliest_tokens():
    logits = np.log(np.array([0.05, 0.1, 0.25, 0.6]))
    rng = np.random.default_rng(0)

    def draws(sampling):
        return np.bincount([next_token(logits, sampling, rng) for _ in range(4000)], minlength=4) / 4000

    np.testing.assert_allclose(draws(Sampling()), [0.05, 0.1, 0.25, 0.6], atol=0.025)
    np.testing.assert_allclose(draws(Sampling(top_k=2)), [0, 0, 0.25 / 0.85, 0.6 / 0.85], atol=0.025)
    np.testing.assert_allclose(draws(Sampling(top_p=0.8)), [0, 0, 0.25 / 0.85, 0.6 / 0.85], atol=0.025)
    np.testing.assert_allclose(draws(Sampling(top_p=0.5)), [0, 0, 0, 1])
    assert draws(Sampling(temperature=100.0))[0] > 0.2  # flattened towards uniform
    for bad, message in [(dict(temperature=0), "temperature"), (dict(top_k=-1), "top-k"), (dict(top_p=0), "top-p")]:
        with pytest.raises(OnnxpressError, match=message):
            Sampling(**bad)


@pytest.mark.real_model
def test_smollm2_export_generates_in_onnxruntime_genai_with_its_own_tokenizer(tmp_path):
    import onnxruntime_genai as og

    from onnxpress.datasets import load_tokenizer
    from onnxpress.export import cached_export

    src = cached_export("smollm2")
    (tmp_path / "model.onnx").symlink_to(src)
    write_runtime_files(tmp_path / "model.onnx", source_dir=src.parent)
    prompt = "The state of the Union is strong, and the budget"
    ids = load_tokenizer(src.parent)(prompt)["input_ids"]
    assert og.Tokenizer(og.Model(str(tmp_path))).encode(prompt).tolist() == ids
    assert genai_runner(tmp_path)(ids, 16) == our_tokens(tmp_path / "model.onnx", ids, 16)
