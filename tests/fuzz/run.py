"""Coverage-guided fuzzing of petit's parsers with atheris (libFuzzer), one target a run.

    scripts/bootstrap fuzz   # or all: atheris from requirements.lock
    .venv/bin/python -m tests.fuzz.run TARGET [libFuzzer options] [corpus directory ...]
    e.g. .venv/bin/python -m tests.fuzz.run ingress -runs=100000 -max_total_time=600

TARGET is one of ``tests.fuzz.targets.TARGETS``: connection (frame decoder and stream state
machine), handshake (hello, register and unregister requests), control (the control port),
ingress (public HTTP). A crash is any exception the target lets out; libFuzzer saves the
input as ``crash-*`` and stops.
"""

from __future__ import annotations

import sys

import atheris

# Coverage feedback for petit, the server and the HTTP parser; imported only inside.
with atheris.instrument_imports(include=["petit", "petit_server", "h11"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
