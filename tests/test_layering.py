"""The package's imports run down the floors ARCHITECTURE.md lists, and never in a circle.

Every module of marco_lightning, and run.py, is read with `ast` (nothing is imported): module-level and
function-level imports alike (`if TYPE_CHECKING:` ones too), `import x.y`, `from x import y`, `from . import y`,
`from .x import y`. A module may import from its own floor or a floor below; an import that climbs fails, and so
does any cycle, within a floor too. Imports by name at run time (Hydra's `_target_`, get_class) are not imports.
"""
import ast
import itertools
import re
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = "marco_lightning"

# Bottom to top: ARCHITECTURE.md lists the same floors, top first. `tasks.*` is every module under tasks/.
# A package's __init__ sits on the lowest floor of the modules inside it.
FLOORS = [
    ["errors"],  # UserError and its kinds: what every floor may raise
    ["data.formats", "data.parquet", "data.score_pickle", "data.msmarco", "data.beir", "data.trec",
     "data.download"],  # the readers (each built on formats), and the download of the files they read
    ["data.texts", "data.sources", "data.store", "data.negatives", "data.sampling"],  # readers dispatched; the store
    ["evaluation", "significance", "inference", "models", "losses", "grad_cache", "retrieval", "mining", "refresh"],
    ["module", "data.datamodule", "checkpointing"],  # Lightning
    ["config", "loggers", "model_card"],  # what a task sets a run up with
    ["tasks.*"],
    ["run"],
]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports(files: dict[str, Path], package: str) -> dict[str, dict[str, int]]:
    """module -> {package module it imports: line of the first such import}, wherever the import statement sits."""
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # what `from . import` means
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name that is no module: its package
                    target = target.rpartition(".")[0]
                if target and target != name and (target == package or target.startswith(package + ".")):
                    found.setdefault(target, node.lineno)
        graph[name] = found
    return graph


def floor_of(files, floors, package: str) -> tuple[dict[str, int], list[str]]:
    """module -> its floor (0 = bottom), and the modules on no floor."""
    def pattern(entry):
        full = entry if entry == "run" else f"{package}.{entry}"
        return re.compile(re.escape(full[:-2]) + r"\.[\w.]+$" if full.endswith(".*") else re.escape(full) + "$")

    rules = [(pattern(entry), i) for i, entries in enumerate(floors) for entry in entries]
    floor = {}
    for name in files:
        hits = [i for rx, i in rules if rx.match(name)]
        if hits:
            floor[name] = hits[0]
    for name, path in files.items():  # a package: the lowest floor of what it holds
        if path.name == "__init__.py":
            inside = [f for m, f in floor.items() if m.startswith(name + ".")]
            if inside:
                floor[name] = min(inside)
    homeless = [name for name in files if name not in floor]
    return floor, homeless


def cycles(graph: dict[str, dict]) -> list[tuple[list[str], set[str]]]:
    """Each group of modules that import one another round (Tarjan), with one cycle (a -> ... -> a) through it."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # walk inside the group from its first module until a module repeats
        path = [min(group)]
        while path.count(path[-1]) < 2:
            path.append(min(w for w in graph[path[-1]] if w in group))
        found.append((path[path.index(path[-1]):], group))
    return found


def violations(root: Path, package: str, floors, extra: dict[str, Path] | None = None) -> list[str]:
    """What breaks the floors: modules on no floor, imports that climb, cycles; one line each, naming file:line."""
    files = {**module_files(root, package), **(extra or {})}
    graph = imports(files, package)
    floor, homeless = floor_of(files, floors, package)
    problems = [f"{files[name].relative_to(root)} is on no floor: add it to FLOORS in "
                "tests/test_layering.py and to ARCHITECTURE.md's floors" for name in homeless]

    def short(module: str) -> str:
        return module.removeprefix(package + ".")

    for name, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            if name in floor and target in floor and floor[target] > floor[name]:
                problems.append(f"{files[name].relative_to(root)}:{line}: {short(name)} (floor {floor[name]}) imports "
                                f"{short(target)} (floor {floor[target]}), a floor above it")
    for cycle, group in cycles(graph):
        where = ", ".join(f"{files[a].relative_to(root)}:{graph[a][b]}" for a, b in itertools.pairwise(cycle))
        rest = f"; the circle also takes in {', '.join(sorted(map(short, group - set(cycle))))}" * (
            len(group) > len(cycle) - 1)
        problems.append(f"import cycle: {' -> '.join(map(short, cycle))} (at {where}){rest}")
    return problems


def test_imports_run_down_the_floors_and_never_in_a_circle():
    problems = violations(ROOT, PACKAGE, FLOORS, {"run": ROOT / "run.py"})
    assert not problems, "\n".join(problems)


def test_the_package_imports_itself_at_module_top():
    """An import of the package inside a function hides the layering; the few that must wait (they would pull a heavy
    library into a path that must stay fast) say why in a comment on the line or just above it."""
    hidden = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                    above = lines[max(0, node.lineno - 3):node.lineno]
                    if not any("#" in line for line in above):
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hidden, f"move these imports to the module's top, or say why they wait: {hidden}"


def test_every_floor_entry_names_a_module():
    files = module_files(ROOT, PACKAGE)
    for entry in (e for entries in FLOORS for e in entries if e != "run"):
        full = f"{PACKAGE}.{entry}"
        assert (any(m.startswith(full[:-1]) for m in files) if entry.endswith(".*") else full in files), entry


def test_architecture_md_lists_the_same_floors():
    """Its floor table (the first code block: `floor  files  what they are`) puts exactly FLOORS' files on each
    floor; a row without a number continues the floor above it."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = re.search(r"```\n(.*?)```", text, re.DOTALL)[1].splitlines()
    files_end = rows[0].index("what they are")  # the description column: file names there are not listed
    listed, floor = {}, None
    for row in rows[1:]:
        left = row[:files_end]
        if m := re.match(r"\s*(\d+)\s", left):
            floor = int(m[1])
        listed.setdefault(floor, set()).update(re.findall(r"[\w/]+\.py|[\w/]+/", left))
    expected = {i: {"tasks/" if e == "tasks.*" else e.replace(".", "/") + ".py" for e in entries}
                for i, entries in enumerate(FLOORS)}
    assert listed == expected


# ------------------------------------------------------------------------ the walk finds what it must find


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walk_finds_function_level_cycles_relative_imports_and_climbs(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "import os\n\ndef f():\n    from pkg.sub import high  # a function-level climb\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/high.py": "from . import mid\n",
        "pkg/sub/mid.py": "def g():\n    import pkg.sub.high\n",  # a function-level cycle with high
        "pkg/sub/other.py": "from ..low import f\n",  # down a floor: fine
        "pkg/stray.py": "",
    })
    problems = violations(tmp_path, "pkg", [["low"], ["sub.*"]])
    assert problems == [
        "pkg/stray.py is on no floor: add it to FLOORS in tests/test_layering.py and to ARCHITECTURE.md's floors",
        "pkg/low.py:4: low (floor 0) imports sub.high (floor 1), a floor above it",
        "import cycle: sub.high -> sub.mid -> sub.high (at pkg/sub/high.py:1, pkg/sub/mid.py:2)",
    ]
    graph = imports(module_files(tmp_path, "pkg"), "pkg")
    assert graph["pkg.sub.other"] == {"pkg.low": 1} and graph["pkg.sub.high"] == {"pkg.sub.mid": 1}


@pytest.mark.parametrize("source, target", [
    ("from marco_lightning.data import trec", "marco_lightning.data.trec"),
    ("import marco_lightning.data.trec as t", "marco_lightning.data.trec"),
    ("from marco_lightning.data.trec import read_run", "marco_lightning.data.trec"),
    ("from .trec import read_run", "marco_lightning.data.trec"),
    ("from . import trec", "marco_lightning.data.trec"),
    ("from .. import errors", "marco_lightning.errors"),
])
def test_every_import_form_is_an_edge(tmp_path, source, target):
    write_package(tmp_path, {"marco_lightning/__init__.py": "", "marco_lightning/errors.py": "",
                             "marco_lightning/data/__init__.py": "", "marco_lightning/data/trec.py": "",
                             "marco_lightning/data/x.py": f"def f():\n    {source}\n"})
    assert set(imports(module_files(tmp_path, "marco_lightning"), "marco_lightning")["marco_lightning.data.x"]) == {
        target}
