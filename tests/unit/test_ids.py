"""app/transfers/ids.py: the deterministic ids are RFC 4122 UUIDv5, byte for byte what the
standard library makes (stored sagas, tokens and attempts keep their ids across versions)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain import transfer_saga as saga_core
from app.transfers.ids import (
    ATTEMPT_NS,
    TOKEN_NS,
    TRANSFER_NS,
    attempt_for,
    is_transfer_id,
    token_jti_for,
    transfer_id_for,
)

text = st.text(max_size=80)


@given(text, text)
def test_the_ids_are_the_standard_library_s_uuid5(a: str, b: str) -> None:
    try:
        expected = uuid.uuid5(TRANSFER_NS, f"{a}\x1f{b}")
    except UnicodeEncodeError:  # a lone surrogate: both refuse it
        with pytest.raises(UnicodeEncodeError):
            transfer_id_for(a, b)
        return
    assert transfer_id_for(a, b) == str(expected)
    assert is_transfer_id(transfer_id_for(a, b))
    assert token_jti_for(a, b) == str(uuid.uuid5(TOKEN_NS, f"{a}\x1f{b}"))
    assert attempt_for(a, b) == uuid.uuid5(ATTEMPT_NS, f"{a}\x1f{b}").hex[
        :saga_core.ATTEMPT_CHARS]


def test_known_ids_do_not_change() -> None:
    """Ids already stored (sagas, idempotency records, issued tokens) must be derived the
    same way by every version (the values of the standard library's uuid5 before)."""
    assert transfer_id_for("alice", "k-1") == "d34d171a-caf7-5294-b5d1-65e63ecd13c9"
    assert token_jti_for("alice", "r-1") == "36cc9f17-8238-52b5-9d4f-2d75fc040b5e"
    assert attempt_for("t", "n") == "4ef39b58193f5d62"


def _canonical_by_parsing(value: str) -> bool:
    """What ``is_transfer_id`` answered before it matched: parse, write back, compare."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


UUID_LIKE = st.builds(
    lambda u, upper, braces, dashes: (lambda s: "{" + s + "}" if braces else s)(
        (u.upper() if upper else u).replace("-", "" if not dashes else "-")),
    st.uuids().map(str), st.booleans(), st.booleans(), st.booleans())


@given(st.one_of(UUID_LIKE, text, st.uuids().map(str),
                 st.uuids().map(lambda u: str(u) + "\n"),
                 st.uuids().map(lambda u: "urn:uuid:" + str(u))))
def test_a_transfer_id_is_exactly_a_canonical_uuid(value: str) -> None:
    """Matched, it accepts exactly what parsing and writing back accepted: upper case,
    braces, no dashes, a URN prefix or a trailing newline are refused as before."""
    assert is_transfer_id(value) == _canonical_by_parsing(value)


def test_transfer_id_examples() -> None:
    good = "d34d171a-caf7-5294-b5d1-65e63ecd13c9"
    assert is_transfer_id(good)
    for bad in (good.upper(), good + "\n", "{" + good + "}", good.replace("-", ""),
                "urn:uuid:" + good, good[:-1], good + "0", "",
                good[:-1] + "\u0669"):  # an Arabic-Indic nine: int() reads it, ids may not
        assert not is_transfer_id(bad), bad
        assert not _canonical_by_parsing(bad), bad
