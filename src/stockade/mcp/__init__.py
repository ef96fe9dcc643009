"""MCP tools in isolates (seed 001): the isolation config, ``ToolHost`` and the ``stockade mcp`` commands.

Needs the official MCP SDK (``pip install 'stockade[mcp]'``); docs/mcp.md.
"""
