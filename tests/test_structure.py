"""The package's folders are its stages, and each imports only from the stages below it.

Stages, bottom to top: ``core`` (what every module may rely on), ``data`` (real images), ``cache`` (the
persistent store of generated pairs), ``exchange`` (the shared-memory ring, the trainers' aim scores and a
trainer batch's pair lookup), ``generation`` (generators, workers, producers), ``views`` (recipes and their
backends), ``methods`` (the SSL methods, their losses and backbones), ``training`` (the loop's parts), ``evaluation``, ``tools`` (simulator,
planner, stats), ``tinymodel`` (the bundled generator). A module may import any module of a lower stage, and a
module of its own stage only where the list below orders it first. The commands (the package's top-level
modules and every ``__main__``) may import any stage. A new module must be placed here, which is the point:
where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onlinemix"

STAGES: list[tuple[str, list[str]]] = [
    ("core", ["", "errors", "registry", "config", "files", "distributed", "schedule", "devices", "cli"]),
    ("data", ["decode", "store", "sources", "prepare", ""]),
    ("cache", ["store", "maintenance", "migrate", "transfer", ""]),
    ("exchange", ["", "ring", "aim", "lookup"]),
    ("generation", ["", "stub", "speedups", "generator", "versatile", "worker", "producer", "warm"]),
    ("views", ["", "recipes", "params", "specs", "resample", "photometric", "compiled", "buffers", "torch_backend",
               "backends", "compose"]),
    ("methods", ["", "backbones", "losses", "base", "simclr", "barlow_twins", "dino", "supervised", "optim",
                 "build"]),
    ("training", ["", "tracking", "rundir", "checkpoint", "start", "metrics", "prefetch", "node"]),
    ("evaluation", ["", "probe", "linear", "evaluate"]),
    ("tools", ["", "simulate", "plan", "stats", "env"]),
    ("tinymodel", ["", "model", "train", "distill", "quality"]),
]
COMMANDS = ["train", "eval", "plan", "stats", "__main__", "data.__main__", "cache.__main__", "tinymodel.__main__"]
LAYERS: list[list[str]] = [[f"{stage}.{m}".rstrip(".") for m in modules] for stage, modules in STAGES] + [COMMANDS]

RANK = {name: (layer, position) for layer, names in enumerate(LAYERS) for position, name in enumerate(names)}
# Commands do not import each other: each is its own entry point.
RANK.update({name: (len(LAYERS) - 1, 0) for name in COMMANDS})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Package modules imported by ``path``, leaving out imports for type checkers only."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                 for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            target = target.removeprefix("onlinemix").lstrip(".")
            if node.level or (node.module or "").split(".")[0] == "onlinemix":
                for alias in node.names:
                    candidate = f"{target}.{alias.name}".lstrip(".")
                    found.add(candidate if candidate in RANK else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("onlinemix.") for a in node.names if a.name.startswith("onlinemix.")}
    return {m for m in found if m and m != name}


def test_every_module_has_a_place_in_the_layers() -> None:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {""}
    assert sorted(modules - set(RANK)) == [], "place new modules in LAYERS"
    assert sorted(set(RANK) - modules) == [], "LAYERS names modules that no longer exist"


def test_no_module_imports_a_module_above_it() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if not name:
            continue
        for imported in runtime_imports(path):
            if imported not in RANK:
                upward.append(f"{name} imports unknown module {imported}")
            elif RANK[imported] >= RANK[name]:
                upward.append(f"{name} (layer {RANK[name][0]}) imports {imported} (layer {RANK[imported][0]})")
    assert upward == []


def test_each_stage_says_what_it_builds_on() -> None:
    """A stage's ``__init__`` docstring ends with ``Builds on: ...``, the stages its modules import (commands
    aside): the map a newcomer reads stays true."""
    wrong = []
    for stage, _ in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        said = [line for line in doc.splitlines() if line.startswith("Builds on:")]
        written = said[-1].removeprefix("Builds on:").strip().rstrip(".") if said else "(missing)"
        used = {imported.split(".")[0] for path in (PACKAGE / stage).rglob("*.py") if path.name != "__main__.py"
                for imported in runtime_imports(path)} - {stage}
        expected = ", ".join(s for s, _ in STAGES if s in used) or "nothing else in the package"
        if written.split(" (")[0] != expected and not written.startswith(expected + " ("):
            wrong.append(f"{stage}: docstring says {written!r}, imports {expected!r}")
    assert wrong == []
