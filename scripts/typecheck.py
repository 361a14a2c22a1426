"""Run mypy on the import package as it installs.

The code folders (core/, transports/, ...) become ``alkpubsub.*`` through
``[tool.setuptools.package-dir]``. Editable installs map them with an import
hook that mypy cannot follow, so this builds a tree of symlinks shaped like
the installed package under build/typecheck/ and checks that.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def build_tree() -> Path:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in mapping.items():
        target = TREE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / folder).glob("*.py*"):  # .py and .pyi; py.typed too
            (target / source.name).symlink_to(source)
    return TREE


if __name__ == "__main__":
    tree = build_tree()
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    sys.exit(subprocess.call([*args, str(tree / "alkpubsub"), *sys.argv[1:]], cwd=tree))
