"""The package's structure: no import circle between its modules, and the ops exist without the
C++ extension (their schemas are defined in Python)."""

import ast
import os
import subprocess

import torch
from test_install import clean_python

from yolo_kernels import library

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yolo_kernels")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (lazy imports included)."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[_module_name(path)] = path
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                edges |= {n for n in names if n in modules} or ({target} if target in modules else set())
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        graph[module] = edges - {module}
    return graph


def test_no_import_circle():
    graph = import_graph()
    parents = {m for m in graph if any(other.startswith(m + ".") for other in graph)}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            # a package imported by its own submodule is only its __init__ (already running): not a circle
            if n in parents and m.startswith(n + "."):
                continue
            assert state.get(n) != 1, "import circle: " + " -> ".join(path[path.index(n) :] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "yolo_kernels.library" not in graph["yolo_kernels.triton"]


def test_every_op_is_defined_from_python():
    for name in library.SCHEMAS:
        assert hasattr(torch.ops.yolo_kernels, name), name


def test_the_ops_exist_without_the_extension(tmp_path):
    """A copy of the package without its compiled module: the ops are there, with their fakes."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "yolo_kernels", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = (
        "import torch, yolo_kernels as yk\n"
        "assert yk.library.LOAD_ERROR and 'installed without its C++ extension' in yk.library.LOAD_ERROR\n"
        "print(sorted(n for n in yk.library.SCHEMAS if hasattr(torch.ops.yolo_kernels, n)))\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n"
        "    p = [torch.empty(2, 3, 4, 4, 7)]\n"
        "    out = torch.ops.yolo_kernels.fused_loss(p, torch.empty(0, 6), [torch.empty(3, 2)], None, 'yolov3',\n"
        "        1.0, 3.54, 37.4, 1.0, 64.3, 1.0, 0.2, 4.0, 0.0, 0.0, 'giou', 'mean', False, False, True)\n"
        "    print(tuple(out[4][0].shape))\n"
    )
    # a venv that sees torch but not the development install (whose import hook would win)
    python = clean_python(tmp_path / "env")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "['bce_with_logits', 'box_iou', 'detection_loss', 'detection_loss_backward', "
        "'detection_loss_with_grad', 'fused_loss', 'match', 'pad_targets', 'tal_assign']",
        "(2, 3, 4, 4, 7)",
    ]


def test_the_layers():
    """What every family shares imports no family; the families import no backend package above
    them (the Triton backend registers itself); the ops' library imports no family."""
    graph = import_graph()
    families = ("yolo_kernels.anchor", "yolo_kernels.anchor_free", "yolo_kernels.triton")
    for shared in ("dispatch", "library", "config", "validate", "autograd", "stats"):
        imported = graph[f"yolo_kernels.{shared}"]
        assert not [m for m in imported if m.startswith(families)], (shared, imported)
    for module, imported in graph.items():
        if module.startswith(("yolo_kernels.anchor.", "yolo_kernels.anchor_free.")):
            assert not [m for m in imported if m.startswith("yolo_kernels.triton")], (module, imported)
