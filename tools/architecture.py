"""Measures of the code's seams, printed as Markdown (docs/ARCHITECTURE.md keeps a before/after table).

    python tools/architecture.py

- names each package imports from each other package (distinct ``from X import name`` / ``import X.y``);
- the largest functions (lines, decision points);
- the longest module docstrings;
- places that test the loss kind as a string literal;
- the number of config keys (leaves of ``OPSDConfig``).

Read from the source with ``ast``; nothing is imported except the config (for its keys).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opsd", "rollout", "teacher", "learner", "evaluation", "orchestrator")
LOSS_KIND_LITERALS = {"full", "topk_tail", "topk_renorm", "sampled_token"}


def modules() -> dict[str, list[Path]]:
    found = {}
    for package in PACKAGES:
        if (ROOT / package).is_dir():
            found[package] = sorted((ROOT / package).rglob("*.py"))
    return found


def cross_imports(found: dict[str, list[Path]]) -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> the distinct dotted names imported."""
    names: dict[tuple[str, str], set[str]] = defaultdict(set)
    for package, files in found.items():
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    top = node.module.split(".")[0]
                    if top in found and top != package:
                        names[(package, top)].update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        top = alias.name.split(".")[0]
                        if top in found and top != package:
                            names[(package, top)].add(alias.name)
    return names


def _decisions(node: ast.AST) -> int:
    count = 0
    for child in ast.walk(node):
        if isinstance(child, (ast.If, ast.For, ast.While, ast.IfExp, ast.ExceptHandler, ast.With, ast.AsyncFor,
                              ast.match_case)):
            count += 1
        elif isinstance(child, ast.BoolOp):
            count += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            count += 1 + len(child.ifs)
    return count


def functions(found: dict[str, list[Path]]) -> list[tuple[int, int, str]]:
    """(lines, decision points, where) of every function, largest first."""
    out = []
    for files in found.values():
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    out.append((lines, _decisions(node), f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(out, reverse=True)


def docstrings(found: dict[str, list[Path]]) -> list[tuple[int, str]]:
    out = []
    for files in found.values():
        for path in files:
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if doc:
                out.append((len(doc.splitlines()), str(path.relative_to(ROOT))))
    return sorted(out, reverse=True)


def loss_kind_tests(found: dict[str, list[Path]]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``) of something with a loss-kind string literal."""
    places = []
    for files in found.values():
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Compare):
                    continue
                literals = [c for c in [node.left, *node.comparators] for c in _strings(c)]
                if any(s in LOSS_KIND_LITERALS for s in literals):
                    places.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return places


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def config_keys() -> int:
    sys.path.insert(0, str(ROOT))
    from opsd.configlib import describe
    from orchestrator.config import OPSDConfig

    return len(describe(OPSDConfig))


def main() -> None:
    found = modules()
    imports = cross_imports(found)
    print("## Names imported across packages\n")
    print("| importer | from | distinct names |")
    print("|---|---|---:|")
    for (importer, imported), names in sorted(imports.items()):
        print(f"| {importer} | {imported} | {len(names)} |")
    stages = ("rollout", "teacher", "learner")
    from_stages = set().union(*(imports.get(("orchestrator", s), set()) for s in stages))
    print(f"\norchestrator -> stages: {len(from_stages)} distinct names")
    for name in sorted(from_stages):
        print(f"  {name}")
    print("\n## Largest functions\n")
    print("| function | lines | decision points |")
    print("|---|---:|---:|")
    for lines, decisions, where in functions(found)[:8]:
        print(f"| `{where}` | {lines} | {decisions} |")
    print("\n## Longest module docstrings (lines)\n")
    for lines, where in docstrings(found)[:6]:
        print(f"- `{where}`: {lines}")
    places = loss_kind_tests(found)
    files = {p.rsplit(":", 1)[0] for p in places}
    print(f"\n## Loss kind tested as a string: {len(places)} places in {len(files)} files\n")
    for place in places:
        print(f"- {place}")
    print(f"\n## Config keys: {config_keys()}")


if __name__ == "__main__":
    main()
