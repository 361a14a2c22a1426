"""Every Python block in README.md runs as written (in a temporary directory)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block: str, tmp_path: Path) -> None:
    # README blocks use top-level await, as in an asyncio REPL: run each inside
    # a coroutine, in a fresh directory so relative database paths land there.
    program = "import asyncio\n\nasync def main():\n" + textwrap.indent(block, "    ")
    program += "\n\nasyncio.run(main())\n"
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
