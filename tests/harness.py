"""Run ComfyUI prompts in-process (execution.PromptExecutor) or against a real `main.py --cpu` server.

Both take API-format prompts: {node_id: {"class_type": ..., "inputs": {...}}}.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from comfy_env import comfy_path

# the browser tests (tests/test_workflows.py, tests/test_web_extension.py): scripts/setup_browser.sh provides both
NODE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".harness", "node")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (what to install), or None."""
    import shutil

    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: run `bash scripts/setup_browser.sh` (apt-get install chromium)"
    if not shutil.which("node"):
        return "Node.js is missing: install nodejs, then run `bash scripts/setup_browser.sh`"
    if not os.path.exists(os.path.join(NODE_DIR, "node_modules", "playwright-core", "package.json")):
        return "playwright-core is missing in .harness/node: run `bash scripts/setup_browser.sh`"
    return None


MODEL_FOLDERS = ("checkpoints", "clip", "clip_vision", "vae", "loras", "photomaker", "ipadapter",
                 "storydiffusion", "text_encoders", "diffusion_models", "embeddings")


class PromptFailed(RuntimeError):
    """A prompt failed validation or execution; `.info` holds ComfyUI's error details."""

    def __init__(self, message, info=None):
        super().__init__(message)
        self.info = info or {}


# ---------------------------------------------------------------------------------------------------
# in-process


class _ServerStub:
    """The few attributes PromptExecutor touches on PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def executor_cache_args(main_py: str | None = None) -> dict:
    """`cache_args` for this ComfyUI's PromptExecutor: every key its own main.py passes, each 0 (no LRU entries, no
    RAM-cache headroom; the in-process executor uses the classic cache, cache_type=False).

    The keys differ by version and the executor reads them unguarded (0.3.75 and 0.8.0: "lru", "ram"; 0.29.0 adds
    "ram_inactive"), and neither PromptExecutor's signature nor its defaults name them, so they are read from the
    dict literal main.py hands to `execution.PromptExecutor(..., cache_args={...})`."""
    import ast

    main_py = main_py or os.path.join(comfy_path(), "main.py")
    with open(main_py) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "PromptExecutor":
            for kw in node.keywords:
                if kw.arg == "cache_args" and isinstance(kw.value, ast.Dict):
                    keys = [k.value for k in kw.value.keys if isinstance(k, ast.Constant)]
                    if keys and len(keys) == len(kw.value.keys):
                        return dict.fromkeys(keys, 0)
    raise RuntimeError(f"{main_py} builds no PromptExecutor with a literal cache_args dict: update "
                       "tests/harness.py executor_cache_args for this ComfyUI")


class InProcessComfy:
    """Validates and executes prompts with ComfyUI's own executor, in this process."""

    def __init__(self):
        import execution

        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=False, cache_args=executor_cache_args())

    def run(self, prompt: dict) -> dict:
        """Execute; returns the history `outputs` ({node_id: ui dict}). Raises PromptFailed."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise PromptFailed(f"prompt invalid: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}",
                               {"error": valid[1], "node_errors": valid[3]})
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            info = errors[0] if errors else {}
            raise PromptFailed(f"{info.get('exception_type')}: {info.get('exception_message')}", info)
        return self.executor.history_result["outputs"]


# ---------------------------------------------------------------------------------------------------
# real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_model_paths(models_dir: str, path: str) -> str:
    lines = ["storydiffusion_tests:", f"    base_path: {models_dir}"]
    lines += [f"    {name}: {name}/" for name in MODEL_FOLDERS]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """`python main.py --cpu` in a subprocess, with this pack in custom_nodes (scripts/setup.sh links it)."""

    def __init__(self, workdir: str, models_dir: str, python: str | None = None, extra_args: tuple = (),
                 env: dict | None = None):
        self.workdir = workdir
        self.env = dict(env or {})  # extra environment variables of the server process
        self.extra_args = tuple(extra_args)
        self.models_dir = models_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = os.path.join(workdir, "output")
        self.input_dir = os.path.join(workdir, "input")
        self.log_path = os.path.join(workdir, "server.log")
        self.python = python or sys.executable
        self.proc = None

    def start(self, timeout: float = 120.0):
        for d in (self.output_dir, self.input_dir, os.path.join(self.workdir, "user"), os.path.join(self.workdir, "temp")):
            os.makedirs(d, exist_ok=True)
        extra = write_extra_model_paths(self.models_dir, os.path.join(self.workdir, "extra_model_paths.yaml"))
        cmd = [self.python, os.path.join(comfy_path(), "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--output-directory", self.output_dir, "--input-directory", self.input_dir,
               "--temp-directory", os.path.join(self.workdir, "temp"), "--user-directory", os.path.join(self.workdir, "user"),
               "--extra-model-paths-config", extra, "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *self.extra_args]
        self.log = open(self.log_path, "w")  # noqa: SIM115 (the server writes to it until stop() closes it)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(cmd, cwd=comfy_path(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.read_log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.read_log()[-4000:]}")

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PromptFailed(f"POST {path} -> {e.code}: {e.read().decode()[:4000]}")

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finished; returns its outputs or raises PromptFailed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    errs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = errs[0][1] if errs else status
                    raise PromptFailed(f"prompt failed: {json.dumps(detail, default=str)[:3000]}", detail)
                if status.get("completed", True):
                    return entry["outputs"]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.read_log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, outputs: dict, key: str = "images") -> list[str]:
        files = []
        for node_out in outputs.values():
            for item in node_out.get(key, []) or []:
                if isinstance(item, dict) and "filename" in item:
                    base = self.output_dir if item.get("type", "output") == "output" else os.path.join(self.workdir, item["type"])
                    files.append(os.path.join(base, item.get("subfolder", ""), item["filename"]))
        return files
