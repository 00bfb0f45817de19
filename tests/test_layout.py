"""The pack's shape, read from its source: one ComfyUI adapter per package, no ComfyUI import
anywhere else, no import cycle, one table of socket types, one import style in the node modules."""
from __future__ import annotations

import ast
import os

import comfy_env

REPO = comfy_env.REPO
ADAPTER = "comfy_adapter.py"
# feature packages (plain torch + one adapter) and the shared glue package
PACKAGES = ("attention", "identity", "story", "motion", "ipadapter", "video", "wan", "common")
# top-level names that only exist inside a running ComfyUI
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers",
                 "execution", "server", "latent_preview", "nodes", "app", "utils"}


def pack_modules() -> dict[str, str]:
    """Dotted module name (relative to the pack) -> file path, for the pack's own code."""
    modules = {}
    for folder in ("",) + PACKAGES + ("nodes",):
        base = os.path.join(REPO, folder)
        for name in sorted(os.listdir(base)):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            dotted = ".".join(p for p in (folder, "" if stem == "__init__" else stem) if p)
            modules[dotted] = os.path.join(base, name)
    return modules


def imports_of(dotted: str, path: str):
    """(target, is_pack_module, lineno, at_top_level) for every import statement of a module, nested ones too."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = dotted if path.endswith("__init__.py") else dotted.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, False, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module, False, node.lineno, id(node) in top_level
                continue
            parts = package.split(".") if package else []
            base = parts[:len(parts) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # `from . import x`: each name may be a module
                for alias in node.names:
                    yield ".".join(base + [alias.name]), True, node.lineno, id(node) in top_level
            else:
                yield target, True, node.lineno, id(node) in top_level
                for alias in node.names:  # `from ..pkg import module` imports pkg.module too
                    yield f"{target}.{alias.name}", True, node.lineno, id(node) in top_level


def test_every_package_has_exactly_one_adapter_with_the_shared_name():
    for package in PACKAGES:
        files = os.listdir(os.path.join(REPO, package))
        adapters = [f for f in files if f.startswith("comfy") and f.endswith(".py")]
        assert adapters == [ADAPTER], f"{package}/ has ComfyUI modules {adapters}, expected exactly [{ADAPTER}]"
        assert "__init__.py" in files


def test_only_the_adapters_import_comfyui():
    offenders = []
    for dotted, path in pack_modules().items():
        if path.endswith(ADAPTER):
            continue
        for target, internal, line, _ in imports_of(dotted, path):
            if not internal and target.split(".")[0] in COMFY_MODULES:
                offenders.append(f"{os.path.relpath(path, REPO)}:{line} imports {target}")
    assert not offenders, "ComfyUI imported outside the comfy_adapter modules:\n" + "\n".join(offenders)


def test_the_pack_has_no_import_cycle():
    modules = pack_modules()
    graph = {name: set() for name in modules}
    for dotted, path in modules.items():
        for target, internal, _, _ in imports_of(dotted, path):
            if internal and target in modules and target != dotted:
                graph[dotted].add(target)
    # the search itself must be able to see a cycle
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert graph["nodes.consistent_attention"] >= {"attention.comfy_adapter"}  # the graph is really built
    assert "common.comfy_adapter" in graph["attention.comfy_adapter"]


def _cycle(graph: dict) -> list | None:
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_core_modules_import_without_comfyui():
    """Every core module imports in a fresh interpreter with no ComfyUI on the path, and loads neither
    ComfyUI nor the heavy libraries (PyAV, OpenCV, transformers) that only some functions need."""
    import subprocess
    import sys

    cores = [d for d, p in pack_modules().items()
             if "." in d and d.split(".")[0] in PACKAGES and not p.endswith((ADAPTER, "__init__.py"))
             and d != "motion.train"]  # the training command line finds ComfyUI itself
    code = ("import sys, types, importlib; pkg = types.ModuleType('pack'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['pack'] = pkg; [importlib.import_module('pack.' + m) for m in sys.argv[2:]]; "
            "print(sorted(n for n in sys.modules "
            "if n.split('.')[0] in ('comfy', 'folder_paths', 'comfy_api', 'av', 'cv2', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code, REPO, *cores], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert len(cores) >= 20


def test_socket_types_are_declared_once():
    """Type names live in common/sockets.py; node modules use them and never spell a type of their own."""
    declared = []
    for dotted, path in pack_modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("_TYPE")
                                                    for t in node.targets):
                declared.append(dotted)
    assert set(declared) == {"common.sockets"}, declared


def test_node_modules_share_one_import_style():
    """Node modules import the pack at module level (its modules are light; heavy libraries such as
    transformers, PyAV and OpenCV are imported by the core where used), never inside a function."""
    for dotted, path in pack_modules().items():
        if not dotted.startswith("nodes."):
            continue
        late = [(t, line) for t, internal, line, top in imports_of(dotted, path) if internal and not top]
        assert not late, f"{dotted} imports pack modules inside functions: {late}"
        heavy = [t for t, internal, _, _ in imports_of(dotted, path)
                 if not internal and t.split(".")[0] in ("transformers", "av", "cv2")]
        assert not heavy, f"{dotted} imports heavy libraries at module level: {heavy}"
