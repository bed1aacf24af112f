"""Behaviours of newer ComfyUI releases (0.3x, DynamicVRAM, multi-GPU threads) that the trees we have (0.3.75,
0.8.0) do not show by themselves, built from the real ComfyUI classes in this process (ComfyUI as a library):

* DynamicVRAM's operations leave ``Linear.weight`` as None until the state dict loads: the pruned block factory
  must size every narrowed layer from the module's attributes, never from its weights;
* ``ModelPatcherDynamic`` restores backed-up weights at the start of every load and then fires ``ON_LOAD``: the
  LoRA merge of Wan's modulation tables (``diff_m``), done in PARE's ON_LOAD callback, must give the same weights
  after every load, as ComfyUI's own ``ModelPatcher`` does;
* the multi-GPU path may run the model calls of one sampling run in threads: a run's current call is per thread.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import comfy_library
from benchmarks.models import bench_files
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import BlockWidth, WanDims

# The bench's cached tiny student (the same files as tests/nodes/test_routing_fastpath.py: one ComfyUI per process, and
# the model folder it registers resolves the shared names).
DIMS = WanDims(dim=256, num_heads=2, ffn_dim=512, num_layers=4, text_dim=4096)
LAZY = WanDims(dim=128, num_heads=4, ffn_dim=256, num_layers=3, text_dim=4096)  # for the unmaterialised build


@pytest.fixture(scope="module")
def lib():
    comfy = comfy_library.load_comfy("cpu")
    files = bench_files(DIMS, 0.5, 0.7)
    comfy.add_model_folder("diffusion_models", files.folder)
    return comfy, files


def pack(name: str):
    return sys.modules[f"{comfy_library.PACK_MODULE}.nodes.{name}"]


def test_pruned_blocks_build_when_operations_leave_weights_unmaterialised(lib):
    import comfy.ldm.wan.model as wan
    import comfy.ops

    class LazyOps(comfy.ops.disable_weight_init):
        class Linear(comfy.ops.disable_weight_init.Linear):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.weight = None  # as DynamicVRAM: materialised only when the state dict loads

    widths = [BlockWidth((2,), tuple(range(96))), BlockWidth((0, 1, 3), tuple(range(256))),
              BlockWidth((0, 1, 2, 3), tuple(range(0, 64, 2)))]
    factory = pack("wan_model").PrunedBlockFactory(widths)
    model = wan.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=LAZY.dim,
                         ffn_dim=LAZY.ffn_dim, freq_dim=256, text_dim=LAZY.text_dim, out_dim=16,
                         num_heads=LAZY.num_heads, num_layers=3, wan_attn_block_class=factory, operations=LazyOps)
    head_dim = LAZY.dim // LAZY.num_heads
    for block, width in zip(model.blocks, widths):
        attn = block.self_attn
        assert attn.q.weight is None and attn.num_heads == width.num_heads
        assert (attn.q.out_features, attn.o.in_features) == (width.num_heads * head_dim,) * 2
        assert block.ffn[0].out_features == width.ffn_dim and block.ffn[2].in_features == width.ffn_dim
    # The factory wraps around: a second build of the same model (a clone re-creating it) gets the same widths.
    again = wan.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=LAZY.dim,
                         ffn_dim=LAZY.ffn_dim, freq_dim=256, text_dim=LAZY.text_dim, out_dim=16,
                         num_heads=LAZY.num_heads, num_layers=3, wan_attn_block_class=factory, operations=LazyOps)
    assert [b.ffn[0].out_features for b in again.blocks] == [w.ffn_dim for w in widths]


def _modulation_lora(tmp_path, num_blocks: int) -> tuple[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    deltas = {f"blocks.{i}.modulation": torch.randn(1, 6, DIMS.dim, generator=gen) / 8 for i in range(num_blocks)}
    sd = {f"diffusion_model.{k.removesuffix('.modulation')}.diff_m": v for k, v in deltas.items()}
    path = tmp_path / "modulation_lora.safetensors"
    save_atomic(path, sd, {"format": "pt"})
    return str(path), deltas


def test_modulation_lora_survives_a_patcher_that_restores_weights_on_every_load(lib, tmp_path):
    lib_comfy, files = lib
    model_patcher, utils = sys.modules["comfy.model_patcher"], sys.modules["comfy.utils"]
    student = comfy_library.pare_unet(lib_comfy, files.student)
    path, deltas = _modulation_lora(tmp_path, DIMS.num_layers)
    original = {k: student.model.diffusion_model.get_parameter(k).detach().clone() for k in deltas}
    patched, added, _ = pack("lora").apply_lora(student, path, 0.5)
    assert added == len(deltas)

    class RestoringPatcher(model_patcher.ModelPatcher):
        """The newer ModelPatcherDynamic's order: put every backed-up weight back, then load (ON_LOAD fires)."""

        def load(self, *args, **kwargs):
            for key, saved in self.backup.items():
                utils.set_attr_param(self.model, key, saved.weight)
            return super().load(*args, **kwargs)

    for cls in (model_patcher.ModelPatcher, RestoringPatcher):
        m = patched.clone()
        m.__class__ = cls
        for _ in range(3):  # every load must give the same merged weights
            m.load(torch.device("cpu"), full_load=True)
            for key, delta in deltas.items():
                got = m.model.diffusion_model.get_parameter(key)
                torch.testing.assert_close(got, original[key] + 0.5 * delta, rtol=0, atol=1e-6)
        m.unpatch_model()
        for key in deltas:
            assert torch.equal(m.model.diffusion_model.get_parameter(key), original[key]), cls.__name__


def test_a_routing_run_keeps_its_current_call_per_thread(lib):
    comfy, files = lib
    routing, hooks = pack("routing"), pack("hooks")
    student = comfy_library.pare_unet(comfy, files.student)
    template = routing.RoutingTemplate(routing.ScheduleDecider(()), pack("model_info").model_meta(student))
    run = template.start_run(student.get_model_object("model_sampling"), None)
    barrier, seen, errors = threading.Barrier(2), {}, []

    def call(rows: int) -> None:
        try:
            info = hooks.CallInfo(sigma=torch.full((rows,), 0.5, dtype=torch.float64), rows=rows, branches=[0],
                                  grid=(1, 2, 2), timestep=torch.full((rows,), 500.0), context=None)
            run.begin_call(info)
            barrier.wait(timeout=10)  # both calls are open at once
            seen[rows] = run.current.rows
            run.decide(0, torch.zeros(rows, 4, DIMS.dim))
            barrier.wait(timeout=10)
            run.end_call()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen == {1: 1, 2: 2}
    assert sorted(c.rows for c in run.calls) == [1, 2] and all(c.run_rows is not None for c in run.calls)
