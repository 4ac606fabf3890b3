from __future__ import annotations

from petit_server.cli import main

main()
