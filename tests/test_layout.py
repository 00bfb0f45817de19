"""The pack's shape, read from its source: one place for ComfyUI glue per package (its comfy_adapter.py or its
comfy/ sub-package), no ComfyUI import anywhere else, no import cycle, no overlong module, one table of socket
types, one import style in the node modules."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import comfy_env

REPO = comfy_env.REPO
ADAPTER = "comfy_adapter.py"
GLUE_PACKAGE = "comfy"  # a package whose glue holds several features keeps it in a comfy/ sub-package instead
MAX_MODULE_LINES = 460  # a module past ~450 lines holds several features: split it
# feature packages (plain torch + their ComfyUI glue) and the shared glue package
PACKAGES = ("attention", "identity", "story", "motion", "ipadapter", "video", "wan", "consistency", "common")
# top-level names that only exist inside a running ComfyUI
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers",
                 "execution", "server", "latent_preview", "nodes", "app", "utils"}


def pack_modules() -> dict[str, str]:
    """Dotted module name (relative to the pack) -> file path, for the pack's own code."""
    modules = {}
    folders = [""] + list(PACKAGES) + ["nodes"]
    folders += [f"{p}/{GLUE_PACKAGE}" for p in PACKAGES if os.path.isdir(os.path.join(REPO, p, GLUE_PACKAGE))]
    for folder in folders:
        base = os.path.join(REPO, folder)
        for name in sorted(os.listdir(base)):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            dotted = ".".join(p for p in (*folder.split("/"), "" if stem == "__init__" else stem) if p)
            modules[dotted] = os.path.join(base, name)
    return modules


def is_glue(dotted: str) -> bool:
    """A module that may speak ComfyUI: a package's comfy_adapter or a module of its comfy/ sub-package."""
    parts = dotted.split(".")
    return parts[-1] == ADAPTER[:-3] or (len(parts) >= 2 and parts[1] == GLUE_PACKAGE)


def imports_of(dotted: str, path: str):
    """(target, is_pack_module, lineno, at_top_level) for every import statement of a module, nested ones too."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), path)
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


def test_every_package_has_exactly_one_place_for_its_comfyui_glue():
    sub_packages = []
    for package in PACKAGES:
        files = os.listdir(os.path.join(REPO, package))
        glue = [f for f in files if f.startswith("comfy")]
        assert glue in ([ADAPTER], [GLUE_PACKAGE]), \
            f"{package}/ has ComfyUI glue {glue}, expected exactly [{ADAPTER}] or a {GLUE_PACKAGE}/ sub-package"
        assert "__init__.py" in files
        if glue == [GLUE_PACKAGE]:
            assert "__init__.py" in os.listdir(os.path.join(REPO, package, GLUE_PACKAGE))
            sub_packages.append(package)
    assert "attention" in sub_packages  # the rule really sees the sub-package form


def test_no_module_is_overlong():
    lines = {d: len(Path(p).read_text(encoding="utf-8").splitlines()) for d, p in pack_modules().items()}
    long = {d: n for d, n in lines.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by feature): {long}"


def test_only_the_adapters_import_comfyui():
    offenders = []
    for dotted, path in pack_modules().items():
        if is_glue(dotted):
            continue
        for target, internal, line, _ in imports_of(dotted, path):
            if not internal and target.split(".")[0] in COMFY_MODULES:
                offenders.append(f"{os.path.relpath(path, REPO)}:{line} imports {target}")
    assert not offenders, "ComfyUI imported outside the comfy_adapter modules and comfy/ sub-packages:\n" + "\n".join(offenders)


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
    assert graph["nodes.consistent_attention"] >= {"attention.comfy"}  # the graph is really built
    assert "common.comfy_adapter" in graph["attention.comfy.lifecycle"] | graph["attention.comfy.unet"]


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
             if "." in d and d.split(".")[0] in PACKAGES and not is_glue(d) and not p.endswith("__init__.py")
             and d != "motion.train"]  # the training command line finds ComfyUI itself
    code = ("import sys, types, importlib; pkg = types.ModuleType('pack'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['pack'] = pkg; [importlib.import_module('pack.' + m) for m in sys.argv[2:]]; "
            "print(sorted(n for n in sys.modules "
            "if n.split('.')[0] in ('comfy', 'folder_paths', 'comfy_api', 'av', 'cv2', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code, REPO, *cores], capture_output=True, text=True, timeout=300, check=False,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert len(cores) >= 20


def test_socket_types_are_declared_once():
    """Type names live in common/sockets.py; node modules use them and never spell a type of their own."""
    declared = []
    for dotted, path in pack_modules().items():
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
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
