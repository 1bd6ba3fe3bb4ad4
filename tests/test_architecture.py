"""The package's shape is checked, not hoped for: import contracts in setup.cfg hold.

- no import cycles between sibling modules or packages, at any depth (a cycle hidden inside a
  function is still a cycle: the static graph sees function-level imports);
- the report reads results only: it never imports the model, extraction or the stages.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_in_setup_cfg_hold(capsys):
    lint = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra")
    code = lint.lint_imports(config_filename=str(ROOT / "setup.cfg"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_a_cycle_would_be_caught(tmp_path, monkeypatch, capsys):
    """The contract can fail: a two-module cycle in a throwaway package breaks it."""
    lint = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra")
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyclepkg import b\n")
    (pkg / "b.py").write_text("from cyclepkg import a\n")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = cyclepkg\n\n[importlinter:contract:acyclic]\n"
                      "name = acyclic\ntype = acyclic_siblings\nancestors = cyclepkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lint.lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
