"""The docs name only paths that exist, and README.md stays a front page.

Scanned: README.md, docs/*.md, configs/*.yaml, every file in launch/ and slurm/ (whole text),
and the module docstrings of carbrand/**/*.py (read with `ast`: docstrings only, never
comments or code).

A repository path is a token that starts with a top-level folder (carbrand/ configs/ launch/
slurm/ docs/ tests/) and is not preceded by a word character, '/', '.' or '-' (so
`$repo/launch/torchrun.sh`, `../shared/data` and `my-tests/x` are not). It runs until
whitespace or one of `'"()[],;:|=#; a trailing '.' (end of a sentence) is dropped. Tokens
holding a glob or placeholder (* < > { } $, or ...) are skipped. A module may be named
without its .py. Relative Markdown links ([text](target)) must resolve from the linking file.
"""

from __future__ import annotations

import ast
import re

from tests.helpers.paths import REPO

TOP_FOLDERS = ("carbrand", "configs", "launch", "slurm", "docs", "tests")
PATH_TOKEN = re.compile(r"(?<![\w/.\-])(?:" + "|".join(TOP_FOLDERS) + r")/[^\s`'\"()\[\],;:|=#]*")
PLACEHOLDER = re.compile(r"[*<>{}$]|\.\.\.")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 160
README_COMMANDS = ('pip install -e ".[dali,wandb]" && carbrand demo', "bash tests/run.sh")


def path_tokens(text: str) -> list[tuple[int, str]]:
    """(offset, path) of every repository path named in `text`, placeholders and globs left out."""
    found = []
    for match in PATH_TOKEN.finditer(text):
        token = match.group().rstrip(".") if not match.group().endswith("...") else match.group()
        if not PLACEHOLDER.search(token):
            found.append((match.start(), token))
    return found


def exists(path: str) -> bool:
    target = REPO / path
    if path.endswith("/"):
        return target.is_dir()
    return target.exists() or target.with_name(target.name + ".py").is_file()


def scanned_texts() -> list[tuple[str, int, str]]:
    """(file, first line number, text): whole docs and scripts, and carbrand's module docstrings."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").glob("*.yaml"))]
    files += [path for folder in ("launch", "slurm") for path in sorted((REPO / folder).iterdir()) if path.is_file()]
    texts = [(path.relative_to(REPO).as_posix(), 1, path.read_text(encoding="utf-8")) for path in files]
    for module in sorted((REPO / "carbrand").rglob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        docstring = ast.get_docstring(tree, clean=False)
        if docstring is not None:
            texts.append((module.relative_to(REPO).as_posix(), tree.body[0].lineno, docstring))
    return texts


def missing_paths() -> list[str]:
    missing = []
    for name, first_line, text in scanned_texts():
        for offset, path in path_tokens(text):
            if not exists(path):
                missing.append(f"{name}:{first_line + text.count(chr(10), 0, offset)}: {path}")
        if name.endswith(".md"):
            for match in MARKDOWN_LINK.finditer(text):
                target = match.group(1).split("#", 1)[0]
                if target and "://" not in target and not target.startswith("mailto:"):
                    if not ((REPO / name).parent / target).exists():
                        line = first_line + text.count("\n", 0, match.start())
                        missing.append(f"{name}:{line}: link {match.group(1)}")
    return missing


def test_path_tokens_follow_the_definition():
    text = ("See `configs/cars5_cpu.yaml`, carbrand/prepare/ and carbrand/train: the $repo/launch/torchrun.sh, "
            "../shared/data/x, my-tests/x, a.docs/x, configs/<recipe>.yaml, slurm/*.sbatch, carbrand/...; "
            "then read docs/CLUSTER.md. (tests/faults/) [x](docs/FAILURES.md#exit-codes)")
    assert [path for _, path in path_tokens(text)] == [
        "configs/cars5_cpu.yaml", "carbrand/prepare/", "carbrand/train", "docs/CLUSTER.md", "tests/faults/",
        "docs/FAILURES.md"]


def test_docs_name_only_paths_that_exist():
    texts = scanned_texts()
    assert len(texts) > 10 and any(name.startswith("carbrand/") for name, _, _ in texts)
    missing = missing_paths()
    assert not missing, f"{len(missing)} path(s) named in the docs do not exist:\n" + "\n".join(missing)


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = readme.count("\n") + (not readme.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (long guides go to docs/)"
    for command in README_COMMANDS:
        assert command in readme, f"README.md lost the newcomer's command: {command}"
