"""The supervisor's STATUS: its workers' replies merged as one server's (petit_server.workers)."""

from __future__ import annotations

from petit_server.workers import _Worker, merge_status


def only_registration(merged: dict[str, object]) -> dict[str, object]:
    connections = merged["connections"]
    assert isinstance(connections, list)
    (registration,) = connections
    assert isinstance(registration, dict)
    return registration


def worker_fields(merged: dict[str, object], name: str) -> list[object]:
    workers = merged["workers"]
    assert isinstance(workers, list)
    return [worker[name] for worker in workers]


def connection(connected: bool, **fields: object) -> dict[str, object]:
    return {
        "registeredId": "1001",
        "connected": connected,
        "port": 11081,
        "since": None,
        "remotes": [],
        "tcpListening": False,
        "tcpError": "",
        **fields,
    }


def reply(*connections: dict[str, object], open_connections: int = 0) -> dict[str, object]:
    return {
        "success": True,
        "status": "running",
        "tasks": 10,
        "publicConnections": open_connections,
        "connections": list(connections),
    }


def test_a_registration_is_connected_and_listening_if_any_worker_has_it() -> None:
    first, second = _Worker(0, state="running"), _Worker(1, state="running")
    merged = merge_status(
        [
            (first, reply(connection(False, tcpError="cannot listen on TCP 1.2.3.4:11081"))),
            (
                second,
                reply(
                    connection(True, since=5.0, remotes=["10.0.0.2"], tcpListening=True),
                    open_connections=3,
                ),
            ),
        ]
    )
    registration = only_registration(merged)
    assert registration["connected"] is True
    assert registration["connectedWorkers"] == 1
    assert registration["remotes"] == ["10.0.0.2"]
    assert registration["since"] == 5.0
    assert (registration["tcpListening"], registration["tcpError"]) == (True, "")
    assert (merged["tasks"], merged["publicConnections"]) == (20, 3)
    assert worker_fields(merged, "publicConnections") == [0, 3]


def test_a_port_that_listens_nowhere_keeps_a_workers_reason() -> None:
    workers = [_Worker(0, state="running"), _Worker(1, state="running")]
    why = "cannot listen on TCP 0.0.0.0:11081: already in use"
    merged = merge_status(
        [(workers[0], reply(connection(True))), (workers[1], reply(connection(True, tcpError=why)))]
    )
    registration = only_registration(merged)
    assert (registration["tcpListening"], registration["tcpError"]) == (False, why)
    assert registration["connectedWorkers"] == 2


def test_an_unknown_id_is_said_by_a_running_worker_not_a_restarting_one() -> None:
    restarting, running = _Worker(0, state="restarting"), _Worker(1, state="running")
    merged = merge_status(
        [
            (restarting, {"success": False, "error": "worker is restarting"}),
            (running, {"success": False, "error": "No such registeredId 4242."}),
        ]
    )
    assert merged["success"] is False
    assert merged["error"] == "No such registeredId 4242."
    assert worker_fields(merged, "state") == ["restarting", "running"]
