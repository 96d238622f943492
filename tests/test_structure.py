"""The package's modules import only modules below them in the data flow.

Layers, bottom to top: what every module may rely on; real data and view recipes; generators;
the ring and the disk cache; generation workers and their jobs; a trainer batch's pair lookup (and
the simulator, which runs it on a virtual clock);
view composition; methods; monitoring; the commands. A module may import modules of lower
layers, and of its own layer only where the list below orders them (left before right). A new
module must be placed here, which is the point: where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onlinemix"

LAYERS: list[list[str]] = [
    ["registry", "config", "schedule", "distributed", "files"],
    ["data.decode", "data.store", "data.sources", "data.prepare", "data", "augment", "stub_diffuser", "losses", "dino",
     "models", "optim", "view_params", "view_specs", "resample", "photometric", "compiled_ops", "buffers", "batch_augment", "tinymodel", "tinymodel.model"],
    ["generate", "versatile"],
    ["ring", "cache.store", "cache.maintenance", "cache.migrate", "cache.transfer", "cache", "devices"],
    ["worker"],
    ["producer", "warm"],
    ["pairs", "simulate"],
    ["views"],
    ["methods"],
    ["prefetch"],
    ["tracking", "metrics", "probe", "linear_eval", "rundir", "checkpoint"],
    ["cli"],
    ["train", "eval", "stats", "plan", "env", "__main__", "cache.__main__", "data.__main__", "tinymodel.train", "tinymodel.quality",
     "tinymodel.__main__"],
]
RANK = {name: (layer, position) for layer, names in enumerate(LAYERS) for position, name in enumerate(names)}


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
