"""What a run leaves for its user: metrics (JSONL, TensorBoard, Weights & Biases), sample
grids and a loss curve as PNG files. Rank 0 only; every writer is optional but JSONL."""

import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


class MetricsLogger:
    def __init__(self, directory: Path, report_to: str = "jsonl", config: Optional[dict] = None,
                 wandb_project: str = "repa-e-fast", run_name: str = "run", resume: bool = False,
                 wandb_run_id: Optional[str] = None, resume_step: Optional[int] = None):
        """``wandb_run_id``: the W&B run to continue (a resumed training run stores it in its
        checkpoint); None starts a new one, whose id is then ``self.wandb_run_id``.
        ``resume_step``: TensorBoard drops the events logged after it by the interrupted run."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        # On resume, keep the lines up to the restored step only (a crash may have logged
        # steps that the checkpoint does not contain).
        self.handle = open(self.path, "a" if resume else "w")
        targets = {t.strip() for t in report_to.split(",") if t.strip()}
        unknown = targets - {"jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"report_to: unknown targets {sorted(unknown)} (use jsonl, tensorboard, wandb)")
        self.tensorboard = None
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume and resume_step is not None else None
                self.tensorboard = SummaryWriter(str(self.directory / "tensorboard"), purge_step=purge)
            except ImportError:
                warnings.warn("report_to includes tensorboard but it is not installed (pip install tensorboard)")
        if "wandb" in targets:
            try:
                import wandb

                # Files under the run folder (offline runs too: WANDB_MODE=offline, then `wandb sync`).
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, id=wandb_run_id,
                                        resume="allow", dir=str(self.directory))
                self.wandb_run_id = self.wandb.id
            except ImportError:
                warnings.warn("report_to includes wandb but it is not installed (pip install wandb)")

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (logged by a run that died before its next checkpoint)."""
        self.handle.close()
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut by a kill
        self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a")

    def log(self, step: int, values: Dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def log_image(self, step: int, name: str, path: Path) -> None:
        if self.tensorboard is not None:
            image = np.asarray(Image.open(path).convert("RGB"))
            self.tensorboard.add_image(name, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> List[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def save_image_grid(images: torch.Tensor, path: Path, columns: Optional[int] = None) -> Path:
    """uint8 [N,3,H,W] -> one PNG grid (atomic write)."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    count, _, height, width = images.shape
    columns = columns or int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index in range(count):
        r, c = divmod(index, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = images[index].permute(1, 2, 0).numpy()
    return _save_png(Image.fromarray(grid), path)


def plot_loss_curves(records: Sequence[dict], keys: Sequence[str], path: Path, size=(900, 520)) -> Path:
    """A plain line chart of ``keys`` against ``step`` (PIL only, no plotting library)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        if points:
            series[key] = points
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if not series:
        draw.text((left + 10, top + 10), "no finite values logged", fill="black")
        return _save_png(image, path)
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(values), max(values) if max(values) > min(values) else min(values) + 1

    def to_pixel(step, value):
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)
        return x, y

    for tick in range(5):
        value = y0 + (y1 - y0) * tick / 4
        _, y = to_pixel(x0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = x0 + (x1 - x0) * tick / 4
        x, _ = to_pixel(step, y0)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{int(step)}", fill="black")
    draw.text((width // 2 - 15, height - 20), "step", fill="black")
    for index, (key, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        pixels = [to_pixel(s, v) for s, v in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        else:
            x, y = pixels[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((left + 10 + 150 * index, 8), key, fill=colour)
    return _save_png(image, path)


def _save_png(image: Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
