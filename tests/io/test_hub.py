"""The hub routes streams to a registration's sessions, within its stream limit."""

from __future__ import annotations

import re

import pytest
import trio

from petit_server.edge.hub import Attachment, Hub, StreamLimitError
from petit_server.policy import Policy

from .helpers import REGISTRATION_ID, session_pair

TIMEOUT = 10  # seconds bounding each test


@pytest.mark.parametrize(
    ("server_limit", "own_limit", "named"),
    [(3, None, "[server] maxStreamsPerRegistration"), (100, 3, "its maxStreams")],
)
async def test_a_registration_opens_at_most_its_stream_limit_over_all_sessions(
    server_limit: int, own_limit: int | None, named: str
) -> None:
    """The server's limit, or the registration's own (its policy) where it has one."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub = Hub(
                max_streams_per_registration=server_limit,
                policy_of=lambda _: Policy().changed({"maxStreams": own_limit}),
            )
            for _ in range(2):  # two sessions serve the registration (HA)
                pair = await session_pair(nursery)
                hub.attach(Attachment(pair.server.session, [REGISTRATION_ID], "test", {}))
            streams = [await hub.open_stream(REGISTRATION_ID) for _ in range(3)]
            with pytest.raises(StreamLimitError, match=f"the most {re.escape(named)} allows"):
                await hub.open_stream(REGISTRATION_ID)
            await streams.pop().aclose()  # a closed stream frees its place
            streams.append(await hub.open_stream(REGISTRATION_ID))
            for stream in streams:
                await stream.aclose()
            nursery.cancel_scope.cancel()
