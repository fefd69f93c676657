"""The package's import structure: the bookkeeping imports without torch, `import tidal` stays cheap, every
public name still resolves, and the study's modules import one another one way only."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import tidal

RUNTIME = Path(tidal.__file__).parent


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    # torch (and numpy, which the device side needs too) made unimportable before anything of tidal loads
    prelude = "import sys\nsys.modules['torch'] = None\nsys.modules['numpy'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_bookkeeping_imports_and_works_without_torch():
    done = _run_without_torch("""
        from tidal.costmodel import CostModel, DecodeSample, TransferSample
        from tidal.kv.allocator import BlockAllocator
        from tidal.modes import KV_MODES, WEIGHT_MODES, check_modes
        from tidal.plan import ResidencyPlan
        from tidal import errors
        from tidal.scheduler import ExclusiveScheduling, LruScheduling, Snapshot, Step, check_actions
        from tidal.scheduler import requests, state, policies, cost
        from tidal.scheduler import CostScheduling
        from tidal.simulate import engine, simulator  # the simulator's loop and engines (its workloads use numpy)

        link = [TransferSample("kv_swap_in", n, 1e-4 + n / 1e10) for n in (1 << 20, 4 << 20, 16 << 20)]
        model = CostModel.fit([], link)
        assert abs(model.predict_transfer("kv_swap_in", 8 << 20) - (1e-4 + (8 << 20) / 1e10)) < 1e-9
        assert model.predict_preempt(0, 0, "disk", "recompute")["total"] == 0.0

        plan = ResidencyPlan.from_fraction(4, 0.5)
        assert str(plan) == "ResidencyPlan(2/4 resident: RsRs)", str(plan)

        blocks = BlockAllocator(8, 4)
        assert blocks.allocate("a", 10) == [0, 1, 2] and blocks.num_free == 5
        assert blocks.free("a") and blocks.num_free == 8

        assert KV_MODES == ("swap", "recompute") and "host" in WEIGHT_MODES
        try:
            check_modes(kv="drop")
        except errors.ConfigError:
            pass
        else:
            raise AssertionError("kv='drop' accepted")
        assert ExclusiveScheduling().decide(Snapshot(0.0, 0, None, None, ())) == []
        assert LruScheduling().decide(Snapshot(0.0, 0, None, None, ())) == []
        assert CostScheduling().decide(Snapshot(0.0, 0, None, None, ())) == []
        assert "torch" not in {m for m in sys.modules if sys.modules[m] is not None}
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_import_tidal_is_cheap_and_names_resolve_lazily():
    done = _run_without_torch("""
        import tidal
        assert tidal.__version__ and "Engine" in tidal.__all__ and "Engine" in dir(tidal)
        loaded = sorted(m for m in sys.modules if m.startswith("tidal."))
        assert loaded == ["tidal.lazy"], loaded  # the export table's own helper, nothing else
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_public_name_still_resolves():
    import types

    for name in tidal.__all__:
        assert getattr(tidal, name) is not None, name
    assert isinstance(tidal.costmodel, types.ModuleType) and isinstance(tidal.presets, types.ModuleType)
    assert callable(tidal.offload) and not isinstance(tidal.offload, types.ModuleType)  # the function
    from tidal import Engine, kv

    assert Engine is tidal.Engine and kv.PagedKVCache is tidal.PagedKVCache
    assert set(kv.__all__) <= set(dir(kv))


def _study_imports() -> dict[str, set[str]]:
    """study module -> the study modules it imports, at module level or inside functions."""
    study = RUNTIME / "study"
    names = {f.stem for f in study.glob("*.py")}
    graph = {}
    for f in sorted(study.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "tidal.study"):
                rest = node.module.removeprefix("tidal.study").lstrip(".")
                deps |= {rest.split(".")[0]} if rest else {a.name for a in node.names}
        graph[f.stem] = (deps & names) - {f.stem, "__init__"}
    return graph


def test_study_imports_run_one_way():
    graph = _study_imports()
    assert {"profile", "compare", "report", "commands", "common"} <= set(graph)
    order, done, path = [], set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)
        order.append(m)

    for m in sorted(graph):
        visit(m)
    rank = {m: i for i, m in enumerate(order)}
    assert rank["profile"] < rank["compare"] < rank["report"] < rank["commands"]


def _package_imports() -> dict[str, set[str]]:
    """Every module of tidal -> the tidal modules it imports (module level or inside functions)."""
    mods = {}
    for f in RUNTIME.rglob("*.py"):
        parts = list(f.relative_to(RUNTIME).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(["tidal"] + (parts[:-1] if is_pkg else parts))] = (f, is_pkg)
    graph = {}
    for name, (f, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                deps |= {c for c in [base] + [f"{base}.{a.name}" for a in node.names] if c in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps - {name}
    return graph


def test_no_module_of_tidal_is_in_an_import_cycle():
    graph = _package_imports()
    assert {"tidal.engine.engine", "tidal.policy", "tidal.costmodel.model", "tidal.study.report"} <= set(graph)
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m not in done:
            path.append(m)
            for d in sorted(graph[m]):
                visit(d)
            path.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)
    # the check sees edges: the engine imports its batcher, the batcher does not import the engine
    assert "tidal.engine.batcher" in graph["tidal.engine.engine"]
