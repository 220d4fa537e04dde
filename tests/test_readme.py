"""The README's Python blocks run as written, each pasted into a fresh interpreter (so the
README cannot rot). The bundled models come from the test session's cache (the ``trained``
fixture points ADVKERN_CACHE at it), so no block trains anything here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs_in_a_fresh_interpreter(i, trained, tmp_path):
    trained("mlp")  # the session's cache now holds the bundled mlp (the fixture sets the env)
    proc = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README block {i + 1}:\n{BLOCKS[i]}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "training the bundled" not in proc.stderr
    assert proc.stdout.strip(), "every block prints what it computed"
