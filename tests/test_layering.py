"""The build-time / run-time boundary, checked on the source: runtime/ never imports
export/, torch or onnx; export/ imports only runtime's shared, dependency-free modules."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_FORBIDDEN = ("torch", "onnx", "export", "onnxscript")
EXPORT_MAY_USE = {"runtime", "runtime.manifest", "runtime.bitstream", "runtime.entropy_coding", "runtime.sampler",
                  "runtime.portable", "runtime.engines"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if node.module == "runtime")
    return out


def test_runtime_imports_no_build_time_code() -> None:
    for f in sorted((REPO / "runtime").rglob("*.py")):
        for mod in imports(f):
            top = mod.split(".")[0]
            assert top not in RUNTIME_FORBIDDEN, f"{f.relative_to(REPO)} imports {mod}"


def test_export_uses_only_shared_runtime_modules() -> None:
    for f in sorted((REPO / "export").rglob("*.py")):
        for mod in imports(f):
            if mod.split(".")[0] == "runtime":
                assert mod in EXPORT_MAY_USE, f"{f.relative_to(REPO)} imports {mod}"


def test_only_entropy_coding_imports_the_extension() -> None:
    for f in sorted(REPO.rglob("*.py")):
        if "build" in f.parts or f.name == "entropy_coding.py":
            continue
        for mod in imports(f):
            assert "_rans" not in mod, f"{f.relative_to(REPO)} imports {mod}"
