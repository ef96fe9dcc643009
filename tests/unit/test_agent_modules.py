"""What the zygote copies into each isolate is every module the agent imports there."""

from __future__ import annotations

import json
import subprocess
import sys

from stockade.agent.zygote import AGENT_MODULES
from stockade.runtimes.process.zygote import AGENT_PARENT


def test_every_module_the_agent_imports_is_copied_into_the_isolate() -> None:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from agent import server;"
        "print(json.dumps(sorted(m.split('.', 1)[1] for m in sys.modules if m.startswith('agent.'))))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, AGENT_PARENT], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    imported = set(json.loads(out.stdout))
    assert imported and imported <= set(AGENT_MODULES), imported - set(AGENT_MODULES)
