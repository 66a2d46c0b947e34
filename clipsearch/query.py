"""Parsing a query string into weighted terms, and combining term embeddings into one query vector.

The syntax, kept small enough to remember:

    a red car in the rain          one phrase (every plain word joins the main phrase, in order)
    beach -dog                     "beach", minus "dog"
    beach -"dog on a leash"        quotes make a multi-word term
    2:sunset beach                 "sunset" counts twice as much as "beach"
    0.5:"golden hour" -1.5:people  any real weight; a negative weight subtracts

The query vector is the normalised sum of the weighted unit vectors of its terms (and of any query images).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from clipsearch.errors import QueryError

MAX_TERM_CHARS = 1000

_TOKEN = re.compile(
    r"""(?P<sign>-(?=\S))?                     # a leading minus makes a negative term
        (?:(?P<weight>[+-]?\d+(?:\.\d+)?):(?=\S))?   # N: gives a weight
        (?:"(?P<quoted>[^"]*)"|(?P<word>\S+))""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Term:
    """One text term and its weight (negative terms have negative weights)."""

    text: str
    weight: float


def parse_query(text: str) -> list[Term]:
    """Split ``text`` into terms; plain words form one main phrase of weight 1."""
    phrase: list[str] = []
    terms: list[Term] = []
    for match in _TOKEN.finditer(text):
        body = (match["quoted"] if match["quoted"] is not None else match["word"]).strip()
        if not body:
            continue
        weight = _weight_of(match)
        if weight is None:
            phrase.append(body)
        elif weight != 0:
            terms.append(Term(body[:MAX_TERM_CHARS], weight))
    if phrase:
        terms.insert(0, Term(" ".join(phrase)[:MAX_TERM_CHARS], 1.0))
    return terms


def _weight_of(match: re.Match[str]) -> float | None:
    """The explicit weight of a token, or None for a plain word of the main phrase."""
    negative = match["sign"] is not None
    if match["weight"] is None:
        return -1.0 if negative else (1.0 if match["quoted"] is not None else None)
    weight = float(match["weight"])
    if not math.isfinite(weight):
        raise QueryError(f"The weight {match['weight']!r} is not a finite number.")
    return -abs(weight) if negative else weight


def combine(vectors: np.ndarray, weights: list[float]) -> np.ndarray:
    """Weighted sum of unit rows, normalised; a clear error when nothing positive is left."""
    if len(weights) == 0:
        raise QueryError("The query is empty: give some text, an image, or both.")
    if not any(w > 0 for w in weights):
        raise QueryError("The query has only negative terms; add at least one thing to look for.")
    total = (np.asarray(weights, dtype=np.float32)[:, None] * vectors).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("The query's terms cancel each other out; change their weights.")
    return (total / norm).astype(np.float32)
