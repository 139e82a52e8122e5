"""The text onnxpress calibrates and evaluates on, with fixed, disjoint splits.

Data lives in ``$ONNXPRESS_DATA`` or in ``shared/data`` found by walking up from the
package (the repo sits at ``/work/main``, the data at ``/work/shared/data``).

Splits (fixed; every report names them). Calibration, training (distillation) and
evaluation text never share a file:

* SOTU **calibration**: State of the Union speeches dated before 1950 (159 files);
  **training**: 1950-1989 (42 files); **evaluation**: from 1990 on (32 files).
* BBC News, per topic folder, files sorted by name, by index modulo 5: 0 **evaluation**
  (445 articles; also the topic probe's test set), 1 **calibration**, 2 **training**,
  3 and 4 the topic **probe**'s training pool. Probe subsamples (default 400 train /
  200 test) are drawn without replacement with fixed seeds (0 and 1).

Named calibration data (``--calib NAME``): ``sotu``, ``bbc``, and ``default``, which
draws equally from both corpora. Fidelity is always also measured on a corpus the
calibration did not see (:func:`unseen_corpus`): BBC News for ``sotu``, SOTU for ``bbc``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from onnxpress.errors import OnnxpressError

CALIBRATION_BEFORE = 1950
EVALUATION_FROM = 1990
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("calibration", "training", "evaluation")
CORPORA = ("sotu", "bbc")
# BBC files by index modulo 5 within each topic folder
_BBC_SPLIT_OF_INDEX = {0: "evaluation", 1: "calibration", 2: "training", 3: "probe", 4: "probe"}
NAMED_CALIBRATIONS = {"sotu": ("sotu",), "bbc": ("bbc",), "default": ("sotu", "bbc")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|Hon|No|vs|U\.S|[A-Z])\.$")


def data_dir() -> Path:
    """The shared data folder: $ONNXPRESS_DATA, else ``shared/data`` above the package or cwd."""
    env = os.environ.get("ONNXPRESS_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise OnnxpressError(f"ONNXPRESS_DATA={env} is not a folder: point it at the shared data folder")
        return path
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if (candidate / "sotu").is_dir():
                return candidate
    raise OnnxpressError(
        "data folder not found (looked for shared/data above the package and cwd): set ONNXPRESS_DATA"
    )


def _year(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def sotu_files(split: str) -> list[Path]:
    """SOTU speeches of the 'calibration' (< 1950), 'training' (1950-1989) or 'evaluation'
    (>= 1990) split, sorted."""
    files = sorted((data_dir() / "sotu").glob("*.txt"))
    if split == "calibration":
        chosen = [f for f in files if _year(f) < CALIBRATION_BEFORE]
    elif split == "training":
        chosen = [f for f in files if CALIBRATION_BEFORE <= _year(f) < EVALUATION_FROM]
    elif split == "evaluation":
        chosen = [f for f in files if _year(f) >= EVALUATION_FROM]
    else:
        raise OnnxpressError(f"unknown SOTU split {split!r}: use one of {', '.join(SPLITS)}")
    if not chosen:
        raise OnnxpressError(
            f"no SOTU files for split {split!r} in {data_dir() / 'sotu'}: check the data folder"
        )
    return chosen


def bbc_files(split: str) -> list[Path]:
    """BBC News articles of a split ('calibration', 'training', 'evaluation' or the topic
    'probe' training pool), sorted by topic and name."""
    if split not in (*SPLITS, "probe"):
        raise OnnxpressError(f"unknown BBC split {split!r}: use one of {', '.join(SPLITS)} or probe")
    return [f for f, _ in _bbc_labelled(split)]


def _bbc_labelled(split: str) -> list[tuple[Path, int]]:
    root = data_dir() / "bbcnews"
    chosen = []
    for label, topic in enumerate(BBC_TOPICS):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise OnnxpressError(f"no BBC articles in {root / topic}: check the data folder")
        chosen += [(f, label) for i, f in enumerate(files) if _BBC_SPLIT_OF_INDEX[i % 5] == split]
    return chosen


def corpus_files(corpus: str, split: str) -> list[Path]:
    if corpus == "sotu":
        return sotu_files(split)
    if corpus == "bbc":
        return bbc_files(split)
    raise OnnxpressError(f"unknown corpus {corpus!r}: use one of {', '.join(CORPORA)}")


def describe_split(split: str, corpus: str = "sotu") -> str:
    if corpus == "bbc":
        return f"BBC News {split} split ({len(bbc_files(split))} articles, index % 5 = " \
               f"{next(i for i, s in _BBC_SPLIT_OF_INDEX.items() if s == split)} per topic)"
    rule = {"calibration": f"before {CALIBRATION_BEFORE}", "training": f"{CALIBRATION_BEFORE}-{EVALUATION_FROM - 1}",
            "evaluation": f"from {EVALUATION_FROM} on"}[split]
    return f"SOTU {split} split (speeches {rule}, {len(sotu_files(split))} files)"


def unseen_corpus(calibration: str) -> str | None:
    """The corpus whose text a named calibration never drew from (None: it drew from both)."""
    used = NAMED_CALIBRATIONS.get(calibration, ())
    unseen = [c for c in CORPORA if c not in used]
    return unseen[0] if len(unseen) == 1 else None


def named_texts(name: str, split: str, max_chars: int) -> tuple[list[str], str]:
    """(texts, description) of a named calibration source's ``split``: text chunks of at most
    ``max_chars`` characters; ``default`` takes as many chunks from each corpus as the smaller
    one has, interleaved, so neither dominates."""
    if name not in NAMED_CALIBRATIONS:
        raise OnnxpressError(f"unknown named data {name!r}: use one of {', '.join(NAMED_CALIBRATIONS)}")
    per_corpus = [
        [c for f in corpus_files(corpus, split) for c in text_chunks(read_text(f), max_chars)]
        for corpus in NAMED_CALIBRATIONS[name]
    ]
    n = min(len(t) for t in per_corpus)
    texts = per_corpus[0] if len(per_corpus) == 1 else [t[i] for i in range(n) for t in per_corpus]
    description = " + ".join(describe_split(split, c) for c in NAMED_CALIBRATIONS[name])
    return texts, description


def read_text(path: str | os.PathLike) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def split_sentences(text: str, min_chars: int = 20) -> list[str]:
    """Regex sentence split; drops fragments shorter than ``min_chars`` (headings, numbers)."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        merged: list[str] = []
        for piece in _SENTENCE_END.split(" ".join(paragraph.split())):
            if merged and _ABBREVIATION.search(merged[-1]):  # "Mr. President" is one sentence
                merged[-1] = f"{merged[-1]} {piece.strip()}"
            else:
                merged.append(piece.strip())
        sentences.extend(merged)
    return [s for s in sentences if len(s) >= min_chars]


def text_chunks(text: str, max_chars: int = 512, min_chars: int = 20) -> list[str]:
    """Consecutive sentences packed into chunks of at most ``max_chars`` (a long sentence stays whole)."""
    chunks: list[str] = []
    current = ""
    for sentence in split_sentences(text, min_chars):
        if current and len(current) + 1 + len(sentence) > max_chars:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        chunks.append(current)
    return chunks


# the shortest sentence an evaluation takes (shorter fragments: headings, datelines)
EVALUATION_MIN_CHARS = 40


def evaluation_sentences(n: int = 256, seed: int = 0, corpus: str = "sotu") -> list[str]:
    """``n`` sentences drawn with a fixed seed from a corpus's evaluation split."""
    pool = [s for f in corpus_files(corpus, "evaluation")
            for s in split_sentences(read_text(f), min_chars=EVALUATION_MIN_CHARS)]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
    return [pool[i] for i in idx]


def bbc_split(max_train: int | None = 400, max_test: int | None = 200, seed: int = 0):
    """(train_texts, train_labels, test_texts, test_labels) of the fixed BBC News probe split:
    train from the probe pool, test from the evaluation split."""
    train = _subsample(_bbc_labelled("probe"), max_train, seed)
    test = _subsample(_bbc_labelled("evaluation"), max_test, seed + 1)
    return (
        [read_text(f) for f, _ in train],
        np.array([y for _, y in train]),
        [read_text(f) for f, _ in test],
        np.array([y for _, y in test]),
    )


def _subsample(items: Sequence, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def expand_text_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its .txt/.jsonl files, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl"))
            if not found:
                raise OnnxpressError(
                    f"folder {p} has no .txt or .jsonl files: pass text files or another folder"
                )
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise OnnxpressError(f"text file {p} does not exist: check the path")
    if not out:
        raise OnnxpressError("no text files given: pass at least one .txt/.jsonl file or folder")
    return out


def find_tokenizer_dir(model_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """``tokenizer_dir`` if given, else the model's folder when it holds tokenizer files."""
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir() or not any((path / f).exists() for f in TOKENIZER_FILES):
            raise OnnxpressError(
                f"{path} holds no tokenizer files: pass the folder the model was exported to"
            )
        return path
    folder = Path(model_path)
    folder = folder if folder.is_dir() else folder.parent
    if any((folder / f).exists() for f in TOKENIZER_FILES):
        return folder
    raise OnnxpressError(f"no tokenizer next to {model_path}: pass --tokenizer DIR (the export folder)")


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder (never the hub): its ``tokenizer.json`` run by the
    tokenizers library where transformers would load it unchanged (``tokenizer_file``), else
    transformers' ``AutoTokenizer``."""
    from onnxpress.tokenizer_file import open_tokenizer_file

    path = find_tokenizer_dir(tokenizer_dir, tokenizer_dir)
    try:
        tokenizer = open_tokenizer_file(path)
    except Exception:  # tokenizers missing, or a file it cannot read: transformers loads it or says why
        tokenizer = None
    if tokenizer is not None:
        return tokenizer
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise OnnxpressError("tokenizing text needs transformers: pip install onnxpress[export]") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise OnnxpressError(
            f"cannot load the tokenizer in {path} ({type(exc).__name__}): re-export the model"
        ) from None


def as_tokenizer(tokenizer_or_dir):
    """A loaded tokenizer passes through; a folder is loaded (``load_tokenizer``)."""
    return load_tokenizer(tokenizer_or_dir) if isinstance(tokenizer_or_dir, str | os.PathLike) else tokenizer_or_dir
