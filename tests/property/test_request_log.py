"""The timestamp range stored in request_log for a request: exactly its OK items' timestamps."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.posting.engine import RESULT_OK, _stored_range


@given(st.lists(st.booleans(), max_size=40), st.integers(0, 10), st.integers(0, 10),
       st.integers(1, 10**12))
def test_the_range_covers_exactly_the_stored_items(oks, before, after, base):
    results = [RESULT_OK] * before + [RESULT_OK if ok else 7 for ok in oks] + [RESULT_OK] * after
    stamps = [base + i if r == RESULT_OK else 0 for i, r in enumerate(results)]
    start, end = before, before + len(oks)
    stored = [stamps[i] for i in range(start, end) if results[i] == RESULT_OK]
    got = _stored_range(results, stamps, start, end)
    if not stored:
        assert got is None
    else:
        assert got == (min(stored), max(stored))
        assert all(got[0] <= t <= got[1] for t in stored)
        outside = stamps[:start] + stamps[end:]
        assert not any(got[0] <= t <= got[1] for t in outside if t)
