"""The guidance-response curves drawn with Pillow alone: prediction response left, modulation response right."""
from __future__ import annotations

from PIL import Image, ImageDraw

from .guidance_response import Curve

PANEL_W, PANEL_H, MARGIN, TOP = 480, 360, 52, 56
COLOURS = {"base": (30, 90, 200), "with LoRA": (220, 110, 20)}


def _panel(draw: ImageDraw.ImageDraw, left: int, title: str, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    x0, y0 = left + MARGIN, TOP + 24
    x1, y1 = left + PANEL_W - 16, TOP + PANEL_H - 36
    xs = [g for gs, _ in curves.values() for g in gs]
    high = max([r for _, rs in curves.values() for r in rs] + [1e-12]) * 1.1
    g_low, g_high = min(xs), max(xs)
    g_span = (g_high - g_low) or 1.0

    def point(g: float, r: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (g - g_low) / g_span, y1 - (y1 - y0) * r / high

    draw.text((x0, TOP), title, fill="black")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for g in sorted(set(xs)):
        x, _ = point(g, 0)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 8, y1 + 8), f"{g:g}", fill="black")
    draw.text(((x0 + x1) // 2 - 24, y1 + 22), "guidance", fill="black")
    draw.text((left + 4, y0 - 6), f"{high:.3g}", fill="black")
    draw.text((left + 4, y1 - 6), "0", fill="black")
    for label, (gs, rs) in curves.items():
        pts = [point(g, r) for g, r in zip(gs, rs)]
        colour = COLOURS[label]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def draw_response(base: Curve, other: Curve | None, verdict: str) -> Image.Image:
    """Both curves (base blue, with LoRA orange) per panel, a legend, and the verdict as the title."""
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + TOP), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 10), verdict, fill="black")
    named = {"base": base, **({"with LoRA": other} if other is not None else {})}
    for i, (label, colour) in enumerate((k, COLOURS[k]) for k in named):
        x = MARGIN + 140 * i
        draw.rectangle([x, 32, x + 14, 44], fill=colour)
        draw.text((x + 20, 32), label, fill="black")
    _panel(draw, 0, "prediction: |v(g) - v(1)| / |v(1)|",
           {k: (c.guidances, c.prediction) for k, c in named.items()})
    _panel(draw, PANEL_W, "modulation vectors: |m(g) - m(1)| / |m(1)|",
           {k: (c.guidances, c.modulation) for k, c in named.items()})
    return image
