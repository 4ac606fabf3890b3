"""Fuzzing what strangers send: control commands, hellos, registration requests, public HTTP.

Each parser must answer or refuse with its own error type, never crash, never hang, and leave
nothing changed behind a refusal. The example counts are modest for the suite; a long run:
``PETIT_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/proto/test_fuzz_inputs.py
--hypothesis-show-statistics``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from petit.auth import decode_hello, generate_key, public_key_raw, register_transcript, sign
from petit.control import ETX
from petit.errors import PetitError
from petit.messages import decode as decode_message
from petit_server.edge.gateway import Gateway
from tests.fuzz.targets import (
    control_exchange,
    ingress_answer,
    make_gateway,
    refuse_unproven,
)


def fuzz_settings(default_examples: int) -> settings:
    """``default_examples`` per test, or PETIT_FUZZ_EXAMPLES of them for a deep run."""
    examples = int(os.environ.get("PETIT_FUZZ_EXAMPLES", default_examples))
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
ids = st.one_of(st.sampled_from(["1001", "0", "01", "1" * 13, "-1", "1e3", " 1001"]), json_values)
base64ish = st.one_of(st.sampled_from(["", "AA==", "====", "\u00e9", "A" * 88]), json_values)


def documents(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects holding any subset of ``fields`` (plausible or garbage values) plus noise."""
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda known: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(
            lambda noise: {**noise, **known}
        )
    )


hello_documents = documents(
    {
        "claims": st.one_of(
            json_values,
            st.lists(documents({"id": ids, "signature": base64ish}) | json_values, max_size=3),
        ),
        "vitae": st.one_of(json_values, st.dictionaries(st.text(max_size=8), json_values)),
    }
)


def as_payloads(document_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """The JSON of plausible documents, or raw bytes."""
    return st.one_of(document_strategy.map(lambda d: json.dumps(d).encode()), st.binary())


@fuzz_settings(300)
@given(as_payloads(hello_documents))
def test_decode_hello_accepts_or_refuses_with_remote_protocol_error(payload: bytes) -> None:
    try:
        hello = decode_hello(payload)
    except PetitError:
        return
    assert hello.claims
    assert all(rid.isdigit() for rid in hello.claims)


@fuzz_settings(1000)
@given(as_payloads(json_values))
def test_message_decode_returns_an_object_or_refuses(payload: bytes) -> None:
    try:
        document = decode_message(payload, what="register")
    except PetitError:
        return
    assert isinstance(document, dict)


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """A gateway over a registry holding one registration (1001)."""
    return make_gateway(tmp_path)


register_requests = documents(
    {"public_key": base64ish, "signature": base64ish, "vitae": json_values, "token": json_values}
)
unregister_requests = documents({"id": ids, "signature": base64ish})


@fuzz_settings(200)
@given(register_requests, unregister_requests)
def test_unproven_registration_requests_are_refused_and_change_nothing(
    gateway: Gateway, register: dict[str, object], unregister: dict[str, object]
) -> None:
    refuse_unproven(gateway, register, unregister)


# ----------------------------------------------------------------------------- control port


control_inputs = st.one_of(
    st.binary(max_size=5000),
    st.builds(
        lambda words, end: " ".join(words).encode("utf-8", "surrogatepass") + end,
        st.lists(st.sampled_from(["STOP", "STATUS", "PING", "LOG", "\x00", "é", ""]) | st.text()),
        st.sampled_from([ETX, b"", ETX + ETX, b"\r\n"]),
    ),
)


@fuzz_settings(150)
@given(st.lists(control_inputs, min_size=1, max_size=3))
def test_control_port_answers_any_bytes_with_json_and_keeps_serving(inputs: list[bytes]) -> None:
    control_exchange(inputs)


# ----------------------------------------------------------------------------- public HTTP

REQUEST_LINES = [b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"GET / HTTP/1.0", b"GET  HTTP/1.1"]
HOST_LINES = [b"Host: 1001.localhost", b"Host: 1001-shop.localhost:99999", b"Host: [::1]", b"X: y"]
HEADER_LINES = [
    b"Host: ",
    b"Content-Length: 5",
    b"Content-Length: -1",
    b"Content-Length: 5, 6",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Expect: 100-continue",
    b"Connection: close",
    b"Connection: x-drop",
    b" folded",
]
BODIES = [b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nhel"]
plausible_requests = st.builds(
    lambda line, host, headers, body: b"\r\n".join([line, host, *headers, b"", body]),
    st.sampled_from(REQUEST_LINES) | st.binary(max_size=20),
    st.sampled_from(HOST_LINES),
    st.lists(st.sampled_from(HEADER_LINES) | st.binary(max_size=20), max_size=6),
    st.sampled_from(BODIES) | st.binary(max_size=40),
)
SMUGGLING_BAD_CHUNK = (
    b"POST /x HTTP/1.1\r\nHost: 1001.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"
)
http_inputs = st.one_of(
    st.binary(max_size=2000), st.lists(plausible_requests, min_size=1, max_size=3).map(b"".join)
)


@fuzz_settings(300)
@given(http_inputs, st.integers(1, 64))
@example(SMUGGLING_BAD_CHUNK, 64)
def test_ingress_answers_or_closes_on_any_bytes(data: bytes, piece: int) -> None:
    """Hosts naming 1001 reach a private service through a real session pair; others 404."""
    ingress_answer(data, piece)


async def test_a_register_request_from_a_real_key_still_registers(gateway: Gateway) -> None:
    """The refusals above come from the proofs, not from a parser that refuses everything."""
    key, nonce = generate_key(), secrets.token_bytes(32)
    public = public_key_raw(key)
    signature = sign(key, register_transcript(nonce, gateway.certificate_fingerprint, public))
    request: dict[str, object] = {
        "public_key": base64.b64encode(public).decode(),
        "signature": base64.b64encode(signature).decode(),
    }
    assert (await gateway._register(request, nonce, "192.0.2.1"))["type"] == "registered"
