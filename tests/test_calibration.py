"""onnxpress.calibration: feed batches from text / JSONL / npz / synthetic tokens or pixels, and their errors."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402
from test_export import TINY_VOCAB, tiny_export  # noqa: E402

from onnxpress.calibration import (  # noqa: E402
    CalibrationSet,
    counted_positions,
    image_dims,
    input_specs,
    make_feeds,
    vocab_size,
)
from onnxpress.compile import compile_model  # noqa: E402
from onnxpress.datasets import EVALUATION_MIN_CHARS, load_tokenizer  # noqa: E402
from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.runtime import make_session, run_batches  # noqa: E402

from tiny_models import IMAGE_SIZE, tiny_model  # noqa: E402

TEXTS = [
    "The Congress of the United States met in Washington.",
    "Our economy is strong and growing.",
    "We must defend the nation and its liberties against every enemy.",
    "Peace.",
    "The budget for the coming year is balanced, and the debt is falling for the first time.",
    "Education is the key to the future of our children.",
    "Taxes will be cut for working families.",
]


@pytest.fixture(scope="module")
def bert():
    path = tiny_export("bert")
    return ir.load(path), path.parent


@pytest.fixture(scope="module")
def llama():
    path = tiny_export("llama")
    return ir.load(path), path.parent


def _one_line_error(fn, *needles):
    with pytest.raises(OnnxpressError) as exc:
        fn()
    message = str(exc.value)
    assert message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_encoder_feeds_are_right_padded_and_run(bert):
    model, tok = bert
    calib = CalibrationSet.from_texts(TEXTS, tok, model, batch_size=3, max_length=16)
    assert len(calib) == 3 and calib.num_samples == len(TEXTS)
    first = calib.batches[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(b["input_ids"].dtype == np.int64 for b in calib)
    mask = first["attention_mask"]
    assert (np.diff(mask, axis=1) <= 0).all()  # right padding: ones then zeros
    assert calib.num_tokens == sum(int(b["attention_mask"].sum()) for b in calib)
    assert max(b["input_ids"].shape[1] for b in calib) <= 16
    assert "seed 0" in calib.source
    run_batches(make_session(model), calib)


def test_decoder_feeds_have_positions_and_empty_past(llama):
    model, tok = llama
    calib = CalibrationSet.from_texts(TEXTS, tok, model, batch_size=4)
    batch = calib.batches[0]
    mask = batch["attention_mask"]
    # the text's positions as the mask counts them; the padding's continue them
    np.testing.assert_array_equal(np.where(mask == 1, batch["position_ids"], 0), np.clip(mask.cumsum(1) - 1, 0, None) * mask)
    np.testing.assert_array_equal(batch["position_ids"], np.broadcast_to(np.arange(mask.shape[1]), mask.shape))
    assert batch["past_key_values.0.key"].shape == (4, 2, 0, 16)
    assert batch["past_key_values.1.value"].dtype == np.float32
    out = run_batches(make_session(model), calib.take(1), ["logits"])
    assert out[0]["logits"].shape == (*batch["input_ids"].shape, TINY_VOCAB)


def test_positions_count_from_the_first_token_on_through_right_padding():
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(counted_positions(mask), [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_rebatched_decoder_samples_keep_counting_positions(llama):
    """split() trims each sample's padding and pads again in its new batch: the positions of the
    new padding continue the text's, as counted_positions numbers them."""
    model, tok = llama
    keep, hold = CalibrationSet.from_texts(TEXTS, tok, model, batch_size=4).split(0.4)
    batches = [*keep.batches, *hold.batches]
    assert any((b["attention_mask"] == 0).any() for b in batches)  # some rows padded again
    for batch in batches:
        np.testing.assert_array_equal(batch["position_ids"], counted_positions(batch["attention_mask"]))


def test_seed_makes_order_deterministic(bert):
    model, tok = bert
    a = CalibrationSet.from_texts(TEXTS, tok, model, seed=1, max_samples=5, batch_size=2)
    b = CalibrationSet.from_texts(TEXTS, tok, model, seed=1, max_samples=5, batch_size=2)
    c = CalibrationSet.from_texts(TEXTS, tok, model, seed=2, max_samples=5, batch_size=2)
    assert a.num_samples == 5
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    assert any(
        not np.array_equal(x["input_ids"], y["input_ids"]) or x["input_ids"].shape != y["input_ids"].shape
        for x, y in zip(a, c, strict=False)
    )


def test_augmented_calibration_replaces_a_share_of_the_real_tokens_the_same_way_every_call(bert):
    """What pruning fits on: ``augment`` of the real tokens replaced by random non-special
    vocabulary tokens, padding and [CLS]/[SEP] untouched, the same for every call of a compile;
    without a tokenizer (npz or synthetic data) the batches as they are."""
    from onnxpress.datasets import load_tokenizer
    from onnxpress.pipeline import CompileContext

    model, tok = bert
    calib = CalibrationSet.from_texts(TEXTS * 20, tok, model, max_samples=140, batch_size=8)
    ctx = CompileContext(verification=[], calibration=calib, tokenizer_dir=tok, seed=3)
    plain, augmented = ctx.calibration_batches("p"), ctx.calibration_batches("p", augment=0.3)
    special = list(load_tokenizer(tok).all_special_ids)
    changed = real = 0
    for before, after in zip(plain, augmented, strict=True):
        keep = ~before["attention_mask"].astype(bool) | np.isin(before["input_ids"], special)
        np.testing.assert_array_equal(after["input_ids"][keep], before["input_ids"][keep])
        assert not np.isin(after["input_ids"][~keep], special).any()
        np.testing.assert_array_equal(after["attention_mask"], before["attention_mask"])
        changed += int((after["input_ids"] != before["input_ids"]).sum())
        real += int((~keep).sum())
    assert 0.25 < changed / real < 0.35
    for a, b in zip(augmented, ctx.calibration_batches("p", augment=0.3), strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    untokenized = CompileContext(verification=[], calibration=calib, seed=3)
    for a, b in zip(plain, untokenized.calibration_batches("p", augment=0.3), strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_split_and_take_keep_every_sample(bert):
    model, tok = bert
    calib = CalibrationSet.from_texts(TEXTS, tok, model, batch_size=2)
    keep, hold = calib.split(0.3)
    assert keep.num_samples + hold.num_samples == calib.num_samples
    assert hold.num_samples == 2
    assert keep.num_tokens + hold.num_tokens == calib.num_tokens  # padding trimmed and re-added only
    keep2, hold2 = calib.split(0.3)
    np.testing.assert_array_equal(hold.batches[0]["input_ids"], hold2.batches[0]["input_ids"])
    assert len(calib.take(2)) == 2
    _one_line_error(lambda: calib.split(1.5), "between 0 and 1")


def test_each_sample_keeps_its_text_through_split_and_take(bert):
    """The texts are what an encoder's held-out part is re-measured on, sentence by sentence: they
    must stay the samples' own texts, in the samples' order."""
    model, tok = bert
    tokenizer = load_tokenizer(tok)
    calib = CalibrationSet.from_texts(TEXTS, tok, model, batch_size=2, seed=3)
    ids = [row[mask > 0].tolist() for b in calib.batches
           for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert [tokenizer(t)["input_ids"] for t in calib.texts] == ids
    keep, hold = calib.split(0.3)
    assert keep.texts + hold.texts == calib.texts and len(hold.texts) == hold.num_samples == 2
    assert calib.take(2).texts == calib.texts[:4]


def test_sentences_are_those_of_the_samples_texts_long_enough_to_evaluate(bert):
    model, tok = bert
    chunks = [" ".join(TEXTS[:3]), " ".join(TEXTS[3:])]
    sentences = CalibrationSet.from_texts(chunks, tok, model, batch_size=2).sentences(tok, model, batch_size=4)
    expected = sorted(t for t in TEXTS if len(t) >= EVALUATION_MIN_CHARS)
    assert sorted(sentences.texts) == expected and sentences.num_samples == len(expected) < len(TEXTS)
    assert f"{len(expected)} sentences of 2 samples" in sentences.source
    assert CalibrationSet(sentences.batches, "no texts").sentences(tok, model) is None


def test_from_files_txt_jsonl_and_folder(bert, tmp_path):
    model, tok = bert
    (tmp_path / "a.txt").write_text(
        "First sentence here is long enough. Second one is also long enough!\n\nOk.\n"
    )
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:3]) + "\n")
    txt = CalibrationSet.from_files(tmp_path / "a.txt", tok, model)
    assert txt.num_samples == 1  # both sentences packed into one chunk; "Ok." dropped
    jsonl = CalibrationSet.from_files([tmp_path / "b.jsonl"], tok, model)
    assert jsonl.num_samples == 3
    folder = CalibrationSet.from_files(tmp_path, tok, model)
    assert folder.num_samples == 4 and "2 file(s)" in folder.source


def test_bad_text_inputs_are_one_line_errors(bert, tmp_path):
    model, tok = bert
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    _one_line_error(lambda: CalibrationSet.from_files(tmp_path / "bad.jsonl", tok, model), "line 2", '"text"')
    (tmp_path / "worse.jsonl").write_text("not json\n")
    _one_line_error(lambda: CalibrationSet.from_files(tmp_path / "worse.jsonl", tok, model), "not JSON")
    _one_line_error(lambda: CalibrationSet.from_files(tmp_path / "missing.txt", tok, model), "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: CalibrationSet.from_files(tmp_path / "empty", tok, model), "no .txt")
    _one_line_error(lambda: CalibrationSet.from_texts(["", "  "], tok, model), "no calibration text")
    _one_line_error(lambda: CalibrationSet.from_texts(TEXTS, tmp_path, model), "no tokenizer files")


def test_from_npz_batches_and_derives_missing_inputs(llama, tmp_path):
    model, _ = llama
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, size=(5, 7)).astype(np.int32)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    calib = CalibrationSet.from_npz(tmp_path / "calib.npz", model, batch_size=2)
    assert len(calib) == 3 and calib.num_samples == 5
    batch = calib.batches[0]
    assert batch["input_ids"].dtype == np.int64  # same-kind cast
    assert batch["attention_mask"].shape == (2, 7) and batch["past_key_values.0.key"].shape == (2, 2, 0, 16)
    run_batches(make_session(model), calib.take(1), ["logits"])


def test_bad_npz_inputs_are_one_line_errors(bert, tmp_path):
    model, _ = bert
    ids = np.ones((3, 5), np.int64)

    def npz(**arrays):
        path = tmp_path / "x.npz"
        np.savez(path, **arrays)
        return lambda: CalibrationSet.from_npz(path, model)

    _one_line_error(
        npz(input_ids=np.ones(5, np.int64)), "'input_ids' has rank 1", "expects rank 2 [batch, sequence]"
    )
    _one_line_error(npz(input_ids=ids.astype(np.float32)), "'input_ids' has dtype float32", "int64")
    _one_line_error(npz(input_ids=ids, bogus=ids), "'bogus'", "not a model input")
    _one_line_error(npz(input_ids=ids, attention_mask=np.ones((2, 5), np.int64)), "sample counts")
    _one_line_error(npz(attention_mask=ids), "lacks model input 'input_ids'")
    _one_line_error(lambda: CalibrationSet.from_npz(tmp_path / "none.npz", model), "does not exist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _one_line_error(lambda: CalibrationSet.from_npz(tmp_path / "junk.npz", model), "not a readable .npz")


def test_synthetic_tokens_stay_in_vocab(bert, llama):
    gpt2 = ir.load(tiny_export("gpt2"))  # reshapes input_ids before the embedding Gather
    for model in (bert[0], llama[0], gpt2):
        assert vocab_size(model) == TINY_VOCAB
        calib = CalibrationSet.synthetic(model, batch_size=3, seq_len=9, seed=4, num_batches=2)
        assert len(calib) == 2 and calib.num_tokens == 54
        ids = calib.batches[0]["input_ids"]
        assert ids.shape == (3, 9) and ids.max() < TINY_VOCAB
        again = CalibrationSet.synthetic(model, batch_size=3, seq_len=9, seed=4, num_batches=2)
        np.testing.assert_array_equal(ids, again.batches[0]["input_ids"])
        run_batches(make_session(model), calib)


def test_unknown_input_cannot_be_built_from_text(bert):
    model, _ = bert
    clone = ir.from_proto(ir.to_proto(model))
    extra = ir.Value(name="speaker_embedding", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    clone.graph.inputs.append(extra)
    _one_line_error(
        lambda: make_feeds(clone, np.ones((1, 3), np.int64), np.ones((1, 3), np.int64)),
        "'speaker_embedding'",
        ".npz",
    )


def _pixel_spec(model):
    return next(s for s in input_specs(model) if s.name == "pixel_values")


def test_vit_with_dynamic_image_dims_takes_its_size_from_config_or_weights(tmp_path):
    """A transformers ViTModel export with dynamic height and width: config.json beside it gives
    the image size; without it, the patch Conv (8x8, stride 8) and the 17 position rows (a CLS
    token and 4x4 patches) give 32x32."""
    src = tiny_model("vit")
    model = ir.load(src)
    spec = _pixel_spec(model)
    assert spec.shape == (None, None, None, None)
    assert image_dims(model, spec, src.parent) == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert image_dims(model, spec, tmp_path) == (3, IMAGE_SIZE, IMAGE_SIZE)  # no config.json there
    (tmp_path / "config.json").write_text(json.dumps({"image_size": [48, 64], "num_channels": 3}))
    assert image_dims(model, spec, tmp_path) == (3, 48, 64)  # the config wins over the weights
    calib = CalibrationSet.synthetic(model, batch_size=2, seed=1)
    assert calib.batches[0]["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    run_batches(make_session(model), calib)


def test_lossless_compile_of_a_vit_needs_no_data(tmp_path):
    alone = tmp_path / "vit" / "model.onnx"  # the export without its config.json: sized from the weights
    alone.parent.mkdir()
    shutil.copy(tiny_model("vit"), alone)
    for src in (tiny_model("vit"), alone):
        report = compile_model(src, tmp_path / "out" / "vit.onnx", recipe="lossless", progress=False)
        assert report.verified_on == "2 synthetic samples" and report.fidelity["metric"] == "output cosine"
        assert report.fidelity["cosine_min"] > 1 - 1e-5


def test_image_size_that_cannot_be_told_is_a_one_line_error(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["y"], keepdims=0)], "pool",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", "c", "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert image_dims(model, _pixel_spec(model), tmp_path) is None
    _one_line_error(lambda: CalibrationSet.synthetic(model), "dynamic image dims", ".npz", "config.json")
