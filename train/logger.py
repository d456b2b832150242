"""What a run shows and records: TensorBoard scalars, a progress bar or plain lines, image grids.

Only rank 0 makes a :class:`RunLogger` with ``enabled=True``; the others get a silent one.

* ``tb/``: every scalar the trainer hands over (all loss-log keys, learning rates,
  ``disc_factor``, codebook usage / perplexity, images/s), at its global step;
* the terminal: a tqdm bar with the loss and images/s when stderr is a TTY, otherwise one
  plain line every ``log_every`` steps (readable in CI logs and ``nohup`` files); every
  line also goes to ``log.txt`` in the run folder;
* ``images/step-N.png``: a two-row grid, inputs on top, reconstructions below.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, Optional

import torch

from train import atomic

# Keys shown on the bar / plain line, in this order, when present (the rest go to TB only).
SHOWN = ("total_loss", "rec_loss", "nll_loss", "p_loss", "quant_loss", "latent_loss", "dino_loss",
         "g_loss", "disc_loss")


def _short(key: str) -> str:
    return key.split("/", 1)[-1]


def format_scalars(values: Dict[str, float]) -> str:
    parts = []
    for name in SHOWN:
        for key, value in values.items():
            if _short(key) == name and key.startswith("train/"):
                parts.append(f"{name} {value:.4g}")
    for key in ("codebook/usage", "perf/images_per_s"):
        if key in values:
            parts.append(f"{_short(key)} {values[key]:.3g}")
    return " | ".join(parts)


class RunLogger:
    def __init__(self, run_dir: Optional[str], enabled: bool = True, total_steps: Optional[int] = None,
                 start_step: int = 0, use_bar: Optional[bool] = None):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.writer = None
        self.bar = None
        self.log_file = None
        self.total_steps = total_steps
        self.t0 = time.time()
        if not self.enabled:
            return
        os.makedirs(os.path.join(run_dir, "images"), exist_ok=True)
        self.log_file = open(os.path.join(run_dir, "log.txt"), "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step or None)
        if use_bar is None:
            use_bar = sys.stderr.isatty()
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    # ---- text --------------------------------------------------------------------------
    def message(self, text: str) -> None:
        """A line for the user (printed on rank 0 only, and kept in log.txt)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)
        if self.log_file is not None:
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def progress(self, step: int, values: Dict[str, float], log_step: bool) -> None:
        """Advance the bar (every step); a plain line on log steps when there is no bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if log_step:
                loss = next((v for k, v in values.items() if _short(k) == "total_loss"), None)
                post = {}
                if loss is not None:
                    post["loss"] = f"{loss:.4g}"
                if "perf/images_per_s" in values:
                    post["img/s"] = f"{values['perf/images_per_s']:.1f}"
                self.bar.set_postfix(post, refresh=False)
        if log_step:
            total = f"/{self.total_steps}" if self.total_steps else ""
            line = f"step {step}{total} | {format_scalars(values)}"
            if self.bar is None:
                print(line, flush=True)
            if self.log_file is not None:
                self.log_file.write(line + "\n")
                self.log_file.flush()

    # ---- TensorBoard -------------------------------------------------------------------
    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    # ---- images ------------------------------------------------------------------------
    def image_grid(self, step: int, inputs: torch.Tensor, reconstructions: torch.Tensor,
                   max_images: int = 8, name: Optional[str] = None) -> Optional[str]:
        """Save inputs (top row) over reconstructions (bottom row) as PNG; returns its path."""
        if not self.enabled:
            return None
        path = os.path.join(self.run_dir, "images", name or f"step-{step:07d}.png")
        grid = save_grid(inputs, reconstructions, path, max_images)
        if self.writer is not None:
            self.writer.add_image("reconstructions", grid, step)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def save_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str, max_images: int = 8) -> torch.Tensor:
    """Write a PNG grid of images in [-1, 1] (inputs above reconstructions), atomically."""
    from torchvision.utils import make_grid, save_image

    n = min(max_images, inputs.shape[0])
    both = torch.cat([inputs[:n], reconstructions[:n]]).detach().float().cpu()
    both = ((both.clamp(-1, 1) + 1) / 2)[:, :3]
    grid = make_grid(both, nrow=n, padding=2, pad_value=1.0)
    with atomic.replacing(path) as tmp:
        save_image(grid, tmp, format="png")  # the temporary name has no .png suffix to go by
    return grid


__all__ = ["RunLogger", "save_grid", "format_scalars"]
