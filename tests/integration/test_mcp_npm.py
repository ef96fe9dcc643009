"""MCP from the npm registry: the reference `server-everything` behind the gateway, and the MCP
Inspector's command-line mode as a second real client (besides the SDK's, test_mcp_gateway.py).

Both are installed with npm (pinned) into a directory the isolate is shown read-only; the
server runs with the host's `node`, inside a process isolate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require

STOCKADE = os.path.join(os.path.dirname(sys.executable), "stockade")
PACKAGES = ["@modelcontextprotocol/inspector@2.12.0", "@modelcontextprotocol/server-everything@2026.8.31"]
EVERYTHING = "/srv/npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js"


@pytest.fixture(scope="module")
def npm_dir() -> Iterator[str]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("no node and npm on this host (scripts/ensure-deps.sh installs them)")
    where = tempfile.mkdtemp(prefix="stockade-npm-")
    os.chmod(where, 0o755)  # shown to the isolate, whose uid is not root's
    try:
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", *PACKAGES], cwd=where,
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def inspector(npm_dir: str, config_dir: str, *method: str) -> Any:
    """The Inspector's CLI on the gateway (its --config is its own: the gateway's comes by environment)."""
    cli = os.path.join(npm_dir, "node_modules", ".bin", "mcp-inspector")
    done = subprocess.run(
        [cli, "--cli", "-e", f"STOCKADE_CONFIG_DIR={config_dir}", "-e", "STOCKADE_POOL_SIZE=0",
         STOCKADE, "mcp", "gateway", "--audit-log", "off", "--method", *method],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_the_reference_server_from_npm_through_the_gateway_and_the_inspector(npm_dir: str, tmp_path: Any) -> None:
    require("process")
    for lifecycle in ("ephemeral", "persistent"):
        server = {"command": "node", "args": [EVERYTHING, "stdio"], "expose": "all", "lifecycle": lifecycle,
                  "timeout_secs": 60, "mounts": [{"host_path": npm_dir, "guest_path": "/srv/npm"}]}  # fmt: skip
        (tmp_path / "isolation_config.json").write_text(json.dumps({"mcp_servers": {"everything": server}}))
        tools = {t["name"] for t in inspector(npm_dir, str(tmp_path), "tools/list")["tools"]}
        assert {"echo", "get-sum", "get-env"} <= tools
        summed = inspector(npm_dir, str(tmp_path), "tools/call", "--tool-name", "get-sum", "--tool-arg", "a=2", "b=40")
        assert summed["content"][0]["text"] == "The sum of 2 and 40 is 42." and not summed["isError"]
        assert summed["_meta"]["stockade"]["isolate"] == lifecycle
        env = inspector(npm_dir, str(tmp_path), "tools/call", "--tool-name", "get-env")
        assert "STOCKADE" not in env["content"][0]["text"]  # nothing of the host's environment inside
        prompt = inspector(npm_dir, str(tmp_path), "prompts/get", "--prompt-name", "simple-prompt")
        assert prompt["messages"][0]["content"]["text"] == "This is a simple prompt without arguments."
        uri = "demo://resource/static/document/architecture.md"
        assert uri in {r["uri"] for r in inspector(npm_dir, str(tmp_path), "resources/list")["resources"]}
        read = inspector(npm_dir, str(tmp_path), "resources/read", "--uri", uri)
        assert read["contents"][0]["text"].startswith("# Everything Server")
