"""Code that runs inside isolates (stdlib only, no imports from outside this package).

``wire``: framing and JSON-RPC; ``server``: the guest agent; ``zygote`` and
``confine``: the process runtime's pre-started interpreter and its confinement
sequence; ``linux``: ctypes wrappers for calls Python lacks.
"""
