"""The layout DESIGN.md describes, checked on the source: folders import only lower folders (lazy
imports included), no cycle between folders, no module reads another's private attributes, and
the variants are asked, never tested for, outside ``graphlora/lora/``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "graphlora"

# Lower folders never import higher ones. Files inside one folder may know each other.
# ``testing`` sits above ``lora``: its Hypothesis strategies draw LoRA layers and configs.
RANKS = {
    "errors": 0,
    "_checks": 0,
    "blas": 0,  # the BLAS thread policy the ops' products follow
    "ops": 1,
    "engine": 2,
    "optim": 3,
    "lora": 4,
    "testing": 5,
    "nn": 6,
    "io": 7,
    "nf4": 7,  # gl.nf4: the format (lora) and quantizing a model (nn) in one namespace
    "teach": 8,
    "__init__": 9,  # the package's own re-exports
    "__main__": 10,  # the command line, over the whole package
}

# The private modules shared on purpose (DESIGN.md): the one home of the argument checks.
SHARED_PRIVATE = {"_checks"}


def _slots_of(relative: str) -> set[str]:
    """The ``__slots__`` names of the classes in ``graphlora/<relative>``."""
    tree = ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return names


# The allow-list, each entry with its reason. ``Graph`` owns its nodes: ``NodeId`` is the record
# the graph fills and reads on every op and in every backward walk (kept in engine/node.py so
# that graph.py stays readable); a property per field would cost the recording path its speed.
ALLOWED_PRIVATE = {"graphlora.engine.graph": _slots_of("engine/node.py")}


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("graphlora", *parts))
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _folder(module: str) -> str:
    """The top-level folder (or module) of ``graphlora.<folder>...``; ``__init__`` for the
    package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, tree: ast.Module, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every ``graphlora`` module imported anywhere in ``tree`` (functions and TYPE_CHECKING
    blocks included), with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "graphlora":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "graphlora":
                continue
            if target == "graphlora":  # ``from graphlora import ops``: the submodules named
                for alias in node.names:
                    yield node.lineno, f"graphlora.{alias.name}"
            else:
                yield node.lineno, target


def test_every_folder_has_a_rank() -> None:
    folders = {_folder(name) for name, _, _ in _modules()}
    assert folders == set(RANKS), f"folders without a rank: {sorted(folders - set(RANKS))}"


def test_no_folder_imports_a_higher_one() -> None:
    upward = []
    for name, path, tree in _modules():
        here = _folder(name)
        for line, target in _imports(name, tree, path.name == "__init__.py"):
            there = _folder(target)
            if there not in RANKS:  # ``from graphlora import __version__`` and the like
                continue
            if there != here and RANKS[there] > RANKS[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports of a higher folder:\n" + "\n".join(upward)


def test_no_cycle_between_folders() -> None:
    edges: dict[str, set[str]] = {}
    for name, path, tree in _modules():
        here = _folder(name)
        for _, target in _imports(name, tree, path.name == "__init__.py"):
            there = _folder(target)
            if there in RANKS and there != here:
                edges.setdefault(here, set()).add(there)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(folder for folder in edges if reaches(folder, folder, {folder}))
    assert not cycles, f"folders on an import cycle: {cycles}"


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: attributes it assigns on ``self``/``cls``, ``__slots__``
    entries, and its own functions, classes and globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "__slots__":
                    for element in ast.walk(node.value):
                        if isinstance(element, ast.Constant) and isinstance(element.value, str):
                            names.add(element.value)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_reads_another_modules_private_attributes() -> None:
    """``self._name`` is a class's own; ``x._name`` is fine where the module itself defines
    ``_name`` (a class's fields, read by its module's functions); ``_checks`` is shared on
    purpose. Everything else is a reach across a module
    boundary, which a refactoring breaks silently."""
    modules = list(_modules())
    owners: dict[str, set[str]] = {}  # private name -> the modules that define it
    for name, _, tree in modules:
        for private in _own_private_names(tree):
            owners.setdefault(private, set()).add(name)
    found = []
    for name, path, tree in modules:
        # a name this module defines, and no other module does: ``graph._epoch`` in a module
        # whose own class also has an ``_epoch`` still reads Graph's field
        own = {n for n in _own_private_names(tree) if owners[n] == {name}}
        own |= _slots_of(str(path.relative_to(PACKAGE)))  # fields its classes declare
        allowed = ALLOWED_PRIVATE.get(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue  # a class's own (or inherited) field
                if node.attr in own or node.attr in allowed or node.attr in SHARED_PRIVATE:
                    continue
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reads .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("graphlora"):
                for alias in node.names:
                    if _private(alias.name) and alias.name not in SHARED_PRIVATE:
                        found.append(
                            f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports "
                            f"{node.module}.{alias.name}"
                        )
    assert not found, "private reads across modules:\n" + "\n".join(found)


OUTSIDE_LORA = [path for path in sorted(PACKAGE.rglob("*.py")) if "lora" not in path.parts]


@pytest.mark.parametrize("path", OUTSIDE_LORA, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_lora_knows_the_variants(path: Path) -> None:
    """Outside ``graphlora/lora/`` nothing reads ``use_dora`` or names a variant class: layers,
    files, merges and the CLI ask the variant."""
    text = path.read_text(encoding="utf-8")
    for word in (".use_dora", "DoraUpdate", "LoraUpdate", "EmbeddingUpdate", "VeraUpdate"):
        assert word not in text, f"{path.relative_to(PACKAGE.parent)} names {word}"
