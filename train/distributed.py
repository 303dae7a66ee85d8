"""accelerate setup: DDP by default (whatever `accelerate launch` configured), FSDP on request."""

from __future__ import annotations

import logging
import os

from pathlib import Path

import torch

from fastenc.errors import ConfigError

from .config import TrainConfig


def use_cpu(cfg: TrainConfig) -> bool:
    """``run.cpu``, or no accelerator at all (accelerate then forms a multi-process gloo group only when
    told cpu=True, e.g. under ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine)."""
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return cfg.run.cpu or not has_accel


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.run.output_dir)
    kwargs: dict = {"mixed_precision": cfg.run.mixed_precision, "cpu": use_cpu(cfg),
                    "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}
    if cfg.run.log_with:
        import importlib.util

        if "tensorboard" in cfg.run.log_with and not (importlib.util.find_spec("tensorboard")
                                                      or importlib.util.find_spec("tensorboardX")):
            raise ConfigError("run.log_with=['tensorboard'] needs the tensorboard package (pip install tensorboard)")
        kwargs["log_with"] = list(cfg.run.log_with)
    if cfg.run.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        if cfg.optim.ema_decay is not None:
            raise ConfigError("optim.ema_decay with run.distributed=fsdp is not supported (EMA keeps full weights)")
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
            use_orig_params=True, state_dict_type="FULL_STATE_DICT")
    return Accelerator(**kwargs)


def setup_logging() -> None:
    """INFO on the main process (RANK 0), warnings only elsewhere: one log per run, not one per GPU."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
