"""The package's shape is checked, not hoped for: import contracts in setup.cfg hold.

- no import cycles between sibling modules or packages, at any depth (a cycle hidden inside a
  function is still a cycle: the static graph sees function-level imports);
- the report reads results only: it never imports the model, extraction or the stages.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(config, cwd, extra_path=None):
    """Run import-linter in its own process (it replaces the output streams it writes to)."""
    pytest.importorskip("importlinter", reason="import-linter is in the test extra")
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    env_path = [str(extra_path)] if extra_path else []
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}; " + code],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_in_setup_cfg_hold():
    result = lint_imports(ROOT / "setup.cfg", ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_a_cycle_would_be_caught(tmp_path):
    """The contract can fail: a two-module cycle in a throwaway package breaks it."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyclepkg import b\n")
    (pkg / "b.py").write_text("from cyclepkg import a\n")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = cyclepkg\n\n[importlinter:contract:acyclic]\n"
                      "name = acyclic\ntype = acyclic_siblings\nancestors = cyclepkg\n")
    result = lint_imports(config, tmp_path, extra_path=tmp_path)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
