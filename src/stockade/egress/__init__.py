"""The egress proxy: an isolate's only way out under ``network_policy: "allowlist"`` (docs/egress.md).

allowlist.py (what may be reached), gate.py (one sandbox's side: handles, substitution,
records), proxy.py (the proxy's loop) and exchange.py (one connection: HTTP and CONNECT),
dns.py (name service), ca.py (the sandbox's CA),
redact.py (values taken back out of what leaves).
"""

PROXY_PORT = 3128  # where the proxy listens on the isolate's own loopback (squid's port: what tools expect)
