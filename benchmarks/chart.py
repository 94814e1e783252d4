"""PNG chart of a throughput.py run (PIL only, no plotting library).

Three panels of horizontal bars, one per measured section:
- whole steps: images/s per variant, grouped by (step, model, batch);
- kernels: our speedup over eager and over torch.compile, forward+backward, per case
  (GPU time when the run has CUDA-graph timings, wall time otherwise), with a line at 1x;
- attention: forward+backward milliseconds per backend and shape (shorter is faster).
"""

import os

from PIL import Image, ImageDraw

WIDTH = 1200
LABEL_WIDTH = 430  # text left of the bars
BAR_HEIGHT = 14
GAP = 4
TITLE_HEIGHT = 28
COLOURS = {"reference": (127, 127, 127), "compile": (31, 119, 180), "fast": (214, 39, 40),
           "fast_compile": (148, 103, 189), "x eager": (44, 160, 44), "x compile": (31, 119, 180),
           "attention": (255, 127, 14)}


def _step_bars(rows):
    bars = []
    groups = []
    for r in rows:
        if r.get("section") == "steps" and (r["step"], r["model"], r.get("batch")) not in groups:
            groups.append((r["step"], r["model"], r.get("batch")))
    for step, model, batch in groups:
        members = [r for r in rows if r.get("section") == "steps"
                   and (r["step"], r["model"], r.get("batch")) == (step, model, batch)]
        bars.append(("header", f"{'REPA-E' if step == 'repae' else 'LDM-only'} step, {model}, batch {batch}"))
        for r in members:
            if "error" in r:
                bars.append(("bar", r["variant"], 0.0, f"error: {r['error'][:60]}", COLOURS.get(r["variant"])))
                continue
            text = f"{r['images_per_s']:.1f} img/s"
            if r.get("speedup_vs_reference"):
                text += f"  {r['speedup_vs_reference']:.2f}x ref"
            if r.get("mfu"):
                text += f"  MFU {100 * r['mfu']:.1f}%"
            bars.append(("bar", r["variant"], r["images_per_s"], text, COLOURS.get(r["variant"])))
    return bars


def _kernel_bars(rows):
    kernels = next((r["results"] for r in rows if r.get("section") == "kernels"), None)
    if not kernels:
        return [], ""
    timing = "graph_" if any(c.get("ours_graph_ms_fwd_bwd") for c in kernels["cases"]) else ""
    bars = []
    for c in kernels["cases"]:
        bars.append(("header", f"{c['op']} {c['case']}"))
        for base in ("eager", "compile"):
            value = c.get(f"{timing}speedup_vs_{base}_fwd_bwd")
            if value:
                bars.append(("bar", f"x {base}", value, f"{value:.2f}x", COLOURS[f"x {base}"]))
    return bars, "GPU time" if timing else "wall time"


def _attention_bars(rows):
    bars = []
    shapes = []
    for r in rows:
        if r.get("section") != "attention":
            continue
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
            batch, heads, tokens, head_dim = r["shape"]
            bars.append(("header", f"batch {batch}, {heads} heads x {head_dim}, {tokens} tokens"))
        label = r["backend"]
        if "error" in r:
            bars.append(("bar", label, 0.0, "unavailable", COLOURS["attention"]))
        else:
            bars.append(("bar", label, r["median_ms"], f"{r['median_ms']:.3f} ms", COLOURS["attention"]))
    return bars


def _panel_height(bars):
    return TITLE_HEIGHT + sum(BAR_HEIGHT + GAP for _ in bars) + 2 * GAP if bars else 0


def _group_maxima(bars):
    """The largest bar value under each header (so each group fills the width)."""
    maxima, current = [], 0.0
    for bar in bars:
        if bar[0] == "header":
            maxima.append(current)
            current = 0.0
        else:
            current = max(current, bar[2])
    maxima.append(current)
    return maxima[1:] if bars and bars[0][0] == "header" else maxima


def _draw_panel(draw, top, title, bars, unit_line=None, per_group=False):
    """Draws one panel from y=top and returns the y below it. ``unit_line`` marks a value
    (1.0 for speedups) with a vertical line; ``per_group`` scales each header's bars alone."""
    draw.text((8, top + 6), title, fill="black")
    y = top + TITLE_HEIGHT
    values = [b[2] for b in bars if b[0] == "bar"] + ([unit_line] if unit_line else [])
    largest = max(values) if values and max(values) > 0 else 1.0
    group_maxima = iter(_group_maxima(bars))
    span = WIDTH - LABEL_WIDTH - 150  # room for the value text right of the longest bar
    for bar in bars:
        if bar[0] == "header":
            draw.text((8, y), bar[1], fill="black")
            if per_group:
                largest = next(group_maxima) or 1.0
        else:
            _, label, value, text, colour = bar
            draw.text((24, y), label, fill="black")
            length = int(span * value / largest)
            if length > 0:
                draw.rectangle([LABEL_WIDTH, y + 1, LABEL_WIDTH + length, y + BAR_HEIGHT - 1], fill=colour)
            draw.text((LABEL_WIDTH + length + 6, y), text, fill="black")
        y += BAR_HEIGHT + GAP
    if unit_line:
        x = LABEL_WIDTH + int(span * unit_line / largest)
        draw.line([x, top + TITLE_HEIGHT - 4, x, y], fill=(0, 0, 0), width=1)
        draw.text((x + 3, top + TITLE_HEIGHT - 14), f"{unit_line:g}x", fill="black")
    return y + 2 * GAP


def draw_throughput_chart(rows, meta, path):
    """Writes the chart of ``rows`` (throughput.py's result rows) to ``path``; returns it."""
    step_bars = _step_bars(rows)
    kernel_bars, kernel_timing = _kernel_bars(rows)
    attention_bars = _attention_bars(rows)
    height = TITLE_HEIGHT + sum(_panel_height(b) for b in (step_bars, kernel_bars, attention_bars)) + GAP
    image = Image.new("RGB", (WIDTH, max(height, 2 * TITLE_HEIGHT)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), f"repa_e_fast throughput: {meta.get('device', '?')}, {meta.get('date', '?')}, "
                      f"torch {meta.get('torch', '?')}", fill="black")
    y = TITLE_HEIGHT
    if step_bars:
        y = _draw_panel(draw, y, "Whole training steps: images/s (longer is faster)", step_bars, per_group=True)
    if kernel_bars:
        y = _draw_panel(draw, y, f"Fused kernels, forward+backward: our speedup ({kernel_timing})", kernel_bars,
                        unit_line=1.0)
    if attention_bars:
        _draw_panel(draw, y, "Attention, forward+backward: ms (shorter is faster)", attention_bars, per_group=True)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
