"""petit: a reverse-tunnel connector (shared protocol core, trio driver and helpers)."""

from __future__ import annotations

__version__ = "0.1.0"
