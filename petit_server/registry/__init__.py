"""Who is registered: registrations, aliases, enrollment tokens, and where they are kept.

The lowest layer of the server above its configuration and usage counters: nothing here
imports the edge (``petit_server.edge``) or operations (``petit_server.ops``).
"""
