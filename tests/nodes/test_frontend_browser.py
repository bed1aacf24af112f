"""The artist's path, in ComfyUI's real front end (comfyui-frontend-package: the version each tested ComfyUI pins,
1.32.9 for 0.3.75, 1.35.9 for 0.8.0, 1.49.6 for 0.33.0, served by that ComfyUI) driven by headless Chromium: the
shipped workflows show up in the template browser, open with no missing or red node, turn into the same prompt as our
converter, every PARE widget shows its tooltip, and a workflow queued with the Run button renders the toy world's
videos (teacher and routed student), which appear in the page. The page is found by roles and texts all three front
ends share (a dialog, a button named Run). Screenshots go to test-output/browser/ (the other releases:
test-output/browser-comfyui-<version>/; PARE_TEST_OUTPUT overrides).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import av
import pytest
from conftest import PINNED, REPO, comfy_install
from PIL import Image

from scripts import toy_assets
from scripts.comfy_harness import ComfyServer
from scripts.workflow_api import ui_to_api

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]

CHROMIUM = Path(os.environ.get("PARE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
OUT = Path(os.environ.get("PARE_TEST_OUTPUT", REPO / "test-output")) / "browser"
SHIPPED = sorted((REPO / "workflows").glob("*.json"))
QUEUED = REPO / "workflows" / "pare_toy_t2v.json"  # queued from the UI on the toy weights
PACK = "comfyui-pare"  # the folder name the harness links the pack under (as a registry install names it)


def _missing_prerequisite() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (requirements-dev.txt; run scripts/setup_env.sh)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed (scripts/setup_env.sh installs the version ComfyUI pins)"
    if not CHROMIUM.exists():
        return (f"no Chromium at {CHROMIUM}: scripts/setup_env.sh installs Debian's chromium with apt-get when run "
                "as root (set PARE_CHROMIUM to use another Chromium build)")
    return None


if _missing_prerequisite():
    pytest.skip(_missing_prerequisite(), allow_module_level=True)

from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

# The folder, in a ComfyUI base directory, of the file each loader of the shipped workflows names (its first widget).
FILE_INPUTS = {"PARELoadPrunedWan": "models/diffusion_models", "PARELoadRouter": "models/pare_routers",
               "PARELoraLoader": "models/loras", "VAELoader": "models/vae", "CLIPLoader": "models/text_encoders",
               "CLIPVisionLoader": "models/clip_vision", "LoadImage": "input", "LoadVideo": "input"}


def write_mp4(path: Path, frames: int = 8) -> None:
    """A small real video (MPEG-4 part 2, which every PyAV build encodes)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", (64, 64), (30 * i % 255, 90, 160))
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def install_named_files(base: Path) -> None:
    """Stand-ins under the file names the shipped real-model workflows name (the user's Wan files), so each file
    input's value is one the server lists: front end 1.49 marks a node whose file is not listed as an error (red),
    as a user without the files would see it. Models are empty files (the page never loads them), the start frame a
    real PNG and the control video a real MP4 (the page shows them)."""
    for path in SHIPPED:
        for node in json.loads(path.read_text())["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] not in FILE_INPUTS or not values:
                continue
            target = base / FILE_INPUTS[node["type"]] / values[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            if target.suffix == ".png":
                Image.new("RGB", (64, 64), (40, 90, 160)).save(target)
            elif target.suffix == ".mp4":
                write_mp4(target)
            else:
                target.touch()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, comfyui_version):
    """A fresh ComfyUI with its front end, this pack and the toy world's weights (no test-only nodes)."""
    install = comfy_install(comfyui_version)
    base = tmp_path_factory.mktemp(f"comfy-ui-{comfyui_version}")
    toy_assets.install(base)
    install_named_files(base)
    server = ComfyServer(base_dir=base, comfy_dir=install.comfy_dir, front_end=True,
                         front_end_root=install.front_end_root)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(comfyui_version) -> Path:
    """Where the screenshots of this ComfyUI's front end go."""
    return OUT if comfyui_version == PINNED else OUT.with_name(f"browser-comfyui-{comfyui_version}")


@pytest.fixture(scope="module")
def page(ui_server, shots):
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1800, "height": 1100})
        pg.errors = []
        pg.shots = shots
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(ui_server.url + "/", timeout=180_000)
        pg.wait_for_function("!!(window.app && window.app.graph && window.LiteGraph && "
                             "window.LiteGraph.registered_node_types['PAREApplyRouter'])", timeout=180_000)
        pg.wait_for_timeout(1000)
        dismiss_dialogs(pg)
        tidy_for_screenshots(pg)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def object_info(ui_server) -> dict:
    return ui_server.object_info()


def load(page, path: Path) -> None:
    """What dropping the file on the canvas does (app.handleFile), then a view that fits the whole graph."""
    page.evaluate("async ([text, name]) => { await window.app.handleFile(new File([text], name, "
                  "{type: 'application/json'})); }", [path.read_text(), path.name])
    page.wait_for_function(f"window.app.graph.nodes.length === {len(json.loads(path.read_text())['nodes'])}")
    page.evaluate("""() => { const c = window.app.canvas, ns = window.app.graph.nodes;
        const x0 = Math.min(...ns.map(n => n.pos[0])) - 40, y0 = Math.min(...ns.map(n => n.pos[1])) - 80;
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])) + 40;
        const y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1])) + 40;
        const r = c.canvas.getBoundingClientRect(), s = Math.min(r.width / (x1 - x0), r.height / (y1 - y0)) * 0.92;
        c.ds.scale = s; c.ds.offset = [-x0 + 60 / s, -y0 + 110 / s]; c.setDirty(true, true); }""")
    page.mouse.move(1000, 1085)  # empty canvas: no hover tooltip in the screenshot
    page.wait_for_timeout(500)


def dismiss_dialogs(page) -> None:
    """A first start opens the template browser; close it (and anything else modal) as a user would."""
    dialogs = page.get_by_role("dialog").locator("visible=true")
    for _ in range(10):
        if not dialogs.count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
        close = dialogs.locator("button:has(i.pi-times), button[aria-label='Close'], button[aria-label='Close dialog']")
        if close.count():
            try:
                close.first.click(timeout=2000)
            except PlaywrightTimeout:  # it closed, or is still rendering: look again
                pass
        page.wait_for_timeout(500)
    assert not dialogs.count(), f"a dialog stays open: {dialogs.first.text_content()[:300]}"


def tidy_for_screenshots(page) -> None:
    """Cosmetic only: close the front end's announcement bar and hide the minimap, so screenshots show the graph."""
    page.evaluate("""async () => {
        const s = Array.from(document.querySelectorAll('span')).find(e => e.textContent.startsWith('Introducing'));
        const bar = s && s.parentElement.parentElement;
        const close = bar && Array.from(bar.querySelectorAll('button')).find(b => !b.textContent.trim());
        if (close) close.click();
        await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); }""")
    page.wait_for_timeout(300)


def visible_problems(page) -> list[str]:
    """Error toasts and dialogs the front end shows (missing nodes, schema errors, execution errors)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '.p-toast-message-error, .p-dialog, [role=dialog], [role=alertdialog], .comfy-missing-nodes'))
        .map(e => e.textContent.trim().slice(0, 300)).filter(t => t)""")


def test_workflows_are_in_the_template_browser(ui_server, page):
    with urllib.request.urlopen(ui_server.url + "/api/workflow_templates") as r:
        listed = json.loads(r.read())
    assert sorted(listed.get(PACK, [])) == sorted(p.stem for p in SHIPPED), listed
    for path in SHIPPED:
        with urllib.request.urlopen(f"{ui_server.url}/api/workflow_templates/{PACK}/{path.name}") as r:
            assert json.loads(r.read()) == json.loads(path.read_text())
    # ... and in the front end's template browser (Workflow menu > Browse Templates), under the pack's name.
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog").locator("visible=true")  # a PrimeVue .p-dialog up to 1.35, Reka UI in 1.49
    dialog.first.wait_for(state="visible", timeout=30_000)
    dialog.get_by_text(PACK, exact=True).first.click()
    for path in SHIPPED:
        dialog.get_by_text(path.stem, exact=True).first.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(page.shots / "template_browser.png"))
    dismiss_dialogs(page)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_workflow_opens_with_no_missing_node_and_same_prompt(page, object_info, path: Path):
    load(page, path)
    ui = json.loads(path.read_text())
    nodes = page.evaluate("() => window.app.graph.nodes.map(n => ({id: n.id, type: n.type, "
                          "registered: !!window.LiteGraph.registered_node_types[n.type], errors: !!n.has_errors}))")
    # Node ids by value: numbers up to front end 1.35, strings ('1') in 1.49.
    assert sorted((str(n["id"]), n["type"]) for n in nodes) == sorted((str(n["id"]), n["type"]) for n in ui["nodes"])
    assert [n for n in nodes if not n["registered"] or n["errors"]] == []
    assert visible_problems(page) == []
    assert any(n["type"] == "Note" for n in ui["nodes"]), f"{path.name} has no Note for the artist"
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = ui_to_api(ui, object_info, source=path.name)

    def declared(node: dict) -> dict:
        """Inputs the node defines, a dynamic combo's ("format.codec") included; the server ignores the rest (e.g.
        PreviewAny's display-only 'preview')."""
        spec = object_info[node["class_type"]]["input"]
        names = {**spec.get("required", {}), **spec.get("optional", {})}
        return {k: v for k, v in node["inputs"].items() if k.split(".")[0] in names}

    assert {k: (v["class_type"], declared(v)) for k, v in prompt.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}
    page.screenshot(path=str(page.shots / f"{path.stem}.png"))
    assert not page.errors, page.errors


def test_every_pare_widget_shows_its_tooltip(page, object_info):
    """Each PARE node the server lists, placed on an empty canvas as from the node library: hover every widget and
    read the tooltip the front end shows. Multiline text boxes are HTML elements over the canvas, and front end
    1.32.9 shows no tooltip on them; those are listed and checked against the node definition instead."""
    pare = sorted(k for k, v in object_info.items() if v["python_module"].endswith(PACK))
    assert {"PARELoadPrunedWan", "PARELoadRouter", "PAREApplyRouter", "PARELoraLoader", "PAREStaticSchedule"} <= set(pare)
    checked, expected, dom_widgets = set(), set(), set()
    for node_type in pare:
        spec = object_info[node_type]["input"]
        tips = {name: s[1]["tooltip"] for sec in ("required", "optional") for name, s in spec.get(sec, {}).items()}
        expected |= {(node_type, name) for sec in ("required", "optional") for name, s in spec.get(sec, {}).items()
                     if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")}
        widgets = page.evaluate("""(t) => { const g = window.app.graph; g.clear();
            const n = window.LiteGraph.createNode(t); g.add(n); n.pos = [100, 100];
            return (n.widgets || []).map(w => [w.name, !!w.element]); }""", node_type)
        for name, is_dom in widgets:
            if name not in tips:  # the front end's own companions of an input: seed control, upload button
                assert name in ("control_after_generate", "upload"), (node_type, name)
                continue
            if is_dom:
                assert tips[name], (node_type, name)
                dom_widgets.add((node_type, name))
                continue
            point = page.evaluate("""([t, name]) => { const c = window.app.canvas;
                const n = window.app.graph.nodes.find(n => n.type === t), w = n.widgets.find(w => w.name === name);
                c.ds.scale = 1; c.ds.offset = [200, 200]; c.setDirty(true, true); c.draw(true, true);
                const r = c.canvas.getBoundingClientRect();
                const p = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + 10]);
                return [r.left + p[0], r.top + p[1]]; }""", [node_type, name])
            page.mouse.move(point[0] - 30, point[1] - 60)
            page.mouse.move(point[0], point[1])
            tooltip = page.locator(".node-tooltip")
            tooltip.wait_for(state="visible", timeout=15_000)
            assert tooltip.text_content().strip() == tips[name].strip(), (node_type, name)
            checked.add((node_type, name))
    assert checked | dom_widgets == expected
    multiline = {(t, name) for t in pare for sec in ("required", "optional")
                 for name, s in object_info[t]["input"].get(sec, {}).items() if s[1].get("multiline")}
    assert dom_widgets == multiline, dom_widgets  # only the multiline text boxes go without a hover tooltip


def test_run_button_renders_the_toy_videos_in_the_page(page, ui_server):
    load(page, QUEUED)
    page.get_by_role("button", name="Run", exact=True).first.click()
    # SaveVideo's preview: a <video> the front end adds under each output node once the prompt has run. Waits for
    # as long as a loaded CPU needs (20 steps of two models), but stops at once if the prompt failed.
    deadline = time.time() + 900
    while page.locator("video[src*='student']").count() == 0 or page.locator("video[src*='teacher']").count() == 0:
        failed = [e["status"] for e in ui_server.get("/history").values() if e["status"]["status_str"] == "error"]
        assert not failed, failed
        assert time.time() < deadline, "no video in the page after 900 s"
        page.wait_for_timeout(1000)
    for who in ("teacher", "student"):
        src = page.locator(f"video[src*='{who}']").first.get_attribute("src")
        with urllib.request.urlopen(ui_server.url + src if src.startswith("/") else src) as r:
            body = r.read()
        assert len(body) > 1000 and body[4:8] == b"ftyp", f"the {who} preview is not an MP4 video"
    history = ui_server.get("/history")
    assert [e["status"]["status_str"] for e in history.values()] == ["success"], history
    outputs = next(iter(history.values()))["outputs"]
    texts = [t for out in outputs.values() for t in out.get("text", [])]
    assert any("block compute executed" in t for t in texts), texts  # the routing report ran on the student
    page.mouse.move(1000, 1085)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(page.shots / "queued_pare_toy_t2v.png"))
    assert visible_problems(page) == []
    assert not page.errors, page.errors
