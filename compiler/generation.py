"""Text generation with a decoder through ONNX Runtime: the one token loop of the CLI, the
evaluation and the benches.

``DecoderRunner`` feeds a decoder's graph by input name: ``input_ids``, ``attention_mask`` (all
ones: one unpadded sequence), ``position_ids`` where the graph has them and
``past_key_values.*``: empty first, then the ``present.*`` of the step before, in the cache's own
dtype (float16 caches stay float16). The prompt runs in one call (prefill), then one token per
step; a graph without a KV cache re-runs the whole sequence at every step. Tokens are greedy or
sampled (``Sampling``: temperature, top-k, top-p, a seed for numpy's Generator), and generation
stops after an end-of-sequence id (``eos_token_ids``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxpress.calibration import input_specs, is_past_input
from onnxpress.datasets import as_tokenizer, find_tokenizer_dir
from onnxpress.errors import OnnxpressError
from onnxpress.runtime import ModelLike, as_session

# Inputs built from the token sequence alone; any other input needs data we do not have.
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class Sampling:
    """Sampled generation: logits divided by ``temperature``, then only the ``top_k`` most likely
    tokens (0: all) and the fewest whose probability sums to ``top_p`` are drawn from."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise OnnxpressError(f"temperature {self.temperature:g} must be above 0: try 0.7 (or greedy decoding)")
        if self.top_k < 0:
            raise OnnxpressError(f"top-k {self.top_k} must be 0 (no limit) or more")
        if not 0 < self.top_p <= 1:
            raise OnnxpressError(f"top-p {self.top_p:g} must be in (0, 1]: try 0.9")


@dataclass
class Generation:
    """New tokens (the prefill's first, then one per step), the prompt's length and the time of each phase."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # the steps after the prefill's token

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


class DecoderRunner:
    """Runs a decoder with a ``logits`` output (see the module doc). ``head_size`` / ``kv_heads``:
    the cache's dims where the graph leaves them symbolic (as GenAI's model builder does); by
    default read from ``genai_config.json`` or ``config.json`` in ``config_dir`` (default: the
    model's folder)."""

    def __init__(self, model: ModelLike, *, threads: int | None = None, head_size: int | None = None,
                 kv_heads: int | None = None, config_dir: str | os.PathLike | None = None):
        if isinstance(model, str | os.PathLike):
            if not Path(model).is_file():
                raise OnnxpressError(f"{model} does not exist: check the model path")
            config_dir = config_dir or Path(model).parent
        self.session = as_session(model, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in self.outputs:
            raise OnnxpressError("the model has no 'logits' output, so it is not a decoder: generation needs a "
                                 "text-generation export (onnxpress export of a causal LM)")
        inputs = {spec.name: spec for spec in input_specs(self.session)}
        unknown = [n for n in inputs if n not in TOKEN_INPUTS and not is_past_input(n)]
        if unknown or "input_ids" not in inputs:
            raise OnnxpressError(f"decoder inputs {unknown or ['input_ids (missing)']} cannot be built from tokens: "
                                 "generation feeds input_ids, attention_mask, position_ids and the KV cache")
        self.dtypes = {name: spec.dtype for name, spec in inputs.items()}
        geometry = None  # from the config files, read once
        self.past: dict[str, tuple[str, int, int]] = {}  # past input -> (present output, KV heads, head size)
        for name, spec in inputs.items():
            if not is_past_input(name):
                continue
            present = present_name(name)
            if present not in self.outputs or len(spec.shape) != 4:
                raise OnnxpressError(f"cache input {name!r} has no {present!r} output of shape [batch, kv_heads, "
                                     "past, head_size]: re-export the model with optimum (text-generation-with-past)")
            heads, size = spec.shape[1] or kv_heads, spec.shape[3] or head_size
            if heads is None or size is None:
                geometry = geometry or _cache_geometry(config_dir, heads, size)
                heads, size = geometry
            self.past[name] = (present, heads, size)

    @property
    def has_cache(self) -> bool:
        return bool(self.past)

    def feeds(self, ids: np.ndarray, start: int = 0, cache: dict[str, np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
        """The session's inputs for ``ids`` [batch, n] at positions ``start``.. after ``cache`` (None: empty)."""
        batch, n = ids.shape
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((batch, start + n)),
                 "position_ids": np.broadcast_to(np.arange(start, start + n), (batch, n)),
                 "token_type_ids": np.zeros((batch, n))}
        feeds = {k: np.ascontiguousarray(v, dtype=self.dtypes[k]) for k, v in feeds.items() if k in self.dtypes}
        for name, (_, heads, size) in self.past.items():
            feeds[name] = cache[name] if cache else np.zeros((batch, heads, 0, size), self.dtypes[name])
        return feeds

    def run(self, ids: np.ndarray, start: int = 0, cache: dict[str, np.ndarray] | None = None
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of ``ids`` [batch, n] at positions ``start``.. after ``cache`` (None: empty), and the
        cache after them."""
        out = dict(zip(self.outputs, self.session.run(None, self.feeds(ids, start, cache)), strict=True))
        return out["logits"], {name: out[present] for name, (present, _, _) in self.past.items()}

    def generate(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, *, eos_ids=(),
                 sampling: Sampling | None = None) -> Generation:
        """Up to ``max_new_tokens`` new tokens after ``prompt`` (token ids), stopping after the first of
        ``eos_ids``; greedy unless ``sampling`` is given."""
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise OnnxpressError("the prompt has no tokens: give some text")
        if max_new_tokens < 1:
            raise OnnxpressError(f"max new tokens {max_new_tokens} must be at least 1")
        rng = np.random.default_rng(sampling.seed) if sampling is not None else None
        eos = set(eos_ids)
        start = time.perf_counter()
        logits, cache = self.run(np.asarray([tokens], np.int64))
        new = [next_token(logits[0, -1], sampling, rng)]
        prefilled = time.perf_counter()
        while len(new) < max_new_tokens and new[-1] not in eos:
            tokens.append(new[-1])
            if self.has_cache:
                logits, cache = self.run(np.asarray([tokens[-1:]], np.int64), len(tokens) - 1, cache)
            else:
                logits, _ = self.run(np.asarray([tokens], np.int64))
            new.append(next_token(logits[0, -1], sampling, rng))
        return Generation(new, len(prompt), prefilled - start, time.perf_counter() - prefilled)


def generate(model: ModelLike, prompt: str, *, tokenizer=None, max_new_tokens: int = 64,
             sampling: Sampling | None = None, threads: int | None = None) -> tuple[str, Generation]:
    """The text ``model`` generates after ``prompt`` and how (``DecoderRunner.generate``), stopping on
    ``eos_token_ids``. ``tokenizer``: a folder or a loaded tokenizer (default: the model's folder)."""
    runner = DecoderRunner(model, threads=threads)
    model_dir = Path(model).parent if isinstance(model, str | os.PathLike) else None
    if tokenizer is None:
        if model_dir is None:
            raise OnnxpressError("generation needs a tokenizer: pass its folder")
        tokenizer = find_tokenizer_dir(model)
    folder = Path(tokenizer) if isinstance(tokenizer, str | os.PathLike) else model_dir
    tokenizer = as_tokenizer(tokenizer)
    result = runner.generate(tokenizer(prompt)["input_ids"], max_new_tokens, sampling=sampling,
                             eos_ids=eos_token_ids(folder, tokenizer))
    return tokenizer.decode(result.tokens, skip_special_tokens=True), result


def next_token(logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None) -> int:
    """The argmax of one position's logits, or a draw from them under ``sampling``."""
    if sampling is None:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < x.size:
        x[x < np.partition(x, -sampling.top_k)[-sampling.top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the likelier tokens
        p[order[before >= sampling.top_p]] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def present_name(past_name: str) -> str:
    """The output that holds a cache input's next value: past_key_values.0.key -> present.0.key."""
    return (
        past_name.replace("past_key_values", "present", 1)
        if past_name.startswith("past_key_values")
        else past_name.replace("past", "present", 1)
    )


def read_json(path: Path | None) -> dict:
    """A JSON file's object, {} when there is no such file."""
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def stop_ids(generation_config: dict, config: dict, tokenizer_eos: int | None) -> list[int]:
    """The ids generation stops on: those Hugging Face generate stops on (generation_config.json's
    eos_token_id, else config.json's) and the tokenizer's end-of-sequence token."""
    eos = generation_config.get("eos_token_id", config.get("eos_token_id"))
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    return sorted({int(i) for i in ids} | ({tokenizer_eos} if tokenizer_eos is not None else set()))


def tokenizer_eos_id(folder: Path | None) -> int | None:
    """The end-of-sequence id a Hugging Face tokenizer saved in ``folder`` declares, read from its
    JSON files (no tokenizer library needed), or None."""
    if folder is None:
        return None
    config, tokenizer = read_json(folder / "tokenizer_config.json"), read_json(folder / "tokenizer.json")
    eos = config.get("eos_token") or read_json(folder / "special_tokens_map.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None:
        return None
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        if token.get("content") == eos:
            return int(token_id)
    for token in tokenizer.get("added_tokens", []):
        if token.get("content") == eos:
            return int(token["id"])
    vocab = tokenizer.get("model", {}).get("vocab")
    return vocab.get(eos) if isinstance(vocab, dict) else None


def eos_token_ids(folder: str | os.PathLike | None, tokenizer=None) -> set[int]:
    """``stop_ids`` of the model folder ``folder`` (``tokenizer``: its loaded tokenizer, whose
    eos_token_id is used when given)."""
    folder = Path(folder) if folder is not None else None
    tokenizer_eos = tokenizer.eos_token_id if tokenizer is not None else tokenizer_eos_id(folder)
    if folder is None:
        return {tokenizer_eos} if tokenizer_eos is not None else set()
    return set(stop_ids(read_json(folder / "generation_config.json"), read_json(folder / "config.json"),
                        tokenizer_eos))


def config_context_length(config: dict) -> int | None:
    """The positions a Hugging Face config says the model was built for (max_position_embeddings)."""
    context = config.get("max_position_embeddings", config.get("n_positions"))
    return int(context) if context else None


def config_head_size(config: dict) -> int | None:
    """Attention head size from a Hugging Face config."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    return hidden // heads if hidden and heads else None


def _cache_geometry(config_dir, kv_heads: int | None, head_size: int | None) -> tuple[int, int]:
    """(KV heads, head size) of a cache whose graph leaves them symbolic: the known ones, the others
    from the config files in ``config_dir``."""
    folder = Path(config_dir) if config_dir is not None else None
    genai = read_json(folder / "genai_config.json" if folder else None).get("model", {}).get("decoder", {})
    config = read_json(folder / "config.json" if folder else None)
    kv_heads = kv_heads or genai.get("num_key_value_heads") or config.get(
        "num_key_value_heads", config.get("num_attention_heads"))
    head_size = head_size or genai.get("head_size") or config_head_size(config)
    if not kv_heads or not head_size:
        raise OnnxpressError(f"the KV cache's {'head size' if kv_heads else 'head count'} is symbolic in the graph and no "
                             "config.json or genai_config.json beside the model gives it: copy the model's config.json "
                             "next to it")
    return int(kv_heads), int(head_size)
