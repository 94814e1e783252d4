"""What a run leaves for its user: metrics (JSONL, TensorBoard, Weights & Biases; the logged
values averaged over ranks by ``reduce_logs``), sample grids (``sample_grid``: EMA samples,
raw and as a readable sheet: upscaled, labelled by class, reconstructions beside) and loss
curves (one panel per loss family, smoothed over faint raw values) as PNG files. Rank 0 only;
every writer is optional but JSONL (``write_optional``)."""

import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from .runtime import Runtime, log

LOGGED_CURVES = ("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")


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


# --------------------------------------------------------------------------- readable figures

LOSS_FAMILIES = {  # one panel each (losses of one scale); keys not listed get a panel of their own
    "SiT (denoising)": ("sit_loss", "denoising_loss"),
    "REPA alignment (negative cosine)": ("proj_loss", "vae_align_loss"),
    "VAE": ("vae_loss",),
    "discriminator": ("d_loss",),
}
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) inside [low, high]."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value / step) * step)
        value += step
    return ticks


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (0.05 -> 2, 2.5 -> 1, 100 -> 0)."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step / 10 ** -decimals - round(step / 10 ** -decimals)) > 1e-6:  # e.g. 0.25
        decimals += 1
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard draws it)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def loss_families(keys: Sequence[str]) -> Dict[str, List[str]]:
    families = {}
    for key in keys:
        family = next((name for name, members in LOSS_FAMILIES.items() if key in members), key)
        families.setdefault(family, []).append(key)
    return families


def plot_loss_curves(records: Sequence[dict], keys: Sequence[str], path: Path, size=(900, 520),
                     families: Optional[Dict[str, Sequence[str]]] = None) -> Path:
    """Loss curves, one panel per family of losses (``LOSS_FAMILIES``): the smoothed series
    in full colour over the raw one drawn faint, round tick values (PIL only)."""
    width, height = size
    families = {name: list(members) for name, members in (families or loss_families(keys)).items()}
    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key]) and isinstance(r.get("step"), (int, float))]
        if points:
            series[key] = points
    panels = [(name, [k for k in members if k in series]) for name, members in families.items()]
    panels = [(name, members) for name, members in panels if members]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    left, right, top, bottom, gap = 64, 16, 8, 40, 26
    if not panels:
        draw.rectangle([left, top + 20, width - right, height - bottom], outline="black")
        draw.text((left + 10, top + 30), "no finite values logged", fill="black", font=font)
        return _save_png(image, path)
    steps = [s for points in series.values() for s, _ in points]
    x_ticks = nice_ticks(min(steps), max(steps), 6)
    x0, x1 = min(x_ticks[0], min(steps)), max(x_ticks[-1], max(steps))
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x1 + 1)
    panel_height = (height - top - bottom - gap * (len(panels) - 1)) / len(panels)
    colour_of = {key: _COLOURS[i % len(_COLOURS)] for i, key in enumerate(series)}
    for index, (name, members) in enumerate(panels):
        p_top = top + index * (panel_height + gap) + 18
        p_bottom = top + index * (panel_height + gap) + panel_height
        values = [v for k in members for _, v in series[k]]
        y_ticks = nice_ticks(min(values), max(values), 4)
        y0, y1 = min(y_ticks[0], min(values)), max(y_ticks[-1], max(values))
        y0, y1 = (y0, y1) if y1 > y0 else (y0 - 1, y1 + 1)

        def to_pixel(step, value):
            return (left + (step - x0) / (x1 - x0) * (width - left - right),
                    p_bottom - (value - y0) / (y1 - y0) * (p_bottom - p_top))

        draw.text((left, p_top - 18), name, fill="black", font=font)
        y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
        for tick in y_ticks:
            _, y = to_pixel(x0, tick)
            draw.line([left, y, width - right, y], fill=(232, 232, 232))
            draw.text((left - 6, y), tick_label(tick, y_step), fill="black", font=small, anchor="rm")
        draw.rectangle([left, p_top, width - right, p_bottom], outline="black")
        for key in members:
            colour = colour_of[key]
            faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
            raw = [to_pixel(s, v) for s, v in series[key]]
            smoothed = [to_pixel(s, v) for (s, _), v in zip(series[key], smooth([v for _, v in series[key]]))]
            if len(raw) > 1:
                draw.line(raw, fill=faint, width=1)
                draw.line(smoothed, fill=colour, width=2)
            else:
                x, y = raw[0]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_x = width - right
        for key in reversed(members):  # right-aligned legend above the panel
            legend_x -= draw.textlength(key, font=small) + 24
            draw.line([legend_x, p_top - 9, legend_x + 14, p_top - 9], fill=colour_of[key], width=3)
            draw.text((legend_x + 18, p_top - 9), key, fill="black", font=small, anchor="lm")
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    for tick in x_ticks:
        x = left + (tick - x0) / (x1 - x0) * (width - left - right)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x, height - bottom + 6), tick_label(tick, x_step), fill="black", font=small, anchor="mt")
    draw.text((width // 2, height - 6), "step (faint: raw, bold: smoothed)", fill="black", font=small, anchor="mb")
    return _save_png(image, path)


def save_sample_sheet(images: torch.Tensor, path: Path, labels: Optional[Sequence[int]] = None,
                      columns: Optional[int] = None, title: str = "", cell: int = 128,
                      reconstructions: Optional[tuple] = None,
                      class_names: Optional[Dict[int, str]] = None) -> Path:
    """A sheet a person can judge at a glance: uint8 ``[N, 3, H, W]`` samples upscaled
    (nearest neighbour, to about ``cell`` px) with their class under each, and optionally
    ``reconstructions = (real, reconstructed)`` (two uint8 ``[M, 3, H, W]``) as a second
    section, real images above their reconstructions."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    count, _, h, w = images.shape
    scale = max(1, math.ceil(cell / max(h, w)))
    cw, ch = w * scale, h * scale
    columns = columns or int(math.ceil(math.sqrt(count)))
    font, small = _font(16), _font(12)
    pad, caption, heading = 6, 16 if labels is not None else 0, 26 if title else 0

    def tiles(batch):
        return [Image.fromarray(t.permute(1, 2, 0).numpy()).resize((cw, ch), Image.NEAREST) for t in batch]

    def name(label):
        label = int(label)
        return (class_names or {}).get(label, f"class {label}")

    rows = math.ceil(count / columns)
    sections_height = heading + rows * (ch + caption + pad)
    pairs = 0
    if reconstructions is not None:
        real, recon = (t.detach().cpu() for t in reconstructions)
        if real.shape != recon.shape or real.dtype != torch.uint8 or recon.dtype != torch.uint8:
            raise ValueError("reconstructions must be two uint8 tensors of one shape")
        pairs = real.shape[0]
        pair_rows = math.ceil(pairs / columns)
        sections_height += 26 + pair_rows * (2 * ch + pad + 4)
    recon_heading = "VAE reconstructions (top: real, bottom: reconstructed)"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [title] + ([recon_heading] if pairs else [])
    width = max([pad + columns * (cw + pad)] + [int(measure.textlength(t, font=font)) + 2 * pad for t in texts])
    sheet = Image.new("RGB", (width, sections_height + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), title, fill="black", font=font)
        y += heading
    for index, tile in enumerate(tiles(images)):
        r, c = divmod(index, columns)
        x, ty = pad + c * (cw + pad), y + r * (ch + caption + pad)
        sheet.paste(tile, (x, ty))
        if labels is not None:
            draw.text((x + cw / 2, ty + ch + 2), name(labels[index]), fill="black", font=small, anchor="mt")
    y += rows * (ch + caption + pad)
    if pairs:
        draw.text((pad, y), recon_heading, fill="black", font=font)
        y += 26
        for index, (a, b) in enumerate(zip(tiles(real), tiles(recon))):
            r, c = divmod(index, columns)
            x, ty = pad + c * (cw + pad), y + r * (2 * ch + pad + 4)
            sheet.paste(a, (x, ty))
            sheet.paste(b, (x, ty + ch + 2))
    return _save_png(sheet, path)


def _save_png(image: Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def reduce_logs(logs: Dict[str, torch.Tensor], runtime: Runtime) -> Dict[str, float]:
    """The step's logged tensors averaged over ranks (collective), as floats."""
    keys = sorted(k for k, v in logs.items() if torch.is_tensor(v))
    if not keys:
        return {}
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).to(runtime.device)
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= runtime.world_size
    return dict(zip(keys, values.tolist()))


@torch.no_grad()
def sample_grid(config, runtime: Runtime, models, step: int, directory: Path,
                real_images: Optional[torch.Tensor] = None) -> Path:
    """EMA samples, fixed noise and labels (a private generator: the training RNG streams are
    untouched, so sampling never changes the run). With ``real_images`` (uint8, a training
    batch), the readable sheet also shows their VAE reconstructions."""
    from repa_e_fast.sampling import denormalize_latents, euler_sampler

    ema, vae = models["ema"], models["vae"]
    count = config.sample_grid_size
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(count, config.latent_channels, config.latent_size, config.latent_size, generator=generator)
    labels = torch.arange(count) % config.num_classes
    was_training = vae.training
    ema.eval()
    vae.eval()
    latents = euler_sampler(ema, noise.to(runtime.device), labels.to(runtime.device),
                            num_steps=config.sample_num_steps, cfg_scale=config.sample_cfg_scale,
                            path_type=config.path_type)
    stats = ema.extract_latents_stats()
    z = denormalize_latents(latents.float(), stats["latents_scale"], stats["latents_bias"])
    images = vae.decode(z).sample
    reconstructions = None
    if real_images is not None:
        real = real_images[:8].to(runtime.device)
        decoded = vae.decode(vae.encode(real.float() / 127.5 - 1).mean).sample
        reconstructions = (real.cpu(), torch.clamp(255 * (decoded + 1) / 2, 0, 255).to(torch.uint8).cpu())
    vae.train(was_training)
    images = torch.clamp(255 * (images + 1) / 2, 0, 255).to(torch.uint8)  # official truncating cast
    # Labels cycle through the classes, so with a multiple of num_classes each column is one class.
    columns = config.num_classes if count % config.num_classes == 0 and config.num_classes <= 16 else None
    grid = save_image_grid(images, directory / f"samples_{step:07d}.png", columns=columns)
    # The same samples upscaled and labelled by class, for a person to look at.
    save_sample_sheet(images, directory / f"samples_{step:07d}_sheet.png", labels=labels.tolist(), columns=columns,
                      title=f"EMA samples, step {step}", reconstructions=reconstructions)
    return grid


def write_optional(runtime: Runtime, what: str, write) -> Optional[Path]:
    """Sample grids and the loss plot are optional: a full or read-only disk there is a
    warning and training goes on (checkpoints have their own error path: exit 2, the
    previous checkpoint intact)."""
    try:
        return write()
    except OSError as error:
        log(runtime, f"warning: could not write the {what} ({error.strerror or error}); training continues")
        return None
