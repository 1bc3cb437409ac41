"""The one-way house (README "Layout"): what may import what, and each contract defined once.

Read from the source with `ast`, imports inside functions included, so a late import
cannot sneak a higher floor in. A failure names the module, the line and the rule.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import kiln_runtime.contract as contract

ROOT = Path(__file__).resolve().parents[2]
# floor of each top-level package: a module imports its own package and lower floors only;
# packages on the same floor (the stages) talk through the ground floor, never to each other
FLOORS = {"kiln_runtime": 0, "kiln_core": 1, "export": 2, "model_repository": 2, "loadtest": 2, "kiln": 3}
PYTHON_MODELS = "model_repository/python_models"  # Triton model.py glue: copied into repositories beside kiln_runtime
# what the served runtime may import besides the standard library: what the container image installs
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "jinja2"}
PYTHON_MODEL_THIRD_PARTY = RUNTIME_THIRD_PARTY | {"triton_python_backend_utils"}


@dataclass(frozen=True)
class Import:
    module: str  # the file, as a path relative to the repository
    line: int
    target: str  # the imported module's full dotted name

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def package_files() -> list[Path]:
    return sorted(p for pkg in FLOORS for p in (ROOT / pkg).rglob("*.py"))


def _package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def imports_of(path: Path) -> list[Import]:
    rel = path.relative_to(ROOT).as_posix()
    parts = rel[:-3].split("/")
    package = parts[:-1]  # a module's package (an __init__.py is its own package)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append(Import(rel, node.lineno, target))
    return out


def _is_stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top == "__future__"


def floor_violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        own = _package_of(path)
        python_model = path.relative_to(ROOT).as_posix().startswith(PYTHON_MODELS + "/")
        for imp in imports_of(path):
            if python_model:
                if imp.top in FLOORS and imp.top != "kiln_runtime":
                    bad.append(f"{imp}: a python model imports only kiln_runtime (it is copied into repositories)")
                elif imp.top not in FLOORS and not _is_stdlib(imp.top) and imp.top not in PYTHON_MODEL_THIRD_PARTY:
                    bad.append(f"{imp}: not installed in Triton's container (allowed: {sorted(PYTHON_MODEL_THIRD_PARTY)})")
                continue
            if own == "kiln_runtime" and imp.top not in FLOORS and not _is_stdlib(imp.top) and imp.top not in RUNTIME_THIRD_PARTY:
                bad.append(f"{imp}: kiln_runtime imports only the standard library and {sorted(RUNTIME_THIRD_PARTY)}")
            if imp.top not in FLOORS or imp.top == own:
                continue
            if FLOORS[imp.top] > FLOORS[own]:
                bad.append(f"{imp}: {own} (floor {FLOORS[own]}) imports a higher floor ({imp.top}, floor {FLOORS[imp.top]})")
            elif FLOORS[imp.top] == FLOORS[own]:
                bad.append(f"{imp}: stages talk through the ground floor only ({own} -> {imp.top})")
    return bad


def test_every_module_imports_only_its_own_package_and_lower_floors():
    assert floor_violations(package_files()) == []


def test_the_tensor_name_contract_is_standard_library_only():
    path = ROOT / "kiln_runtime" / "contract.py"
    assert [str(i) for i in imports_of(path) if not _is_stdlib(i.top)] == []


def test_the_rule_catches_a_higher_floor_a_sibling_stage_and_a_late_import(tmp_path, monkeypatch):
    """The checker itself: a test that could not fail would prove nothing."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for pkg, source in {
        "kiln_core": "def f():\n    from export.pipeline import run_export\n",  # late import of a stage
        "export": "from model_repository import writer\n",  # a sibling stage
        "kiln_runtime": "import pydantic\nfrom kiln_core import spec\n",  # a dependency + a higher floor
    }.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(source)
    (tmp_path / PYTHON_MODELS).mkdir(parents=True)
    (tmp_path / PYTHON_MODELS / "model.py").write_text("from kiln_core.spec import load_spec\n")
    found = "\n".join(floor_violations(sorted(tmp_path.rglob("*.py"))))
    assert "kiln_core/m.py:2 imports export.pipeline: kiln_core (floor 1) imports a higher floor" in found
    assert "export/m.py:1 imports model_repository: stages talk through the ground floor only" in found
    assert "kiln_runtime/m.py:1 imports pydantic: kiln_runtime imports only" in found
    assert "kiln_runtime/m.py:2 imports kiln_core: kiln_runtime (floor 0) imports a higher floor" in found
    assert f"{PYTHON_MODELS}/model.py:1 imports kiln_core.spec: a python model imports only kiln_runtime" in found


# ----------------------------------------------------------------------------- contracts, defined once
def _strings(path: Path) -> list[tuple[int, str]]:
    """String literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _calls(path: Path, attribute: str) -> list[int]:
    return [n.lineno for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attribute]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ("stream" is left out: Locust's request-type label for a streamed call shares the word)
TENSOR_NAMES = {t.name for t in contract.GENERATION_INPUTS + contract.GENERATION_OUTPUTS if t.name != contract.STREAM} | {
    contract.TEXT, contract.EMBEDDING, contract.LABEL, contract.SCORES,
}
# the code that builds or reads Triton tensors: it takes every name from the contract
TENSOR_CODE = [
    *sorted((ROOT / "model_repository").rglob("*.py")),
    ROOT / "kiln_runtime" / "encoder.py",
    ROOT / "kiln_runtime" / "text.py",
    ROOT / "kiln" / "gateway" / "backend.py",
    ROOT / "loadtest" / "clients.py",
]
# Triton-only names (no OpenAI field shares them): nowhere outside the contract
TRITON_ONLY_NAMES = {contract.TEXT_INPUT, contract.TEXT_OUTPUT, contract.STOP_WORDS, contract.RANDOM_SEED}


@pytest.mark.parametrize("path", TENSOR_CODE, ids=_rel)
def test_code_that_speaks_tensors_takes_each_name_from_the_contract(path):
    typed = [f"{_rel(path)}:{line} {value!r}" for line, value in _strings(path) if value in TENSOR_NAMES]
    assert typed == [], "use the name from kiln_runtime.contract"


def test_triton_only_tensor_names_are_typed_once():
    typed = [f"{_rel(p)}:{line} {value!r}" for p in package_files() if p != ROOT / "kiln_runtime" / "contract.py"
             for line, value in _strings(p) if value in TRITON_ONLY_NAMES]
    assert typed == [], "use the name from kiln_runtime.contract"


def test_onnx_runtime_session_options_are_set_in_one_place():
    places = [f"{_rel(p)}:{line}" for p in package_files() for line in _calls(p, "SessionOptions")]
    assert [p.split(":")[0] for p in places] == ["kiln_runtime/ort.py"], places


def test_the_repository_card_file_is_named_by_its_class_only():
    typed = [f"{_rel(p)}:{line}" for p in package_files() for line, value in _strings(p) if value == "kiln.json"]
    assert [t.split(":")[0] for t in typed] == ["kiln_core/card.py"], typed


def test_model_config_parameters_are_parsed_in_one_place():
    """Python models read their config's parameters through contract.model_parameters."""
    typed = [f"{_rel(p)}:{line}" for p in package_files() for line, value in _strings(p) if value == "string_value"]
    assert [t.split(":")[0] for t in typed] == ["kiln_runtime/contract.py"], typed


def test_no_module_hides_behind_a_one_letter_alias():
    """`P` meant protocol in one file and lm_parity in another: modules keep their names."""
    short = [f"{_rel(p)}:{n.lineno} {a.name} as {a.asname}"
             for p in package_files() for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names if a.asname and len(a.asname) == 1 and a.name != "numpy"]
    assert short == []
