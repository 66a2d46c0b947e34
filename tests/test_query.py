"""Query parsing: weights, negatives, quotes, unicode and very long input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipsearch.errors import QueryError
from clipsearch.query import MAX_TERM_CHARS, Term, combine, parse_query


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("a red car in the rain", [Term("a red car in the rain", 1.0)]),
        ("beach -dog", [Term("beach", 1.0), Term("dog", -1.0)]),
        ('beach -"dog on a leash"', [Term("beach", 1.0), Term("dog on a leash", -1.0)]),
        ("2:sunset beach", [Term("beach", 1.0), Term("sunset", 2.0)]),
        ('0.5:"golden hour" -1.5:people', [Term("golden hour", 0.5), Term("people", -1.5)]),
        ("x-ray 2: - café", [Term("x-ray 2: - café", 1.0)]),
        ("", []),
    ],
)
def test_examples(text, terms):
    assert parse_query(text) == terms


@given(st.text(max_size=3000))
def test_any_text_parses_to_bounded_terms(text):
    terms = parse_query(text)
    assert all(t.text and t.text == t.text.strip() and len(t.text) <= MAX_TERM_CHARS for t in terms)
    assert all(t.weight != 0 for t in terms)
    assert sum(1 for t in terms if t.weight == 1.0 and '"' not in text) <= max(1, text.count(":") + 1)


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Z", "C"], blacklist_characters='"-:'),
                        min_size=1, max_size=20), min_size=1, max_size=8))
def test_plain_words_form_one_phrase(words):
    words = [w for w in words if not w[0].isdigit()]
    terms = parse_query(" ".join(words))
    if words:
        assert terms == [Term(" ".join(words)[:MAX_TERM_CHARS], 1.0)]


@given(st.floats(min_value=0.01, max_value=100, allow_nan=False), st.text(alphabet="abcdé", min_size=1, max_size=9))
def test_weights_and_negatives_round_trip(weight, word):
    terms = parse_query(f"{weight:.2f}:{word} -{word}")
    assert terms[0] == Term(word, float(f"{weight:.2f}")) and terms[1] == Term(word, -1.0)


def test_combine_normalises_and_refuses_nonsense():
    vectors = np.eye(3, dtype=np.float32)
    combined = combine(vectors, [2.0, 1.0, -1.0])
    assert np.linalg.norm(combined) == pytest.approx(1.0)
    assert combined[0] > combined[1] > 0 > combined[2]
    with pytest.raises(QueryError, match="only negative"):
        combine(vectors[:1], [-1.0])
    with pytest.raises(QueryError, match="cancel"):
        combine(np.stack([vectors[0], vectors[0]]), [1.0, -1.0])
    with pytest.raises(QueryError, match="empty"):
        combine(vectors[:0], [])
