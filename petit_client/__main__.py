from __future__ import annotations

from petit_client.cli import main

main()
