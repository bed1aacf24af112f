"""``python -m training cache-targets --config stage.toml``: the teacher's velocity for every sample's fixed draws
(``data.target_draws``), computed once into ``data.target_cache`` (``training.targets``) for ``distill`` and
``route`` to read instead of running the teacher. Runs as one process or under torchrun (FSDP2 shards the
teacher as in training; each rank computes whole samples, in rounds so every rank runs the teacher equally often).
Existing cache files are overwritten.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .config import ConfigError, load_config
from .distill import DistillConfig
from .loop import set_determinism
from .parallel import barrier, shutdown
from .route import RouteConfig
from .stage_common import Stage, load_teacher_and_samples

logger = logging.getLogger(__name__)

HELP = "compute the teacher's targets for data.target_draws fixed draws per sample once, into data.target_cache"


def build_cache(cfg) -> int:
    """Write one cache file per sample; returns how many this rank wrote."""
    if cfg.data.target_cache is None or cfg.data.target_draws < 1:
        raise ConfigError("config fields 'data.target_draws' (> 0) and 'data.target_cache' are needed to cache targets")
    set_determinism(cfg.train)
    info, teacher, samples = load_teacher_and_samples(cfg)
    try:
        stage = Stage(cfg, info, teacher, teacher, None, samples)  # the teacher stands in for the student: unused
        n, written = len(samples), 0
        for start in range(0, n, info.world_size):
            i = start + info.rank
            item = samples[min(i, n - 1)]  # past the end: a repeat whose result is dropped, so the ranks stay in step
            velocity, sigma = [], []
            for j in range(cfg.data.target_draws):
                s, noise = stage.fixed_draw(item, j)
                velocity.append(stage.teacher_row(*stage.inputs([item], s, noise)).cpu())
                sigma.append(s)
            if i < n:
                stage.cache.write(item.path, item.sha256, torch.cat(velocity), torch.cat(sigma))
                written += 1
        logger.info("cached %d draws of %d samples in %s", cfg.data.target_draws, n, cfg.data.target_cache)
        barrier()
        return written
    finally:
        shutdown()


def load_stage_config(path: str, overrides: list[str]):
    """A stage-1 or stage-2 config (a [route] table makes it stage 2's)."""
    with open(path, "rb") as f:
        is_route = "route" in tomllib.load(f)
    return load_config(RouteConfig if is_route else DistillConfig, path, overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the distill or route config that will read the cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def run(args: argparse.Namespace) -> int:
    build_cache(load_stage_config(args.config, args.set))
    return 0
