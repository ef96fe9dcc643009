"""The stockade daemon: one asyncio process that owns the runtimes and every live sandbox."""
