"""The package's shape: floors, no import cycles, no private names across modules
(tools/import_graph.py), checked on btkjax itself and on a planted bad package."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_btkjax_import_graph_is_clean():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 problem(s)" in out.stderr


def test_checker_finds_cycles_floors_and_private_names(tmp_path):
    pkg = tmp_path / "btkjax"
    (pkg / "core").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "import astropy\nfrom btkjax import top\n",  # core -> interface, astropy
        "top.py": "def f():\n    from btkjax import other\n",  # function-level import
        "other.py": "from btkjax.top import f, _hidden\n",  # cycle top <-> other; private
        "uses.py": "from btkjax import top\nx = top._secret\n",  # private attribute
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    edges, problems = _tool().graph(pkg)
    assert edges["btkjax.top"] == {"btkjax.other"}
    text = "\n".join(problems)
    assert "btkjax.core.a (floor 1) imports btkjax.top (floor 3)" in text
    assert "btkjax.core.a (core) imports astropy" in text
    assert "import cycle: btkjax.other -> btkjax.top -> btkjax.other" in text
    assert "btkjax.other:1 imports btkjax.top._hidden" in text
    assert "btkjax.uses:2 uses btkjax.top._secret" in text
    assert len(problems) == 5


def test_every_module_imports():
    """Every module of the package imports (a name moved between floors is caught here, not
    only in the tests that happen to use it)."""
    import importlib
    import pkgutil

    import btkjax

    names = [m.name for m in pkgutil.walk_packages(btkjax.__path__, "btkjax.")]
    assert "btkjax.core.step" in names and "btkjax.deblend.model" in names
    for name in names:
        importlib.import_module(name)
