"""A Hugging Face fast tokenizer (``tokenizer.json``) run by the ``tokenizers`` library alone.

transformers' fast tokenizers run this same library; importing transformers imports torch, 0.3 GB
of a compile's memory that a compile without distillation never uses. ``TokenizerFile`` does what
onnxpress asks of a tokenizer (ids of texts with or without special tokens, truncated; the special
token ids; decoding) and reads the special tokens the way transformers does, from
``tokenizer_config.json`` and ``special_tokens_map.json``. ``open_tokenizer_file`` returns None
where transformers would change what ``tokenizer.json`` says when loading it (it adds BOS / EOS,
lower-cases or adds a prefix space by the config's flags): those folders are left to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# classes whose loading rebuilds the post-processor from these flags (their defaults when not in the config)
_LLAMA_FAMILY = ("LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer")
_LLAMA_FAMILY_DEFAULTS = {"add_bos_token": True, "add_eos_token": False}
# transformers' ``clean_up_tokenization``: spaces a word-piece decode leaves before punctuation
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerFile:
    def __init__(self, folder: Path, config: dict):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()  # as transformers: a call pads or truncates only when asked
        self._tokenizer.no_truncation()
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        tokens = {key: _content(config[key]) for key in SPECIAL_TOKENS if config.get(key) is not None}
        ids = {key: self._tokenizer.token_to_id(token) for key, token in tokens.items()}
        for key in SPECIAL_TOKENS:
            setattr(self, f"{key}_id", ids.get(key))
        extra = [self._tokenizer.token_to_id(_content(t)) for t in config.get("additional_special_tokens") or []]
        self.all_special_ids = sorted({i for i in [*ids.values(), *extra] if i is not None})

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, **_) -> dict:
        if truncation and max_length:
            self._tokenizer.enable_truncation(max_length)
        try:
            texts = [text] if isinstance(text, str) else list(text)
            ids = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        finally:
            self._tokenizer.no_truncation()
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def __len__(self) -> int:  # as transformers: the vocabulary with the added tokens
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text


def open_tokenizer_file(folder: Path) -> TokenizerFile | None:
    """The folder's ``tokenizer.json`` as ``TokenizerFile``; None when there is none, or when
    transformers would rewrite it on loading (see the module docstring)."""
    if not (folder / "tokenizer.json").exists():
        return None
    config = _read_json(folder / "tokenizer_config.json")
    config |= _read_json(folder / "special_tokens_map.json")
    tokenizer = TokenizerFile(folder, config)
    if not _as_transformers_loads_it(tokenizer, config):
        return None
    return tokenizer


def _as_transformers_loads_it(tokenizer: TokenizerFile, config: dict) -> bool:
    """Whether the config's flags that transformers applies to ``tokenizer.json`` on loading agree
    with what the file does already: BOS / EOS added (Llama-family classes rebuild the
    post-processor from ``add_bos_token`` / ``add_eos_token``) and lower-casing (BERT-family
    classes rebuild the normaliser from ``do_lower_case``)."""
    if config.get("add_prefix_space") is not None:  # several classes rebuild the pre-tokenizer from it
        return False
    flags = _LLAMA_FAMILY_DEFAULTS if str(config.get("tokenizer_class", "")).startswith(_LLAMA_FAMILY) else {}
    flags = {**flags, **{k: config[k] for k in _LLAMA_FAMILY_DEFAULTS if k in config}}
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    for flag, token_id, at in (("add_bos_token", tokenizer.bos_token_id, 0), ("add_eos_token", tokenizer.eos_token_id, -1)):
        if flag in flags and token_id is not None and bool(flags[flag]) != (probe[at] == token_id):
            return False
    if "do_lower_case" in config:
        lowered = tokenizer("A", add_special_tokens=False)["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
        if bool(config["do_lower_case"]) != lowered:
            return False
    return True


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
