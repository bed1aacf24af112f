"""Drive a real, headless ComfyUI over its HTTP API: start it on a free loopback port, post API-format
graphs, wait for /history, read outputs, stop it. Used by the tests and by `make demo`.

Each server gets its own base directory (models/, custom_nodes/, input/, output/, user/), so runs never share
state; the pack is linked into its custom_nodes/ as a real install would be.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from comfyui_pare import tested_comfyui

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "comfyui-pare"))
COMFY_DIR = Path(os.environ.get("PARE_COMFYUI_DIR", CACHE / f"comfyui-{tested_comfyui.PINNED.version}"))


@dataclass(frozen=True)
class ComfyInstall:
    """One real ComfyUI the tests run against (an entry of comfyui_pare/tested_comfyui.py, set up by
    scripts/setup_env.sh): its tree and, where it pins another front end than the venv's, that front end's folder."""
    version: str
    comfy_dir: Path
    source: Path | None = None  # the unmodified tree setup_env.sh copies (None: the pinned release, from PyPI)

    @property
    def front_end_version(self) -> str | None:
        """The comfyui-frontend-package version the tree's requirements.txt pins."""
        try:
            text = (self.comfy_dir / "requirements.txt").read_text()
        except OSError:
            return None
        match = re.search(r"^comfyui-frontend-package==(\S+)", text, re.MULTILINE)
        return match.group(1) if match else None

    @property
    def front_end_root(self) -> Path | None:
        """The static files to serve with --front-end-root; None for the pinned release (the venv's package)."""
        if self.source is None or self.front_end_version is None:
            return None
        return CACHE / f"frontend-{self.front_end_version}" / "comfyui_frontend_package" / "static"

    def missing(self) -> str | None:
        """Why this ComfyUI cannot run here (a message naming what is missing), or None."""
        if (self.comfy_dir / "main.py").exists():
            return None
        if self.source is not None and not (self.source / "main.py").exists():
            env = tested_comfyui.by_version(self.version).source_env
            return f"ComfyUI {self.version} tests skipped: no ComfyUI {self.version} tree at {self.source} (set {env})"
        return f"no ComfyUI {self.version} at {self.comfy_dir}; run `make test` or scripts/setup_env.sh first"


def _install(entry: tested_comfyui.TestedComfyUI) -> ComfyInstall:
    if entry is tested_comfyui.PINNED:
        return ComfyInstall(entry.version, COMFY_DIR)
    source = Path(os.environ.get(entry.source_env, REPO.parent / "shared" / "comfyui" / entry.version))
    return ComfyInstall(entry.version, CACHE / f"comfyui-{entry.version}", source)


INSTALLS = {entry.version: _install(entry) for entry in tested_comfyui.TESTED}


class PromptError(RuntimeError):
    """A prompt that ComfyUI refused (validation) or that failed while executing."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: str | os.PathLike | None = None, comfy_dir: Path = COMFY_DIR,
                 python: str = sys.executable, extra_args: tuple[str, ...] = (),
                 extra_custom_nodes: tuple[Path, ...] = (), front_end: bool = False,
                 front_end_root: Path | None = None):
        self.comfy_dir = Path(comfy_dir)
        self.front_end_root = front_end_root  # the front end to serve when front_end is True (None: the venv's)
        if not (self.comfy_dir / "main.py").exists():
            raise FileNotFoundError(f"no ComfyUI at {self.comfy_dir}; run `make test` or scripts/setup_env.sh first")
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="pare-comfy-"))
        self.python = python
        self.extra_args = extra_args
        self.front_end = front_end  # True: serve the installed comfyui-frontend-package (the browser test)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        for sub in ("models/diffusion_models", "models/vae", "models/loras", "models/pare_routers",
                    "custom_nodes", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name, target in (("comfyui-pare", REPO), *((p.name, p) for p in extra_custom_nodes)):
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
        self.log_path = self.base / "comfyui.log"

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.port = _free_port()
        front: list[str] = []
        if not self.front_end:  # no UI needed: an empty root spares importing the front-end package
            (self.base / "front-end-empty").mkdir(exist_ok=True)
            front = ["--front-end-root", str(self.base / "front-end-empty")]
        elif self.front_end_root is not None:
            front = ["--front-end-root", str(self.front_end_root)]
        cmd = [self.python, str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
               *front, "--base-directory", str(self.base), *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP --------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def get_text(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def object_info(self) -> dict:
        return self.get("/object_info")

    def free(self) -> None:
        """Unload models and drop the node cache, so identical prompts run again."""
        self.post("/free", {"unload_models": True, "free_memory": True})

    # -- prompts -----------------------------------------------------------------------------------------
    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise PromptError(f"ComfyUI refused the prompt ({status}): {json.dumps(body)[:2000]}", body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    err = next((m[1] for m in status.get("messages", []) if m[0] == "execution_error"), {})
                    raise PromptError(
                        f"{err.get('node_type', '?')} failed: {err.get('exception_type', '')}: "
                        f"{err.get('exception_message', status)}", err)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(graph), timeout)

    def output_files(self, entry: dict, node_id: str, kind: str | None = None) -> list[Path]:
        """Paths of the files an output node wrote (images / latents / gifs / ...)."""
        outputs = entry.get("outputs", {}).get(str(node_id), {})
        files = []
        for key, items in outputs.items():
            if kind is not None and key != kind:
                continue
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    folder = self.base / item.get("type", "output")
                    files.append(folder / item.get("subfolder", "") / item["filename"])
        return files
