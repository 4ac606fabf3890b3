"""Credit windows: spending, granting, and batched WINDOW_UPDATE increments."""

from __future__ import annotations

import pytest

from petit.errors import FlowControlError, LocalProtocolError
from petit.flow import LARGEST_WINDOW, ReceiveWindow, SendWindow


def test_send_window_consumes_and_grants() -> None:
    window = SendWindow(100)
    window.consume(60)
    window.consume(40)
    assert window.available == 0
    window.grant(25)
    assert window.available == 25


def test_send_window_refuses_to_overspend() -> None:
    window = SendWindow(10)
    with pytest.raises(LocalProtocolError):
        window.consume(11)
    assert window.available == 10


@pytest.mark.parametrize("delta", [0, -1])
def test_grant_must_be_positive(delta: int) -> None:
    with pytest.raises(FlowControlError):
        SendWindow(10).grant(delta)


def test_grant_may_reach_but_not_pass_the_largest_window() -> None:
    window = SendWindow(10)
    window.grant(LARGEST_WINDOW - 10)
    assert window.available == LARGEST_WINDOW
    with pytest.raises(FlowControlError, match="overflows"):
        window.grant(1)


def test_receive_window_refuses_data_beyond_credit() -> None:
    window = ReceiveWindow(100)
    window.data_received(100)
    assert window.available == 0
    with pytest.raises(FlowControlError):
        window.data_received(1)


def test_credit_returns_in_batches_of_half_the_window() -> None:
    window = ReceiveWindow(100)
    window.data_received(60)
    assert window.data_consumed(30) == 0
    assert window.data_consumed(19) == 0
    assert window.data_consumed(1) == 50
    assert window.available == 90
    assert window.data_consumed(10) == 0


def test_credit_returns_at_once_when_the_peer_is_blocked() -> None:
    window = ReceiveWindow(100)
    window.data_received(100)
    assert window.data_consumed(1) == 1
    assert window.available == 1


def test_consuming_more_than_received_is_our_bug() -> None:
    window = ReceiveWindow(100)
    window.data_received(10)
    window.data_consumed(5)
    with pytest.raises(LocalProtocolError):
        window.data_consumed(6)
