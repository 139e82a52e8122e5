"""Task metrics and fidelity against a reference model, through ONNX Runtime.

Encoders: mean-pooled (mask-aware) sentence embeddings of the first output, cosine vs
the reference, and a BBC News topic probe. Decoders: next-token logits vs the reference
(max |error|, KL(ref || new)), perplexity on held-out text, greedy generation with the
KV cache. Default text: the *evaluation* splits of both corpora (SOTU speeches from 1990
on, and BBC News), disjoint from every calibration and training split, so a compile is
always also measured on a domain its calibration did not see; see ``onnxpress.datasets``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from onnxpress import datasets
from onnxpress.calibration import make_feeds, pad_right
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import mean_pool, row_cosines
from onnxpress.generation import DecoderRunner, generate
from onnxpress.runtime import ModelLike, as_session

# Defaults, kept small enough for a 2-core CPU; every result names what it used.
EMBED_SENTENCES = 256
LOGIT_SENTENCES = 32
PPL_WINDOW = 256
PPL_MAX_WINDOWS = 64
PROBE_TRAIN, PROBE_TEST, PROBE_TOKENS = 400, 200, 128


def model_kind(session: ort.InferenceSession) -> str:
    """'decoder' when the model emits logits, else 'encoder'."""
    return "decoder" if any(o.name == "logits" for o in session.get_outputs()) else "encoder"


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int):
    """Right-padded (ids, mask) batches of the texts, truncated to ``max_length`` tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(
            list(texts[start : start + batch_size]),
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        yield pad_right([seq or [pad_id] for seq in ids], pad_id)


def _run(session: ort.InferenceSession, output: str, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return session.run([output], make_feeds(session, input_ids, mask))[0]


# ---- encoders ---------------------------------------------------------------------------


def sentence_embeddings(
    model: ModelLike, tokenizer_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> np.ndarray:
    """[n, hidden] mean-pooled embeddings of the model's first output (last_hidden_state)."""
    session, tokenizer = as_session(model), datasets.as_tokenizer(tokenizer_dir)
    output = session.get_outputs()[0].name
    parts = [
        mean_pool(_run(session, output, ids, mask), mask)
        for ids, mask in _batches(tokenizer, texts, batch_size, max_length)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def embedding_fidelity(
    model: ModelLike,
    reference: ModelLike,
    sentences: Sequence[str],
    tokenizer_dir,
    *,
    batch_size: int = 32,
    max_length: int = 128,
) -> dict[str, float]:
    """Cosine (mean, min) between the model's and the reference's sentence embeddings."""
    tokenizer = datasets.as_tokenizer(tokenizer_dir)
    new = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size, max_length=max_length)
    ref = sentence_embeddings(reference, tokenizer, sentences, batch_size=batch_size, max_length=max_length)
    cos = row_cosines(ref, new)
    return {
        "embedding_cosine_mean": float(cos.mean()),
        "embedding_cosine_min": float(cos.min()),
        "embedding_sentences": len(sentences),
    }


def bbc_probe_accuracy(
    model: ModelLike,
    tokenizer_dir,
    *,
    max_train: int | None = PROBE_TRAIN,
    max_test: int | None = PROBE_TEST,
    max_length: int = PROBE_TOKENS,
    seed: int = 0,
) -> dict:
    """BBC News topic probe: logistic regression on standardised mean-pooled embeddings of
    each article's first ``max_length`` tokens; fixed split from ``datasets.bbc_split``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    session, tokenizer = as_session(model), datasets.as_tokenizer(tokenizer_dir)
    if model_kind(session) != "encoder":
        raise OnnxpressError(
            "the BBC probe needs an encoder (sentence-embedding) model: drop --probe for decoders"
        )
    train_x, train_y, test_x, test_y = datasets.bbc_split(max_train, max_test, seed)
    embed = lambda texts: sentence_embeddings(session, tokenizer, texts, max_length=max_length)  # noqa: E731
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    clf.fit(embed(train_x), train_y)
    accuracy = float((clf.predict(embed(test_x)) == test_y).mean())
    return {"probe_accuracy": accuracy, "probe_train": len(train_y), "probe_test": len(test_y)}


# ---- decoders ---------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logits_fidelity(
    model: ModelLike,
    reference: ModelLike,
    texts: Sequence[str],
    tokenizer_dir,
    *,
    batch_size: int = 4,
    max_length: int = 128,
) -> dict[str, float]:
    """Max |logit error| and mean KL(ref || new) of next-token distributions over real tokens."""
    session, ref_session, tokenizer = as_session(model), as_session(reference), datasets.as_tokenizer(tokenizer_dir)
    max_err, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for ids, mask in _batches(tokenizer, texts, batch_size, max_length):
        new = _run(session, "logits", ids, mask)
        ref = _run(ref_session, "logits", ids, mask)
        keep = mask.astype(bool)
        for row_new, row_ref in zip(new[keep], ref[keep], strict=True):  # per token: bounded float64 memory
            max_err = max(max_err, float(np.abs(row_new - row_ref).max()))
            log_p, log_q = _log_softmax(row_ref), _log_softmax(row_new)
            kl_sum += float((np.exp(log_p) * (log_p - log_q)).sum())
            agree += int(row_new.argmax() == row_ref.argmax())
        count += int(keep.sum())
    return {
        "logits_max_abs_error": max_err,
        "kl_mean": kl_sum / max(count, 1),
        "top1_agreement": agree / max(count, 1),
        "logit_tokens": count,
    }


def perplexity_windows(
    tokenizer_dir,
    text_files: Sequence[str | os.PathLike] | None = None,
    *,
    window: int = PPL_WINDOW,
    max_windows: int | None = PPL_MAX_WINDOWS,
    corpus: str = "sotu",
) -> np.ndarray:
    """[n, window] token windows: the files' text (default: ``corpus``'s evaluation split) joined
    by blank lines, tokenized without special tokens, cut into non-overlapping windows;
    ``max_windows`` evenly spaced ones are kept."""
    files = datasets.expand_text_paths(text_files) if text_files else datasets.corpus_files(corpus, "evaluation")
    tokenizer = datasets.as_tokenizer(tokenizer_dir)
    text = "\n\n".join(datasets.read_text(f).strip() for f in files)
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
    n = len(ids) // window
    if n == 0:
        raise OnnxpressError(
            f"evaluation text has {len(ids)} tokens, fewer than one window of {window}: add text"
        )
    windows = ids[: n * window].reshape(n, window)
    if max_windows is not None and n > max_windows:
        windows = windows[np.unique(np.linspace(0, n - 1, max_windows).round().astype(int))]
    return windows


def window_nll(model: ModelLike | DecoderRunner, windows: np.ndarray, *, batch_size: int = 4,
               chunk: int | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens): token t+1 given tokens <= t, per window.
    ``chunk``: each window fed ``chunk`` tokens per call through the KV cache, as generation
    feeds it, instead of in one call (a graph may run other kernels for short calls than for
    long ones: quantize's ``prefill_path``)."""
    runner = model if isinstance(model, DecoderRunner) else DecoderRunner(as_session(model))
    if chunk and not runner.has_cache:
        raise OnnxpressError("perplexity in chunks needs a model with a KV cache")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        logits = runner.run(ids)[0] if not chunk else _chunked_logits(runner, ids, chunk)
        for row_logits, row_ids in zip(logits, ids, strict=True):
            log_p = _log_softmax(row_logits[:-1])
            total -= float(log_p[np.arange(len(row_ids) - 1), row_ids[1:]].sum())
            count += len(row_ids) - 1
    return total, count


def _chunked_logits(runner: DecoderRunner, ids: np.ndarray, chunk: int) -> np.ndarray:
    parts, cache = [], None
    for at in range(0, ids.shape[1], chunk):
        logits, cache = runner.run(ids[:, at : at + chunk], at, cache)
        parts.append(logits)
    return np.concatenate(parts, axis=1)


def perplexity(
    model: ModelLike,
    tokenizer_dir,
    text_files: Sequence[str | os.PathLike] | None = None,
    *,
    window: int = PPL_WINDOW,
    max_windows: int | None = PPL_MAX_WINDOWS,
    batch_size: int = 4,
    corpus: str = "sotu",
) -> float:
    """Causal-LM perplexity over non-overlapping windows (default: ``corpus``'s evaluation split)."""
    windows = perplexity_windows(tokenizer_dir, text_files, window=window, max_windows=max_windows, corpus=corpus)
    total, count = window_nll(model, windows, batch_size=batch_size)
    return float(np.exp(total / count))


def generate_greedy(model: ModelLike, tokenizer_dir, prompt: str, max_new_tokens: int = 20) -> list[int]:
    """Greedy new tokens for ``prompt`` (``onnxpress.generation``: through the KV cache when the
    model has one), up to and including the first end-of-sequence token."""
    return generate(model, prompt, tokenizer=tokenizer_dir, max_new_tokens=max_new_tokens)[1].tokens


# ---- the CLI's entry point --------------------------------------------------------------


def evaluate(
    model_path: str | os.PathLike,
    reference_path: str | os.PathLike | None = None,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    kind: str = "auto",
    text_files: Sequence[str | os.PathLike] | None = None,
    probe: bool = False,
    window: int = PPL_WINDOW,
    max_windows: int | None = PPL_MAX_WINDOWS,
    threads: int | None = None,
) -> dict:
    """Metrics of ``model_path`` (vs ``reference_path`` when given) as a flat dict for the CLI."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok_dir = _default_tokenizer_dir(model_path, reference_path, tokenizer_dir)
    tokenizer = datasets.load_tokenizer(tok_dir)
    session = as_session(model_path, threads)
    ref = as_session(reference_path, threads) if reference_path is not None else None
    kind = model_kind(session) if kind == "auto" else kind
    if kind not in ("encoder", "decoder"):
        raise OnnxpressError(f"unknown model kind {kind!r}: use auto, encoder or decoder")
    result: dict = {"model": str(model_path), "kind": kind, "tokenizer": str(tok_dir)}
    if reference_path is not None:
        result["reference"] = str(reference_path)

    def timed(key: str, fn):
        start = time.perf_counter()
        result.update(fn())
        result[f"{key}_seconds"] = round(time.perf_counter() - start, 2)

    with _tokenizer_of_the_model(tok_dir):
        for prefix, files, corpus in _evaluation_sources(text_files):
            text = _describe_files(files) if files else datasets.describe_split("evaluation", corpus)
            if kind == "encoder":
                if ref is not None:
                    sentences = _eval_sentences(files, EMBED_SENTENCES, corpus)
                    fid = embedding_fidelity(session, ref, sentences, tokenizer)
                    result.update({prefix + k: v for k, v in fid.items()}, **{prefix + "embedding_text": text})
                continue
            if ref is not None:
                sentences = _eval_sentences(files, LOGIT_SENTENCES, corpus)
                result.update({prefix + k: v for k, v in logits_fidelity(session, ref, sentences, tokenizer).items()})
            windows = perplexity_windows(tokenizer, files, window=window, max_windows=max_windows, corpus=corpus)
            timed(prefix + "perplexity", lambda w=windows, p=prefix: _ppl(session, w, p + "perplexity"))
            if ref is not None:
                result.update(_ppl(ref, windows, prefix + "reference_perplexity"))
            result.update({prefix + "perplexity_text": text, prefix + "perplexity_windows": len(windows),
                           prefix + "perplexity_window": window})
        if probe:
            if kind != "encoder":
                raise OnnxpressError(
                    "the BBC probe needs an encoder (sentence-embedding) model: drop --probe for decoders"
                )
            timed("probe", lambda: bbc_probe_accuracy(session, tokenizer))
            if ref is not None:
                result["reference_probe_accuracy"] = bbc_probe_accuracy(ref, tokenizer)["probe_accuracy"]
    return result


@contextlib.contextmanager
def _tokenizer_of_the_model(tok_dir: Path):
    """A tokenizer of another model (say, one another compile left beside the output) gives
    ids past the embedding table: one line naming it, not ONNX Runtime's Gather error."""
    try:
        yield
    except InvalidArgument as e:
        if "out of data bounds" not in str(e):
            raise
        raise OnnxpressError(f"the tokenizer in {tok_dir} gives token ids the model's embedding table does not "
                             "have: pass --tokenizer DIR, the folder of the model's own tokenizer") from None


def _evaluation_sources(text_files) -> list[tuple[str, list | None, str]]:
    """(key prefix, files, corpus) to evaluate on: the user's text alone, or both corpora's
    evaluation splits (the BBC News keys prefixed ``bbc_``)."""
    if text_files:
        return [("", list(text_files), "sotu")]
    return [("", None, "sotu"), ("bbc_", None, "bbc")]


def _ppl(session, windows: np.ndarray, key: str) -> dict:
    total, count = window_nll(session, windows)
    return {key: float(np.exp(total / count))}


def _describe_files(paths) -> str:
    files = datasets.expand_text_paths(paths)
    names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{len(files)} file(s): {names}"


def _eval_sentences(text_files, n: int, corpus: str = "sotu") -> list[str]:
    if not text_files:
        return datasets.evaluation_sentences(n, corpus=corpus)
    pool = [
        s
        for f in datasets.expand_text_paths(text_files)
        for s in datasets.split_sentences(datasets.read_text(f))
    ]
    return pool[:: max(1, len(pool) // n)][:n]


def _default_tokenizer_dir(model_path, reference_path, tokenizer_dir) -> Path:
    if tokenizer_dir is not None:
        return datasets.find_tokenizer_dir(model_path, tokenizer_dir)
    for candidate in (model_path, reference_path):
        if candidate is None:
            continue
        try:
            return datasets.find_tokenizer_dir(candidate)
        except OnnxpressError:
            continue
    raise OnnxpressError(f"no tokenizer next to {model_path}: pass --tokenizer DIR (the export folder)")
