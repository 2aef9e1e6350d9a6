"""CLIP's byte-level BPE tokenizer (open_clip ``SimpleTokenizer``), reimplemented for text search at central.

Reads open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (shipped by the exporter beside the text tower) and
produces the same ids as ``open_clip.tokenize``: ``<|startoftext|>`` + BPE ids + ``<|endoftext|>``, truncated
to the context length (the last id stays end-of-text) and zero-padded. Text cleaning is HTML unescaping,
whitespace collapsing and lower-casing; open_clip additionally runs ``ftfy.fix_text``, which only matters for
mojibake (broken Unicode) in the query.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import regex as re

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PAT = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                  re.IGNORECASE)


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pairs(word: Tuple[str, ...]) -> set:
    return {(a, b) for a, b in zip(word, word[1:])}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipBpeTokenizer:
    """``encode(text)`` -> BPE ids; ``__call__(text, context_length)`` -> int64 [1, context_length]."""

    def __init__(self, vocab_path: str | Path) -> None:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self._cache: Dict[str, str] = {SOT: SOT, EOT: EOT}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word: Tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            new: List[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for token in _PAT.findall(clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, text: str, context_length: int) -> np.ndarray:
        ids = [self.sot] + self.encode(text) + [self.eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = self.eot
        out = np.zeros((1, context_length), np.int64)
        out[0, : len(ids)] = ids
        return out
