"""Experiment tracking: mirror the rows of `metrics.jsonl` to Weights & Biases and/or TensorBoard (rank 0).

Both are optional packages: config.validate names a missing one before training starts, and with both options off
nothing is imported. wandb honours its own environment (WANDB_MODE=offline|disabled, WANDB_DIR, WANDB_API_KEY).

A resumed run (the same out_dir, train.resume) continues what the trackers show, as metrics.jsonl does, where the
rows after the resumed checkpoint are dropped and logged again. TensorBoard: `purge_step` hides the earlier
events from that step on. wandb: the run id kept in out_dir/wandb.json continues the same wandb run, and rows an
earlier process already sent are not sent again (wandb keeps a step's first values: steps must grow, and its
"rewind" is a server-side preview that offline runs cannot use). Resume is bit-exact, so those rows hold the same
losses; only their timings are the first attempt's. A resume with a changed config (say a lower train.lr) shows the
first attempt's rows up to the last step it logged; use another out_dir, or train.resume=false, for a new run.
"""
import html
import json
import os

from config import Config, dump, to_dict


class Tracker:
    """Sends each metrics row (a dict with `step`) to the enabled backends: numbers as scalars, strings as text;
    `close()` flushes them."""

    def __init__(self, cfg: Config, active: bool = True, resumed_step: int = 0):
        """Open the backends cfg.log switches on; `active=False` (ranks other than 0) opens none. `resumed_step`:
        the checkpoint's step; rows after it come again (see the module's docstring)."""
        self.wandb = self.tb = None
        out_dir = cfg.train.out_dir
        if active and cfg.log.wandb:
            import wandb
            self.sent_path, sent = os.path.join(out_dir, "wandb.json"), {}
            if cfg.train.resume:
                try:
                    with open(self.sent_path) as f:
                        sent = json.load(f)
                except (OSError, ValueError):
                    pass
            name = cfg.log.wandb_run_name or os.path.basename(os.path.normpath(out_dir))
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=name, tags=cfg.log.wandb_tags,
                                    config=to_dict(cfg), id=sent.get("id"), resume="allow")
            self.html = wandb.Html
            # A row's place: (step, n-th row of that step). Rows come in the same order after a resume, so those
            # at or before the last place an earlier process sent were sent then.
            self.sent, self.place = (sent.get("step", 0), sent.get("row", 0)), (0, 0)
            self._save_sent(self.sent)
        if active and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resumed_step + 1)
            self.tb.add_text("config", "```\n" + dump(cfg) + "```")  # fenced: TensorBoard renders Markdown

    def _save_sent(self, place: tuple[int, int]) -> None:
        # after each row sent: a small file replaced whole (no fsync: it has to outlive the process, not the node)
        with open(self.sent_path + ".tmp", "w") as f:
            json.dump({"id": self.wandb.id, "step": place[0], "row": place[1]}, f)
        os.replace(self.sent_path + ".tmp", self.sent_path)

    def log(self, row: dict) -> None:
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        texts = {k: v for k, v in row.items() if isinstance(v, str)}
        if self.wandb is not None:
            self.place = (step, self.place[1] + 1 if step == self.place[0] else 1)
            if self.place > self.sent:
                pages = {k: self.html(f"<pre>{html.escape(v)}</pre>") for k, v in texts.items()}  # a text panel
                self.wandb.log({**scalars, **pages}, step=step)
                self._save_sent(self.place)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            for k, v in texts.items():  # indented: a Markdown code block, whatever the text holds
                self.tb.add_text(k, "    " + v.replace("\n", "\n    "), step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
