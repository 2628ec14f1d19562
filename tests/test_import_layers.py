"""The subpackages form layers: ops (kernels, dispatch, JIT) at the bottom, quant (the public
casts) above it, nn above both. No import cycle between them, counting imports inside
functions, and nothing in the library imports the benchmarks (top-level ``benchmarks/``),
tests or scripts."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fp8train"


def _module_of(path: Path) -> str:
    parts = list(path.with_suffix("").relative_to(PACKAGE.parent).parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _imports(path: Path):
    """Every fp8train module this file imports, at any depth of its code."""
    module = _module_of(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                yield f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fp8train"


def subpackage_edges() -> dict:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        src = _layer(_module_of(path))
        for target in _imports(path):
            if target.startswith("fp8train") or target.split(".")[0] in ("tests", "scripts", "benchmarks", "recipes"):
                dst = _layer(target) if target.startswith("fp8train") else target.split(".")[0]
                if dst != src:
                    edges.setdefault(src, set()).add(dst)
    return edges


def test_no_import_cycle_between_subpackages():
    edges = subpackage_edges()
    # Modules at the top level (_checks, _env, the package's __init__) are leaves or the root.
    edges = {src: {d for d in dsts if d not in ("_checks", "_env", "fp8train")}
             for src, dsts in edges.items() if src not in ("_checks", "_env", "fp8train")}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in edges.get(start, ()))

    cycles = sorted(src for src in edges if reaches(src, src))
    assert not cycles, f"import cycles through {cycles}: {edges}"
    assert "quant" not in edges.get("ops", set()) and "nn" not in edges.get("ops", set())


def test_library_imports_no_benchmark_test_or_script():
    edges = subpackage_edges()
    assert not (PACKAGE / "bench").exists(), "the benchmarks live in the top-level benchmarks/"
    assert not any(d in ("benchmarks", "tests", "scripts", "recipes") for dsts in edges.values() for d in dsts), edges
