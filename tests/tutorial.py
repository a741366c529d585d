"""Reads the BTK tutorial's code cells so that tests can run them against btkjax.

Only the imports (``btk`` -> ``btkjax``), IPython magics and data paths change, which is what a
BTK user changes.
"""

import re
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[2] / "shared" / "seed" / "btk_tutorial.rst"


def code_cells(start_heading: str, end_heading: str | None) -> list[str]:
    """The code cells between two section headings of the tutorial, in order."""
    if not TUTORIAL.exists():
        pytest.skip(f"the seed tutorial is not at {TUTORIAL} (only its own cells' tests read it)")
    text = TUTORIAL.read_text()
    lines = text.splitlines()

    def heading_line(title):
        for i, line in enumerate(lines[:-1]):
            if line.strip() == title and set(lines[i + 1].strip()) <= set("=-'*~^") and lines[i + 1].strip():
                return i
        raise ValueError(f"heading {title!r} not found in the tutorial")

    start = heading_line(start_heading)
    end = heading_line(end_heading) if end_heading else len(lines)
    cells, i = [], start
    while i < end:
        if lines[i].strip().startswith(".. code::"):
            i += 1
            block = []
            while i < end and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            body = [b for b in block]
            indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
            cells.append("\n".join(b[indent:] for b in body).strip("\n"))
        else:
            i += 1
    return cells


def to_btkjax(cell: str, paths: dict[str, str] | None = None) -> str:
    """Rewrites a cell's imports for btkjax and replaces data paths."""
    out = []
    for line in cell.splitlines():
        if line.strip().startswith("%"):
            continue
        line = re.sub(r"^(\s*)import btk$", r"\1import btkjax as btk", line)
        line = re.sub(r"^(\s*)import btk\.(\w+)", r"\1import btkjax.\2", line)
        line = re.sub(r"^(\s*)from btk import", r"\1from btkjax import", line)
        line = re.sub(r"^(\s*)from btk\.(\w+) import", r"\1from btkjax.\2 import", line)
        out.append(line)
    code = "\n".join(out)
    for old, new in (paths or {}).items():
        code = code.replace(old, new)
    return code
