"""Run code in a fresh Python that cannot import toolvlm: proof that an artifact loads in the plain libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Set before the code runs: toolvlm is unimportable (an import raises), and nothing is fetched from a hub.
GUARD = 'import sys\nsys.modules["toolvlm"] = None  # any "import toolvlm..." raises ImportError\n'
CHECK = (
    '\nassert not [m for m, mod in sys.modules.items() if m.split(".")[0] == "toolvlm" and mod is not None], '
    '"toolvlm was imported"\n'
)


def run_plain(code: str, args: list[str], tmp_path: Path, timeout: int = 120) -> dict:
    """Run `code` (which prints one JSON object as its last line) with `args` in a subprocess without toolvlm,
    offline, from `tmp_path`; return the object."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # where transformers copies a folder's model code
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", GUARD + code + CHECK, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"plain-library run failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])
