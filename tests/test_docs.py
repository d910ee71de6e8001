"""The project's own documentation: docs/conformance.md and docs/architecture.md.

Nothing in the repository may point at design notes kept outside it: every wire rule
is described in docs/conformance.md (rows C1..C16, S1..S15), the structure in
docs/architecture.md. And every test that docs/conformance.md names must exist, so the
document cannot silently cite a test that was renamed or removed.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DOC = ROOT / "docs" / "conformance.md"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Spelled in pieces so that this file does not mention what it forbids.
OUTSIDE_NOTES = re.compile(rb"\b(?:DESIGN|CONFORM" + rb"ANCE)\.md\b|\bCONFORM" + rb"ANCE\b")
ROWS = [f"C{n}" for n in range(1, 17)] + [f"S{n}" for n in range(1, 16)]
CITED_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")
CITED_MODULE = re.compile(r"`(clientid_mta/[\w/]+\.py)`")
# What is never part of the repository proper, when git cannot say.
NOT_IN_REPOSITORY = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def repository_files() -> list[Path]:
    """The files git tracks, and new ones it does not ignore; a walk without git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            path
            for path in ROOT.rglob("*")
            if path.is_file()
            and not NOT_IN_REPOSITORY.intersection(path.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in path.parts)
        ]
    names = [name for name in listed.decode().split("\0") if name]
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_no_file_points_at_design_notes_outside_the_repository() -> None:
    files = repository_files()
    assert len(files) > 50, "the file listing found too little to be the repository"
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                text = line.decode(errors="replace")
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {text}")
    assert offenders == [], "point at docs/conformance.md or docs/architecture.md:\n" + "\n".join(
        offenders
    )


def test_the_forbidden_pattern_matches_what_it_must() -> None:
    """A pattern that matched nothing would make the test above pass on anything."""
    for text in ("see DESIGN" + ".md", "CONFORM" + "ANCE.md rows", "(CONFORM" + "ANCE S11)"):
        assert OUTSIDE_NOTES.search(text.encode()), text
    for text in ("docs/conformance.md, S11", "docs/architecture.md", "conformance suite"):
        assert not OUTSIDE_NOTES.search(text.encode()), text


def test_conformance_md_has_every_row_once() -> None:
    headings = re.findall(r"^### ([CS]\d+)\. ", CONFORMANCE_DOC.read_text(), re.MULTILINE)
    assert headings == ROWS


def _test_names(path: Path) -> set[str]:
    """Test functions at module level and in test classes, as pytest collects them."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = {node.name for node in tree.body if isinstance(node, functions)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f.name for f in node.body if isinstance(f, functions)}
    return {name for name in names if name.startswith("test")}


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_every_test_cited_by_conformance_md_exists() -> None:
    cited = CITED_TEST.findall(CONFORMANCE_DOC.read_text())
    assert len(cited) > 100, "docs/conformance.md cites fewer tests than it should"
    missing = _missing_tests(cited)
    assert missing == [], "docs/conformance.md cites tests that do not exist:\n" + "\n".join(
        missing
    )


def test_every_test_in_the_readme_interop_matrix_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    matrix = readme[readme.index("### Interop matrix") :]
    cited = CITED_TEST.findall(matrix[: matrix.index("\n## ")])
    assert len(cited) >= 20, "the README's interop matrix names fewer tests than it should"
    missing = _missing_tests(cited)
    assert missing == [], "the README's interop matrix names missing tests:\n" + "\n".join(missing)


def _missing_tests(cited: list[tuple[str, str, str]]) -> list[str]:
    """The citations (file, test, parameter id) whose test is not in its file."""
    missing = []
    for file, name, parameters in cited:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        if name not in _test_names(path):
            missing.append(f"{file}::{name}")
            continue
        # A parameter id names one case of the test: each part must be written in the file.
        if parameters and not set(parameters.split("-")) <= _string_constants(path):
            missing.append(f"{file}::{name}[{parameters}]")
    return missing


@pytest.mark.parametrize("document", [CONFORMANCE_DOC, ARCHITECTURE_DOC], ids=lambda p: p.name)
def test_every_module_the_docs_name_exists(document: Path) -> None:
    cited = set(CITED_MODULE.findall(document.read_text()))
    missing = sorted(module for module in cited if not (ROOT / module).is_file())
    assert missing == [], f"{document.name} names modules that do not exist: {missing}"
