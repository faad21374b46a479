"""The architecture stays easy to read: no function in kdvae/ or examples/ over ~50 lines
of code (blank lines, comments and docstrings not counted)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 50
SOURCES = sorted([*REPO.glob("kdvae/*.py"), *REPO.glob("examples/*.py")])


def code_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not a docstring."""
    skipped = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
               tokenize.DEDENT, tokenize.ENDMARKER}  # fmt: skip
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node, clean=False) is not None:
                doc = node.body[0]
                lines -= set(range(doc.lineno, doc.end_lineno + 1))
    return lines


def function_sizes(path: Path) -> dict[str, int]:
    source = path.read_text()
    lines = code_lines(source)
    return {
        f"{path.relative_to(REPO)}:{node.name}": sum(
            node.lineno <= n <= node.end_lineno for n in lines
        )
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_the_counter_counts_code_only():
    source = '''
def f(x):
    """A docstring
    over two lines."""
    # a comment

    y = (x +
         1)
    return y
'''
    assert len(code_lines(source)) == 4  # def, y = (two lines), return


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_over_fifty_lines(path):
    too_long = {name: n for name, n in function_sizes(path).items() if n > MAX_LINES}
    assert not too_long, f"split these (lines of code): {too_long}"
