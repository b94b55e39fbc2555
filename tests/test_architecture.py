"""The house rules of docs/architecture.md, checked on the source: the request path (backend/)
and the compute path (worker/) stand side by side on common/, the model code is pure, and no
module imports itself back through a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGES = ("common", "backend", "worker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names ``path`` imports (``from a import b`` counts as ``a.b`` when that is
    a module of ours). ``top_level_only`` leaves out imports inside functions (deliberately lazy)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = list(ast.iter_child_nodes(tree)) if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under `if TYPE_CHECKING:` and other module-level blocks count
        nodes = [n for top in nodes if not isinstance(top, ast.FunctionDef | ast.ClassDef) for n in ast.walk(top)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return found


def _offending(prefix: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out = {}
    for name, path in MODULES.items():
        if name != prefix and not name.startswith(prefix + "."):
            continue
        bad = sorted(
            i for i in _imports(path)
            if any(i == f or i.startswith(f + ".") for f in forbidden)
            and not any(i == a or i.startswith(a + ".") for a in allowed)
        )  # fmt: skip
        if bad:
            out[name] = bad
    return out


def test_the_packages_hold_the_modules_the_rules_talk_about():
    """A guard for the tests below: a scan that finds nothing would pass them all."""
    assert {"common.jobs", "common.keys", "backend.app", "worker.predictor", "worker.model.dense"} <= set(MODULES)
    assert "common.settings" in _imports(MODULES["backend.app"])


def test_the_worker_imports_nothing_from_the_backend():
    assert _offending("worker", ("backend",)) == {}


def test_the_backend_imports_no_torch_and_no_worker_code_anywhere():
    """Also inside functions (which the import test below does not run). The embedded mode reaches
    the worker's job function by its dotted name only (``common.jobs.PREDICT_FUNCTION``)."""
    assert _offending("backend", ("worker", "torch", "torchvision", "open_clip", "cv2", "safetensors")) == {}


def test_imports_are_absolute():
    """The rules above read absolute names; a relative import would slip past them."""
    relative = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


def test_common_imports_neither_path_nor_flask_nor_torch():
    heavy = ("backend", "worker", "flask", "werkzeug", "gunicorn", "torch", "torchvision", "open_clip", "cv2")
    assert _offending("common", heavy) == {}


def test_the_model_code_is_pure_tensors():
    """worker/model/ reads no settings, writes no files, speaks no Label Studio format and knows
    nothing of jobs: what it needs comes in as arguments."""
    forbidden = ("common", "backend", "worker", "safetensors", "rq", "redis", "label_studio_sdk", "urllib3",
                 "json", "os", "pathlib", "io", "pickle", "shutil", "tempfile", "socket", "http", "urllib")  # fmt: skip
    assert _offending("worker.model", forbidden, allowed=("worker.model",)) == {}
    effects = []
    for name, path in MODULES.items():
        if not name.startswith("worker.model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Name) and called.id in ("open", "print", "input"):
                effects.append(f"{name}:{node.lineno} {called.id}()")
            if (
                isinstance(called, ast.Attribute)
                and called.attr in ("save", "load")
                and ast.unparse(called.value) == "torch"
            ):
                effects.append(f"{name}:{node.lineno} torch.{called.attr}()")
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                effects.append(f"{name}:{node.lineno} {node.attr}")
    assert effects == []


def test_redis_keys_and_the_environment_are_each_read_in_one_place():
    """Every key prelabel writes is named in common/keys.py; settings come from the environment in
    common/settings.py (entry points may read their own command-line defaults)."""
    keys, environment = [], []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if text is not None and text.startswith("prelabel:") and name != "common.keys":
                keys.append(f"{name}:{node.lineno} {text!r}")
            entry_point = name in ("common.settings", "backend.cli", "worker.cli")
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and not entry_point:
                environment.append(f"{name}:{node.lineno}")
    assert keys == [] and environment == []


def test_there_are_no_import_circles():
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in MODULES} for name, path in MODULES.items()}
    # Importing a.b.c runs the __init__ of a and a.b first.
    for deps in graph.values():
        deps |= {".".join(d.split(".")[:k]) for d in list(deps) for k in range(1, d.count(".") + 1)} & set(MODULES)
    circles, done, stack = [], set(), []

    def visit(node: str) -> None:
        if node in stack:
            circles.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep != node:
                visit(dep)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert circles == []


BLOCK_TORCH = """
import importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip", "cv2", "worker"):
            raise ImportError(f"the backend imported {name}")

sys.meta_path.insert(0, Refuse())
import backend
for module in pkgutil.walk_packages(backend.__path__, "backend."):
    __import__(module.name)
from backend.app import create_app
from common.settings import Settings
client = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).test_client()  # nothing listens there
print(client.get("/health").status_code)
"""


def test_the_backend_runs_without_torch_or_worker_code():
    """The backend image carries no torch and no worker/: every backend module imports, and a
    queue-mode app answers, with those imports refused."""
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "503"  # /health: Redis is down, said as such
