"""The code's shape, read from the AST: no import cycle in carbrand/, no function over 80 lines,
and no string-keyed state dict threaded through the training loop."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO

PACKAGE = REPO / "carbrand"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the carbrand modules it imports, at the top or inside functions alike."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: resolve against this module's package
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name] |= {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def carbrand_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_find_cycle_sees_a_cycle_through_a_function_level_import():
    graph = import_graph({"a": _write("import b\n"), "b": _write("def f():\n    from c import x\n"), "c": _write("import a\n")})
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _write(text: str, counter=[0]) -> Path:  # noqa: B006 - a unique file name per call, in one temp folder
    import tempfile

    counter[0] += 1
    path = Path(tempfile.gettempdir()) / f"carbrand_structure_{counter[0]}.py"
    path.write_text(text)
    return path


def test_carbrand_has_no_import_cycle():
    files = carbrand_files()
    assert len(files) > 30, "the package was not found"
    cycle = find_cycle(import_graph(files))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_in_carbrand_is_longer_than_80_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "functions over 80 lines: " + ", ".join(too_long)


def test_the_training_loop_carries_typed_state_not_a_string_keyed_dict():
    """No train.py function takes a plain dict (or a parameter named `state`/`window`): what travels
    through the loop is the `Run` dataclass and typed helpers, so a typo fails where it is written."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for argument in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(argument.annotation) if argument.annotation else ""
                if argument.arg in ("state", "window") and annotation != "ThroughputWindow" or annotation.startswith("dict"):
                    offenders.append(f"{node.name}({argument.arg}: {annotation or '?'})")
    assert not offenders, "string-keyed state travels through the loop: " + ", ".join(offenders)
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert {"Run", "Progress"} <= classes
