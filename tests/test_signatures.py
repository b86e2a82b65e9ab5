"""No function of the `dama` package takes more than MAX_PARAMETERS parameters: options travel as groups.

Counted: every named parameter (positional, keyword-only), without `self` / `cls` of methods; `*args` and `**kwargs`
are not named parameters (transformers' attention interface hands its extras over as **kwargs).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dama"
MAX_PARAMETERS = 8
# Functional APIs whose signature mirrors a library's; each with its reason.
EXEMPT = {
    # flash-attn's flash_attn_varlen_func takes the same tensors and segment bounds (q, k, v, cu_seqlens_q/k,
    # max_seqlen_q/k, dropout, scale, causal); this is its drop-in counterpart.
    "model/attention.py::packed_attention",
}


def _named_parameters(function: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> list[str]:
    arguments = function.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)
    if in_class and not is_static and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def _functions(tree: ast.AST):
    """(qualified name, function node, defined directly in a class body) for every function of a module."""
    def walk(node, prefix, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child, in_class
                yield from walk(child, f"{prefix}{child.name}.", False)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.", True)
            else:
                yield from walk(child, prefix, in_class)

    yield from walk(tree, "", False)


def too_many_parameters(root: Path = PACKAGE) -> dict[str, int]:
    """'<file>::<function>' -> its count, for every function over MAX_PARAMETERS."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for name, function, in_class in _functions(ast.parse(path.read_text(), filename=str(path))):
            count = len(_named_parameters(function, in_class))
            if count > MAX_PARAMETERS:
                found[f"{path.relative_to(root).as_posix()}::{name}"] = count
    return found


def test_no_function_takes_more_than_eight_parameters():
    offenders = {name: count for name, count in too_many_parameters().items() if name not in EXEMPT}
    assert not offenders, f"pass an option group instead of these parameters: {offenders}"


def test_the_exemptions_are_still_needed():
    assert set(too_many_parameters()) >= EXEMPT, "an exemption no longer applies: remove it from EXEMPT"


@pytest.mark.parametrize("source, expected", [
    ("def f(a, b, c, d, e, f, g, h, i): pass", {"m.py::f": 9}),
    ("def f(a, b, c, d, e, f, g, h, *args, **kwargs): pass", {}),
    ("def f(a, b, c, d, *, e, f, g, h, i): pass", {"m.py::f": 9}),
    ("class C:\n    def m(self, a, b, c, d, e, f, g, h): pass", {}),
    ("class C:\n    def m(self, a, b, c, d, e, f, g, h, i): pass", {"m.py::C.m": 9}),
    ("class C:\n    @staticmethod\n    def m(a, b, c, d, e, f, g, h, i): pass", {"m.py::C.m": 9}),
    ("def outer():\n    def inner(a, b, c, d, e, f, g, h, i): pass", {"m.py::outer.inner": 9}),
])
def test_the_count(tmp_path, source, expected):
    (tmp_path / "m.py").write_text(source)
    assert too_many_parameters(tmp_path) == expected
