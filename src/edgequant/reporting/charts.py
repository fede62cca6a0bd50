"""Static SVG charts, drawn here so that a report or certificate opens anywhere without a script
or a network: a scatter of candidates with their Pareto front, and horizontal bars."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # written beside the point
    title: str  # the tooltip
    classes: str = "point"  # CSS classes of the circle
    on_front: bool = False  # joined by the front's line


def scatter(points: list[Point], x_label: str, y_label: str, *, log_y: bool = False, chart_id: str = "",
            width: int = 520, height: int = 340) -> str:
    """The points on linear axes (y on a log10 scale with `log_y`), the front as a line through
    the points on it, left to right."""
    if not points:
        return "<p>No measured candidates.</p>"
    left, bottom, top, right = 60, 40, 16, 80  # room on the right for the last point's label
    ys = [math.log10(max(p.y, 1e-7)) if log_y else p.y for p in points]
    x_max = max(p.x for p in points) * 1.05 or 1.0
    y_min = min(ys) if log_y else 0.0
    y_max = max(ys) + (0.1 * abs(max(ys)) or 1.0) if log_y else max(max(ys), 1.0) * 1.1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + x / x_max * (width - left - right),
                height - bottom - (y - y_min) / ((y_max - y_min) or 1.0) * (height - bottom - top))

    parts = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="{(width + left) / 2}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>',
             f'<text x="14" y="{(height - bottom) / 2}" transform="rotate(-90 14 {(height - bottom) / 2})" '
             f'text-anchor="middle">{html.escape(y_label)}</text>']
    for i in range(5):
        y_tick, x_tick = y_min + (y_max - y_min) * i / 4, x_max * i / 4
        tick = f"1e{y_tick:.1f}" if log_y else f"{y_tick:.1f}"
        parts.append(f'<text x="{left - 6}" y="{at(0, y_tick)[1] + 4:.1f}" text-anchor="end">{tick}</text>')
        parts.append(f'<text x="{at(x_tick, y_min)[0]:.1f}" y="{height - bottom + 14}" text-anchor="middle">{x_tick:.0f}</text>')
    front = sorted((p.x, y) for p, y in zip(points, ys) if p.on_front)
    if front:
        path = " ".join(f"{'L' if i else 'M'}{at(x, y)[0]:.1f},{at(x, y)[1]:.1f}" for i, (x, y) in enumerate(front))
        parts.append(f'<path class="pareto-front" d="{path}"/>')
    for p, y in zip(points, ys):
        cx, cy = at(p.x, y)
        parts.append(f'<circle class="{p.classes}" cx="{cx:.1f}" cy="{cy:.1f}" r="5"><title>{html.escape(p.title)}</title></circle>')
        parts.append(f'<text x="{cx + 7:.1f}" y="{cy - 5:.1f}">{html.escape(p.label)}</text>')
    return (f'<svg id="{chart_id}" width="{width}" height="{height}" role="img" aria-label="{html.escape(y_label)} '
            f'against {html.escape(x_label)}">{"".join(parts)}</svg>')


def bars(rows: list[tuple[str, float, str]], title: str, *, chart_id: str = "", width: int = 520) -> str:
    """One bar per (label, value, CSS classes) row, the longest at full width."""
    row_height, left, right = 20, 130, 70
    height = len(rows) * row_height + 30
    most = max((value for _, value, _ in rows), default=0.0) or 1.0
    parts = [f'<text x="{left}" y="12">{html.escape(title)}</text>']
    for i, (label, value, classes) in enumerate(rows):
        y, length = 20 + i * row_height, (width - left - right) * value / most
        parts += [f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>',
                  f'<rect class="{classes}" x="{left}" y="{y + 2}" width="{max(length, 1):.1f}" height="{row_height - 6}"/>',
                  f'<text x="{left + length + 4:.1f}" y="{y + 13}">{value:.1f}</text>']
    return (f'<svg id="{chart_id}" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'{"".join(parts)}</svg>')
