"""A loss curve drawn with Pillow alone, returned as the trainer's IMAGE output."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 768, 384, 48


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_curve(losses: list[float], title: str) -> Image.Image:
    """Raw per-step loss in light grey, its moving average in blue, min/max on the y axis, steps on the x axis."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    finite = [v for v in losses if math.isfinite(v)]
    draw.text((MARGIN, 12), title, fill="black")
    if not finite:
        draw.text((MARGIN, HEIGHT // 2), "no finite loss values", fill="red")
        return image
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def point(i: int, v: float) -> tuple[float, float]:
        x = MARGIN + plot_w * (i / max(len(losses) - 1, 1))
        return x, MARGIN + plot_h * (1 - (v - low) / span)

    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    for series, colour in ((losses, (190, 190, 190)), (moving_average(losses, max(1, len(losses) // 20)), (30, 90, 200))):
        pts = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    draw.text((4, MARGIN - 6), f"{high:.4g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{low:.4g}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), "step 1", fill="black")
    draw.text((WIDTH - MARGIN - 60, HEIGHT - MARGIN + 8), f"step {len(losses)}", fill="black")
    return image
