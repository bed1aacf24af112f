"""Forward compatibility: every ComfyUI internal the pack relies on is listed in nodes/comfy_compat.py and present in
the pinned ComfyUI; on a ComfyUI that lacks one, the node that needs it refuses to run with an error naming the
ComfyUI version, not an AttributeError. Runs in a subprocess with the real ComfyUI 0.3.75 imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from comfy_harness import COMFY_DIR
from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.path.insert(0, {tmp!r})
    from pare_pack.nodes import comfy_compat as c
    out = {{"missing": [s.name for s in c.missing_seams()], "count": len(c.SEAMS)}}
    # An older/newer ComfyUI without one seam: ModelPatcher.set_model_patch_replace gone, a Wan keyword renamed.
    import comfy.model_patcher, comfy.ldm.wan.model as wan
    del comfy.model_patcher.ModelPatcher.set_model_patch_replace
    init = wan.WanModel.__init__
    wan.WanModel.__init__ = lambda self, model_type="t2v", block_class=None: init(self, model_type)
    c._present.cache_clear()
    out["after"] = [s.name for s in c.check_seams()]
    for node in ("PARE Apply Router", "PARE Load Pruned Wan", "PARE LoRA Loader"):
        try:
            c.require(node)
            out[node] = None
        except c.ComfyVersionError as e:
            out[node] = str(e)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compat")
    (tmp / "pare_pack").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tmp=str(tmp))], cwd=COMFY_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_every_seam_is_present_in_the_pinned_comfyui(report):
    out, _ = report
    assert out["missing"] == [] and out["count"] >= 17


def test_a_missing_seam_names_the_comfyui_version_the_pack_needs(report):
    out, log = report
    assert any("set_model_patch_replace" in s for s in out["after"])
    assert any("wan_attn_block_class" in s for s in out["after"])
    assert "lacks ModelPatcher.set_model_patch_replace" in log and "ComfyUI 0.3.75" in log  # start-up log line
    routed = out["PARE Apply Router"]
    assert routed.startswith("PARE Apply Router cannot run on this ComfyUI: it lacks ModelPatcher.set_model_patch_replace")
    assert "needs ComfyUI 0.3.75" in routed
    assert "wan_attn_block_class" in out["PARE Load Pruned Wan"] and "0.3.75" in out["PARE Load Pruned Wan"]
    assert out["PARE LoRA Loader"] is None  # its seams are all still there
