"""Where traffic enters and leaves: tunnel endpoint, ingress, TCP ports, cluster peers.

Reads the registry and records usage; never imports ``petit_server.ops``.
"""
