"""API-format graph builders for the tests: small, explicit, one function per recurring sub-graph."""

from __future__ import annotations

import itertools

from scripts import tiny_assets as assets


class Graph:
    """An API-format prompt under construction; ``add`` returns the node id for wiring."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(next(self._ids))
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def to_json(self) -> dict:
        return self.nodes

    def find(self, class_type: str) -> str:
        ids = [k for k, v in self.nodes.items() if v["class_type"] == class_type]
        assert len(ids) == 1, f"{len(ids)} {class_type} nodes"
        return ids[0]


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def sample_graph(
    model_loader: tuple[str, dict],
    *,
    seed: int = 0,
    steps: int = 3,
    cfg: float = 3.0,
    sampler: str = "euler",
    scheduler: str = "simple",
    frames: int = 9,
    size: int = 64,
    shift: float = 5.0,
    variant: str = "t2v",
    model_patches: list[tuple[str, dict]] = (),
    prefix: str = "pare_test",
    positive: str = assets.POSITIVE,
    negative: str = assets.NEGATIVE,
    patch_model=None,
) -> tuple[Graph, str]:
    """Loader -> optional model patches -> ModelSamplingSD3 -> KSampler -> SaveLatent. Returns (graph, save node)."""
    # The KSampler's node id is available afterwards as graph.find("KSampler").
    g = Graph()
    cls, kwargs = model_loader
    model = g.add(cls, **kwargs)
    for patch_cls, patch_kwargs in model_patches:
        model = g.add(patch_cls, model=out(model), **patch_kwargs)
    if patch_model is not None:  # a callable (graph, model node id) -> new model node id, for multi-node patches
        model = patch_model(g, model)
    model = g.add("ModelSamplingSD3", model=out(model), shift=shift)
    pos = g.add("PARELoadConditioning", file=positive)
    neg = g.add("PARELoadConditioning", file=negative)
    if variant == "i2v":
        vae = g.add("VAELoader", vae_name=assets.VAE)
        image = g.add("EmptyImage", width=size, height=size, batch_size=1, color=0x4080C0)
        i2v = g.add("WanImageToVideo", positive=out(pos), negative=out(neg), vae=out(vae), width=size, height=size,
                    length=frames, batch_size=1, start_image=out(image))
        pos, neg, latent = out(i2v, 0), out(i2v, 1), out(i2v, 2)
    else:
        pos, neg = out(pos), out(neg)
        latent = out(g.add("EmptyHunyuanLatentVideo", width=size, height=size, length=frames, batch_size=1))
    sampled = g.add("KSampler", model=out(model), seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                    scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    save = g.add("SaveLatent", samples=out(sampled), filename_prefix=prefix)
    return g, save


def pare_loader(name: str, weight_dtype: str = "default") -> tuple[str, dict]:
    return "PARELoadPrunedWan", {"unet_name": name, "weight_dtype": weight_dtype}


def stock_loader(name: str, weight_dtype: str = "default") -> tuple[str, dict]:
    return "UNETLoader", {"unet_name": name, "weight_dtype": weight_dtype}


def chain(*hooks):
    """A ``patch_model`` hook for ``sample_graph`` that applies ``hooks`` in order (each: (graph, model) -> model)."""
    def patch(g, model):
        for hook in hooks:
            model = hook(g, model)
        return model
    return patch


def with_report(g, routed_model: str) -> tuple[str, str]:
    rep = g.add("PARERoutingReport", model=out(routed_model), samples=out(g.find("KSampler")))
    img = g.add("SaveImage", images=out(rep, 0), filename_prefix="pare_report")
    txt = g.add("PreviewAny", source=out(rep, 1))
    return img, txt


def routed_model_id(g) -> str:
    ids = [k for k, v in g.nodes.items() if v["class_type"] in ("PAREApplyRouter", "PAREStaticSchedule")]
    return ids[-1]
