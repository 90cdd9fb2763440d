"""Experiment tracking: mirror the rows of `metrics.jsonl` to Weights & Biases and/or TensorBoard (rank 0).

Both are optional packages: `check()` names a missing one before training starts, and with both options off
nothing is imported. wandb honours its own environment (WANDB_MODE=offline|disabled, WANDB_DIR, WANDB_API_KEY).
"""
import importlib.util
import os

from config import Config, ConfigError, dump, to_dict


def check(cfg: Config) -> None:
    """Raise ConfigError when a tracker is switched on but its package is not installed."""
    for option in ("wandb", "tensorboard"):  # the option's name is its package's name
        if getattr(cfg.log, option) and importlib.util.find_spec(option) is None:
            raise ConfigError(f"log.{option} is on but the {option} package is not installed: pip install {option}")


class Tracker:
    """Sends each metrics row (a dict with `step`) to the enabled backends; `close()` flushes them."""

    def __init__(self, cfg: Config, active: bool = True):
        """Open the backends cfg.log switches on; `active=False` (ranks other than 0) opens none."""
        self.wandb = self.tb = None
        out_dir = cfg.train.out_dir
        if active and cfg.log.wandb:
            import wandb
            name = cfg.log.wandb_run_name or os.path.basename(os.path.normpath(out_dir))
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=name, tags=cfg.log.wandb_tags,
                                    config=to_dict(cfg))
        if active and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            self.tb.add_text("config", "```\n" + dump(cfg) + "```")  # fenced: TensorBoard renders Markdown

    def log(self, row: dict) -> None:
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
