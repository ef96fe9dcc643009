"""Wire formats shared by clients and servers: request signing (``auth``).

The guest agent's framing lives in ``stockade.agent.wire`` (it must stay
stdlib-only and importable inside isolates).
"""
