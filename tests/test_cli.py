"""The hipt command: help, version and lazy imports of stages."""

from __future__ import annotations

import subprocess
import sys

from hipt.cli import COMMANDS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipt.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_is_a_clear_error():
    out = run_cli("tiel")
    assert out.returncode == 2 and "unknown command 'tiel'" in out.stderr


def test_core_imports_no_stage():
    # Only the CLI may import stages, and only when their command runs.
    code = (
        "import sys, hipt, hipt.cli, hipt.h5schema, hipt.geometry, hipt.models;"
        "hipt.models.list_models();"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('preprocessing','train','heatmaps')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_command_module_has_the_interface():
    import importlib

    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main), name


def test_layering_rules_hold_in_the_source():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stages = {"preprocessing", "train", "heatmaps"}
    offences = []
    for package in ["hipt", *sorted(stages)]:
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in stages and top != package:
                        offences.append(f"{path.relative_to(root)} imports {name}")
    assert offences == []
