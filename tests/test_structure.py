"""The code's shape, read from the AST: no import cycle in carbrand/, no import from a higher layer
(the layers of docs/ARCHITECTURE.md), no edit of the import path, at most 15 modules at carbrand/'s
top level, every module in ARCHITECTURE.md's layout, no function over 80 lines, and no string-keyed
state dict threaded through the training loop."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import REPO

PACKAGE = REPO / "carbrand"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 15


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


def layers(architecture: str) -> dict[str, int]:
    """ARCHITECTURE.md's layer table: `carbrand.<module or folder>` -> its layer number."""
    table = {}
    for number, holds in re.findall(r"^\| (\d+) \| (.*?) \|", architecture, flags=re.M):
        for name in re.findall(r"`([\w.]+)/?`", holds):
            table[f"carbrand.{name}"] = int(number)
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of a module: its own row, or its folder's (carbrand.training.mixing -> carbrand.training)."""
    parts = module.split(".")
    for depth in range(len(parts), 1, -1):
        if ".".join(parts[:depth]) in table:
            return table[".".join(parts[:depth])]
    return None


def upward_imports(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    return sorted(f"{source} (layer {layer_of(source, table)}) imports {target} (layer {layer_of(target, table)})"
                  for source, targets in graph.items() if source != "carbrand" for target in targets
                  if target != "carbrand" and layer_of(target, table) > layer_of(source, table))


def test_upward_imports_are_found_inside_functions_too():
    table = layers("| 1 | `training/` | x |\n| 0 | `config` | y |\n")
    graph = import_graph({"carbrand.config": _write("def f():\n    from carbrand.training import mixing\n"),
                          "carbrand.training": _write(""), "carbrand.training.mixing": _write("import carbrand.config\n")})
    assert upward_imports(graph, table) == ["carbrand.config (layer 0) imports carbrand.training (layer 1)",
                                            "carbrand.config (layer 0) imports carbrand.training.mixing (layer 1)"]


def test_no_module_imports_from_a_higher_layer():
    table = layers(ARCHITECTURE.read_text())
    files = carbrand_files()
    unplaced = sorted(name for name in files if name != "carbrand" and layer_of(name, table) is None)
    assert not unplaced, "modules in no layer of docs/ARCHITECTURE.md: " + ", ".join(unplaced)
    upward = upward_imports(import_graph(files), table)
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


def test_nothing_in_carbrand_edits_the_import_path():
    """A file run as a script re-runs itself as its module (command_line.rerun_as_module) instead."""
    edits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            sys_path = isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys"
            from_sys = isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names)
            if sys_path or from_sys:
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, "sys.path used in carbrand/: " + ", ".join(edits)


def test_carbrand_top_level_holds_at_most_15_modules():
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, f"{len(modules)} modules at carbrand/'s top level: {', '.join(modules)}"


def test_architecture_lists_every_module_and_names_no_missing_path():
    text = ARCHITECTURE.read_text()
    listed = set(re.findall(r"^(carbrand/\S+)", text, flags=re.M))
    present = {str(path.relative_to(REPO)) for path in PACKAGE.rglob("*") if path.suffix in (".py", ".html")
               and path.name != "__init__.py" and "__pycache__" not in path.parts}
    present |= {str(path.relative_to(REPO)) + "/" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert not present - listed, "not in docs/ARCHITECTURE.md's layout: " + ", ".join(sorted(present - listed))
    assert not listed - present, "in docs/ARCHITECTURE.md's layout but not in carbrand/: " + ", ".join(sorted(listed - present))


def test_reading_a_config_imports_neither_torch_nor_the_loaders():
    code = ("import sys, carbrand.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'PIL') or m.startswith('carbrand.data')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert loaded.strip() == "[]", loaded
