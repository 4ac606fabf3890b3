"""Identity proofs: hello encoding, which claims verify, and the register transcript."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, strategies as st

import petit.auth
from petit.auth import (
    MAX_CLAIMS,
    MAX_WORKERS,
    NOBODY_KEY,
    Hello,
    accepted_ids,
    decode_hello,
    decode_window,
    encode_hello,
    generate_key,
    hello_transcript,
    public_key_raw,
    register_transcript,
    sign,
    unregister_transcript,
    verify,
)
from petit.errors import RemoteProtocolError
from petit.flow import LARGEST_WINDOW

NONCE = bytes(range(32))
OTHER_NONCE = bytes(range(1, 33))
FINGERPRINT = hashlib.sha256(b"server certificate").digest()
OTHER_FINGERPRINT = hashlib.sha256(b"a man in the middle's certificate").digest()

KEY_1001 = generate_key()
KEY_1002 = generate_key()
STRANGER = generate_key()
REGISTRY = {"1001": public_key_raw(KEY_1001), "1002": public_key_raw(KEY_1002)}


def signed_hello(
    signers: dict[str, Ed25519PrivateKey],
    *,
    nonce: bytes = NONCE,
    fingerprint: bytes = FINGERPRINT,
    signed_ids: list[str] | None = None,
) -> Hello:
    """A hello claiming ``signers``' IDs, each signed by the given key over the transcript."""
    transcript = hello_transcript(nonce, fingerprint, signed_ids or list(signers))
    return Hello(claims={rid: sign(key, transcript) for rid, key in signers.items()})


def accepted(hello: Hello, *, nonce: bytes = NONCE, fingerprint: bytes = FINGERPRINT) -> list[str]:
    return accepted_ids(hello, nonce, fingerprint, REGISTRY.get)


def test_hello_round_trip() -> None:
    hello = Hello(
        claims={"1001": b"\x00sig\xff" * 16, "1002": b"other"},
        vitae={"hostname": "box", "version": "0.1.0"},
    )
    assert decode_hello(encode_hello(hello)) == hello


def test_a_hello_announces_the_client_window_and_an_old_one_announces_none() -> None:
    hello = Hello(claims={"1001": b"sig"}, window=64 * 1024)
    assert json.loads(encode_hello(hello))["window"] == 64 * 1024
    assert decode_hello(encode_hello(hello)) == hello
    old = _hello_json([{"id": "1001", "signature": SIGNATURE}])
    assert decode_hello(old).window is None


@pytest.mark.parametrize("window", [0, -1, LARGEST_WINDOW + 1, True, 1.5, "65536", [1]])
def test_a_window_that_is_not_a_byte_count_is_a_remote_protocol_error(window: object) -> None:
    with pytest.raises(RemoteProtocolError, match="'window'"):
        decode_window({"window": window}, what="welcome")
    with pytest.raises(RemoteProtocolError, match="'window'"):
        decode_hello(_hello_json([{"id": "1001", "signature": SIGNATURE}], window=window))


def test_a_hello_names_the_workers_held_and_an_old_one_none() -> None:
    hello = Hello(claims={"1001": b"sig"}, window=1, held_workers=frozenset({0, 3}))
    assert json.loads(encode_hello(hello))["heldWorkers"] == [0, 3]
    assert decode_hello(encode_hello(hello)) == hello
    assert "heldWorkers" not in json.loads(encode_hello(Hello(claims={"1001": b"sig"})))
    old = _hello_json([{"id": "1001", "signature": SIGNATURE}])
    assert decode_hello(old).held_workers == frozenset()


@pytest.mark.parametrize(
    "held", [[-1], [MAX_WORKERS], [True], ["1"], [1.0], 3, [0] * (MAX_WORKERS + 1)]
)
def test_held_workers_that_are_not_indices_are_a_remote_protocol_error(held: object) -> None:
    with pytest.raises(RemoteProtocolError, match="'heldWorkers'"):
        decode_hello(_hello_json([{"id": "1001", "signature": SIGNATURE}], heldWorkers=held))


def test_each_valid_claim_is_accepted() -> None:
    hello = signed_hello({"1002": KEY_1002, "1001": KEY_1001})
    assert accepted(hello) == ["1001", "1002"]


@pytest.mark.parametrize(
    "why",
    ["wrong key", "unknown id", "replayed on another nonce", "other server certificate"],
)
def test_only_verifying_claims_are_accepted(why: str) -> None:
    if why == "wrong key":
        hello = signed_hello({"1001": KEY_1001, "1002": STRANGER})
        result = accepted(hello)
    elif why == "unknown id":
        hello = signed_hello({"1001": KEY_1001, "1003": STRANGER})
        result = accepted(hello)
    elif why == "replayed on another nonce":
        hello = signed_hello({"1001": KEY_1001, "1002": KEY_1002})
        result = accepted(hello, nonce=OTHER_NONCE)
    else:
        hello = signed_hello({"1001": KEY_1001, "1002": KEY_1002})
        result = accepted(hello, fingerprint=OTHER_FINGERPRINT)
    expected = ["1001"] if why in ("wrong key", "unknown id") else []
    assert result == expected


def test_a_claim_cannot_be_widened_after_signing() -> None:
    # 1001's signature covers the set {1001}; a hello claiming {1001, 1002} invalidates it.
    only_1001 = hello_transcript(NONCE, FINGERPRINT, ["1001"])
    widened = Hello(claims={"1001": sign(KEY_1001, only_1001), "1002": b"\x00" * 64})
    assert accepted(widened) == []


def test_claim_order_does_not_matter() -> None:
    assert hello_transcript(NONCE, FINGERPRINT, ["1002", "1001"]) == hello_transcript(
        NONCE, FINGERPRINT, ["1001", "1002", "1001"]
    )


def _hello_json(claims: object, **extra: object) -> bytes:
    return json.dumps({"claims": claims, **extra}).encode()


SIGNATURE = base64.b64encode(b"s" * 64).decode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b'"claims"',
        _hello_json([]),
        _hello_json("1001"),
        _hello_json([{"id": "1001", "signature": SIGNATURE}] * (MAX_CLAIMS + 1)),
        _hello_json(["1001"]),
        _hello_json([{"id": 1001, "signature": SIGNATURE}]),
        _hello_json([{"id": "0123", "signature": SIGNATURE}]),
        _hello_json([{"id": "abc", "signature": SIGNATURE}]),
        _hello_json([{"id": "1001"}]),
        _hello_json([{"id": "1001", "signature": "not base64!"}]),
        _hello_json([{"id": "1001", "signature": "é"}]),
        _hello_json([{"id": "1001", "signature": SIGNATURE}], vitae=[]),
        _hello_json([{"id": "1001", "signature": SIGNATURE}], vitae={"k": {"nested": 1}}),
        _hello_json([{"id": "1001", "signature": SIGNATURE}], vitae={"k": "v" * 257}),
        _hello_json([{"id": "1001", "signature": SIGNATURE}], vitae={"k" * 65: "v"}),
        _hello_json(
            [{"id": "1001", "signature": SIGNATURE}], vitae={str(i): "v" for i in range(65)}
        ),
    ],
)
def test_malformed_hello_is_a_remote_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_hello(payload)


def _check_decodes_or_refuses(payload: bytes) -> None:
    try:
        hello = decode_hello(payload)
    except RemoteProtocolError:
        return
    assert isinstance(hello, Hello)
    assert 1 <= len(hello.claims) <= MAX_CLAIMS


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_remote_protocol_error(payload: bytes) -> None:
    _check_decodes_or_refuses(payload)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=70), children, max_size=4)
    ),
    max_leaves=12,
)
_claim = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(0, 10**13).map(str), st.just("0123"), _json_values),
        "signature": st.one_of(st.text(max_size=90), _json_values),
    },
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "claims": st.one_of(st.lists(_claim, max_size=3), _json_values),
            "vitae": _json_values,
        },
    )
)
def test_hello_shaped_json_decodes_or_raises_remote_protocol_error(
    document: dict[str, object],
) -> None:
    _check_decodes_or_refuses(json.dumps(document).encode())


# Registration proof.


def test_register_proof_verifies_only_for_its_own_transcript() -> None:
    public = public_key_raw(KEY_1001)
    signature = sign(KEY_1001, register_transcript(NONCE, FINGERPRINT, public))
    assert verify(public, signature, register_transcript(NONCE, FINGERPRINT, public))
    # Another connection, another server certificate, another key: no longer a proof.
    assert not verify(public, signature, register_transcript(OTHER_NONCE, FINGERPRINT, public))
    assert not verify(public, signature, register_transcript(NONCE, OTHER_FINGERPRINT, public))
    other = public_key_raw(KEY_1002)
    assert not verify(other, signature, register_transcript(NONCE, FINGERPRINT, other))


def test_register_proof_needs_the_private_half() -> None:
    public = public_key_raw(KEY_1001)
    transcript = register_transcript(NONCE, FINGERPRINT, public)
    assert not verify(public, sign(STRANGER, transcript), transcript)


def test_transcripts_of_different_purposes_never_collide() -> None:
    """A register proof is not an unregister or hello proof, even over the same bytes."""
    public = public_key_raw(KEY_1001)
    register = register_transcript(NONCE, FINGERPRINT, public)
    signature = sign(KEY_1001, register)
    assert not verify(public, signature, unregister_transcript(NONCE, FINGERPRINT, "1001"))
    assert not verify(public, signature, hello_transcript(NONCE, FINGERPRINT, ["1001"]))


@pytest.mark.parametrize("public", [b"", b"\x01" * 31, b"\x01" * 33])
def test_verify_with_a_malformed_key_is_false(public: bytes) -> None:
    assert not verify(public, b"\x00" * 64, b"transcript")


def test_unknown_ids_cost_a_verification_like_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time a hello takes must not tell which IDs exist: every claim is verified once,
    an unknown ID's against a key nobody holds."""
    checked: list[bytes] = []

    def counting_verify(public_raw: bytes, signature: bytes, transcript: bytes) -> bool:
        checked.append(public_raw)
        return verify(public_raw, signature, transcript)

    monkeypatch.setattr(petit.auth, "verify", counting_verify)
    known = signed_hello({"1001": KEY_1001, "1002": KEY_1002})
    unknown = signed_hello({"4001": STRANGER, "4002": STRANGER})
    assert accepted(known) == ["1001", "1002"]
    assert accepted(unknown) == []
    assert len(checked) == 4
    assert checked[2:] == [NOBODY_KEY, NOBODY_KEY]
