"""onnxpress.evaluation and onnxpress.datasets: metrics vs torch / numpy, fixed disjoint splits."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_export import tiny_export, tiny_hf_dir  # noqa: E402

from onnxpress import datasets  # noqa: E402
from onnxpress import evaluation as ev  # noqa: E402
from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.export import cached_export  # noqa: E402

SENTENCES = ["The economy is growing.", "We must defend the nation against every enemy.", "Taxes will fall."]


def test_splits_are_fixed_and_disjoint():
    for corpus in datasets.CORPORA:
        splits = {split: set(datasets.corpus_files(corpus, split)) for split in datasets.SPLITS}
        assert all(splits.values())
        for a in datasets.SPLITS:
            for b in datasets.SPLITS:
                assert a == b or not splits[a] & splits[b], (corpus, a, b)
    calib, train, evals = (datasets.sotu_files(s) for s in datasets.SPLITS)
    assert max(int(f.name[:4]) for f in calib) < 1950 <= min(int(f.name[:4]) for f in train)
    assert max(int(f.name[:4]) for f in train) < 1990 <= min(int(f.name[:4]) for f in evals)
    probe = set(datasets.bbc_files("probe"))
    assert probe and not probe & set().union(*(set(datasets.bbc_files(s)) for s in datasets.SPLITS))
    train_x, train_y, test_x, test_y = datasets.bbc_split(max_train=50, max_test=20)
    assert (len(train_x), len(test_x)) == (50, 20) and not set(train_x) & set(test_x)
    assert datasets.bbc_split(max_train=50, max_test=20)[0] == train_x  # deterministic
    assert len(set(train_y.tolist())) == 5


def test_default_named_data_draws_equally_from_both_corpora():
    texts, description = datasets.named_texts("default", "calibration", 400)
    sotu, _ = datasets.named_texts("sotu", "calibration", 400)
    bbc, _ = datasets.named_texts("bbc", "calibration", 400)
    assert texts[0::2] == sotu[: len(texts) // 2] and texts[1::2] == bbc[: len(texts) // 2]
    assert "SOTU" in description and "BBC" in description
    assert datasets.unseen_corpus("sotu") == "bbc" and datasets.unseen_corpus("default") is None
    with pytest.raises(OnnxpressError, match="unknown named data"):
        datasets.named_texts("wiki", "calibration", 400)


def test_missing_data_dir_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXPRESS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(OnnxpressError, match="ONNXPRESS_DATA") as exc:
        datasets.sotu_files("evaluation")
    assert "\n" not in str(exc.value)


def test_sentence_split_keeps_abbreviations():
    text = "Mr. Speaker, the U.S. economy grew this year. Short. Did it grow? Yes, it grew by a lot!"
    assert datasets.split_sentences(text) == [
        "Mr. Speaker, the U.S. economy grew this year.",
        "Yes, it grew by a lot!",
    ]


def test_perplexity_equals_torch_on_the_same_windows():
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_export("llama")
    files = datasets.sotu_files("evaluation")[:2]
    windows = ev.perplexity_windows(path.parent, files, window=64, max_windows=6)
    assert windows.shape == (6, 64)
    got = ev.perplexity(path, path.parent, files, window=64, max_windows=6)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_hf_dir("llama"))(torch.from_numpy(windows)).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
            torch.from_numpy(windows[:, 1:]).reshape(-1),
        )
    assert got == pytest.approx(float(torch.exp(nll)), rel=1e-3)


def test_self_fidelity_is_exact():
    dec, enc = tiny_export("llama"), tiny_export("bert")
    logits = ev.logits_fidelity(dec, dec, SENTENCES, dec.parent)
    assert logits["logits_max_abs_error"] == 0.0 and logits["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert logits["top1_agreement"] == 1.0 and logits["logit_tokens"] > 10
    emb = ev.embedding_fidelity(enc, enc, SENTENCES, enc.parent)
    assert emb["embedding_cosine_min"] == pytest.approx(1.0)


def test_embeddings_are_mask_aware():
    enc = tiny_export("bert")
    alone = ev.sentence_embeddings(enc, enc.parent, SENTENCES[2:])
    padded = ev.sentence_embeddings(enc, enc.parent, SENTENCES)[2:]  # padded to a longer batch
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_evaluate_decoder_and_encoder_dicts():
    dec, enc = tiny_export("llama"), tiny_export("bert")
    text = datasets.sotu_files("evaluation")[:1]
    result = ev.evaluate(dec, dec, text_files=text, window=64, max_windows=4)
    assert result["kind"] == "decoder" and result["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert result["perplexity"] == pytest.approx(result["reference_perplexity"])
    assert result["perplexity_windows"] == 4
    result = ev.evaluate(enc, enc, text_files=text)
    assert result["kind"] == "encoder" and result["embedding_cosine_mean"] == pytest.approx(1.0)
    with pytest.raises(OnnxpressError, match="encoder"):
        ev.evaluate(dec, probe=True, text_files=text)


def test_another_models_tokenizer_is_a_one_line_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a word-level tokenizer of 4,096 tokens that reads every word as its last one: an id past
    # the tiny model's embedding table of 384 rows
    vocab = {f"w{i}": i for i in range(4095)} | {"[UNK]": 4095}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="w0").save_pretrained(tmp_path)
    enc = tiny_export("bert")
    text = datasets.sotu_files("evaluation")[:1]
    with pytest.raises(OnnxpressError, match="embedding table does not have: pass --tokenizer"):
        ev.evaluate(enc, enc, tokenizer_dir=tmp_path, text_files=text)


def test_default_evaluation_covers_both_corpora():
    enc, dec = tiny_export("bert"), tiny_export("llama")
    result = ev.evaluate(enc, enc)
    for prefix in ("", "bbc_"):
        assert result[prefix + "embedding_cosine_mean"] == pytest.approx(1.0)
    assert "SOTU" in result["embedding_text"] and "BBC" in result["bbc_embedding_text"]
    result = ev.evaluate(dec, dec, window=64, max_windows=4)
    assert result["bbc_perplexity"] == pytest.approx(result["bbc_reference_perplexity"])
    assert result["bbc_perplexity"] != pytest.approx(result["perplexity"])  # another text


def test_probe_runs_on_tiny_encoder():
    enc = tiny_export("bert")
    result = ev.bbc_probe_accuracy(enc, enc.parent, max_train=40, max_test=20, max_length=32)
    assert result["probe_train"] == 40 and result["probe_test"] == 20
    assert 0.0 <= result["probe_accuracy"] <= 1.0


@pytest.mark.real_model
def test_minilm_probe_is_accurate():
    path = cached_export("minilm")
    result = ev.bbc_probe_accuracy(path, path.parent, max_train=100, max_test=50, max_length=64)
    assert result["probe_accuracy"] >= 0.8


def test_window_nll_through_the_kv_cache_in_chunks_matches_one_call():
    from tiny_models import tiny_model

    model = tiny_model("llama", with_past=True)
    windows = np.random.default_rng(0).integers(5, 1000, (3, 40))
    whole, count = ev.window_nll(model, windows, batch_size=2)
    chunked, chunked_count = ev.window_nll(model, windows, batch_size=2, chunk=16)
    assert chunked_count == count == 3 * 39
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_window_nll_in_chunks_needs_a_kv_cache():
    from tiny_models import tiny_model

    with pytest.raises(OnnxpressError, match="KV cache"):
        ev.window_nll(tiny_model("llama"), np.ones((1, 8), np.int64), chunk=4)
