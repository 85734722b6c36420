"""Every ```python block of README.md and docs/*.md runs as written (copied into a fresh interpreter)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(doc, i, code) for doc in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S))]


def test_the_docs_have_python_snippets():
    assert any(doc.name == "README.md" for doc, _, _ in BLOCKS)


@pytest.mark.parametrize("doc,index,code", BLOCKS, ids=[f"{d.name}#{i}" for d, i, _ in BLOCKS])
def test_snippet_runs(doc, index, code, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{doc.name} snippet {index} failed:\n{done.stderr[-3000:]}"
