"""The package's layers: each stage imports only the stages below it, so there is no import cycle to dodge.

Read from the source (every ``import``, at module level or inside a function): a module may import its own
package and the layers below its own, never a layer above. The order is the pipeline's:
base -> data -> run folder -> fingerprint -> networks -> planning -> preprocessing -> evaluation -> training ->
inference -> analysis -> search -> pipeline (and the job entry point) -> example -> commands -> cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import autoseg

ROOT = Path(autoseg.__file__).parent

LAYERS: list[set[str]] = [
    {"errors", "files", "serialization", "processes", "devices"},
    {"data"},
    {"runfolder"},
    {"fingerprint", "fingerprint_import"},
    {"networks"},
    {"planning"},
    {"preprocessing"},
    {"evaluation"},
    {"training"},
    {"inference"},
    {"analysis"},
    {"search", "export"},
    {"pipeline", "job"},
    {"example"},
    {"commands"},
    {"cli"},
]


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``autoseg`` import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name == "autoseg" or name.startswith("autoseg.")]


def test_every_module_is_in_a_layer():
    parts = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.glob("*") if p.name != "__init__.py"}
    parts -= {"__pycache__", "py.typed"}
    missing = sorted(p for p in parts if not any(p in names for names in LAYERS))
    assert not missing, f"add {missing} to LAYERS"


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).parts
        if relative == ("__init__.py",):
            continue
        own = _layer(relative[0].removesuffix(".py"))
        for line, name in _imports(path):
            target = name.split(".")[1] if "." in name else None
            if target is not None and _layer(target) > own:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)
