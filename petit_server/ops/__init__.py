"""What operators see and drive: the admin API, its dashboard, and metrics.

Reads the edge (the hub), the registry and usage; nothing below imports it.
"""
