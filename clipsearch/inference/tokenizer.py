"""Turning text into a model's token ids without torch: the `tokenizers` library runs a tokenizer.json that the
export writes beside the model.

Two kinds, as open_clip has them:

- ``clip-bpe``: open_clip's own byte-level BPE (``SimpleTokenizer``). Its vocabulary and merges are written as
  a tokenizer.json (the same regex split, byte-to-unicode table and ``</w>`` end-of-word suffix); the text is
  cleaned exactly as open_clip cleans it (ftfy, HTML unescaping twice, whitespace, lower case) in Python,
  and the ids are framed as open_clip frames them: start, text, end, truncated to the context length with the
  end token kept, padded with zeros.
- ``hf``: a Hugging Face tokenizer (open_clip's ``HFTokenizer``, used by models whose text tower is a Hugging
  Face model, e.g. XLM-RoBERTa). Its fast tokenizer already is a tokenizer.json; it is saved with the settings
  open_clip calls it with (truncation and padding to the context length, optionally the separator zeroed).

The export checks the result against open_clip's tokenizer on a corpus before it is used (``export.py``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CLIP_SPLIT = r"""(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TextTokenizer:
    """Texts → (N, context_length) int64 token ids, exactly as the model's open_clip tokenizer gives them."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.settings = settings
        self.kind = str(settings["kind"])
        self.context_length = int(settings["context_length"])
        self._clean = settings.get("clean", "lower")
        self._tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        if self.kind == "hf":
            self._tokenizer.enable_truncation(self.context_length)
            self._tokenizer.enable_padding(length=self.context_length, pad_id=int(settings["pad_id"]),
                                           pad_token=str(settings.get("pad_token", "<pad>")))

    def __call__(self, texts: list[str]) -> np.ndarray:
        cleaned = [clean_text(text, self._clean) for text in texts]
        if self.kind == "hf":
            return self._hf_ids(cleaned)
        return self._clip_ids(cleaned)

    def _clip_ids(self, texts: list[str]) -> np.ndarray:
        sot, eot = int(self.settings["sot_id"]), int(self.settings["eot_id"])
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [sot, *encoding.ids, eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = eot
            result[row, : len(ids)] = ids
        return result

    def _hf_ids(self, texts: list[str]) -> np.ndarray:
        ids = np.array([e.ids for e in self._tokenizer.encode_batch(texts)], dtype=np.int64)
        ids = ids.reshape(len(texts), self.context_length)
        if self.settings.get("strip_sep_token"):
            ids[ids == int(self.settings["sep_id"])] = 0
        return ids


def clean_text(text: str, how: str) -> str:
    """open_clip's ``get_clean_fn(how)``: ``lower``, ``whitespace`` or ``canonicalize``."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        import string

        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        return " ".join(text.split()).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if how == "lower" else text


# --- written at export time (open_clip is loaded then) -------------------------------------------------------


def write_tokenizer(open_clip_tokenizer: Any, folder: Path) -> dict[str, Any] | None:
    """Write the tokenizer.json for ``open_clip_tokenizer`` into ``folder``; returns its settings, or None for a
    kind this module cannot run (queries then use open_clip's tokenizer, with torch)."""
    kind = type(open_clip_tokenizer).__name__
    if kind == "SimpleTokenizer" and not getattr(open_clip_tokenizer, "reduction_fn", None):
        return _write_clip_bpe(open_clip_tokenizer, folder)
    if kind == "HFTokenizer" and not getattr(open_clip_tokenizer, "tokenizer_mode", ""):
        return _write_hf(open_clip_tokenizer, folder)
    return None


def _write_clip_bpe(tok: Any, folder: Path) -> dict[str, Any] | None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = [t for t, i in sorted(tok.encoder.items(), key=lambda item: item[1]) if i in tok.all_special_ids]
    if specials[:2] != ["<start_of_text>", "<end_of_text>"]:
        return None  # additional special tokens change the split pattern: not reproduced here
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    model = models.BPE(vocab=dict(tok.encoder), merges=list(merges), end_of_word_suffix="</w>",
                       continuing_subword_prefix="", fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer.save(str(folder / TOKENIZER_FILE))
    return {"kind": "clip-bpe", "context_length": int(tok.context_length), "clean": _clean_name(tok.clean_fn),
            "sot_id": int(tok.sot_token_id), "eot_id": int(tok.eot_token_id)}


def _write_hf(tok: Any, folder: Path) -> dict[str, Any] | None:
    backend = getattr(tok.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer has no tokenizer.json
    backend.save(str(folder / TOKENIZER_FILE))
    hf = tok.tokenizer
    return {"kind": "hf", "context_length": int(tok.context_length), "clean": _clean_name(tok.clean_fn),
            "pad_id": int(hf.pad_token_id or 0), "pad_token": str(hf.pad_token or "<pad>"),
            "strip_sep_token": bool(tok.strip_sep_token), "sep_id": int(hf.sep_token_id or -1)}


def _clean_name(clean_fn: Any) -> str:
    name = getattr(clean_fn, "__name__", "_clean_lower")
    return {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
            "_clean_canonicalize": "canonicalize"}.get(name, "lower")
