"""Charts as SVG strings, drawn on the server so the pages need no script library and no network. Pure.

Only presentation attributes are used (no `style`), so a strict Content-Security-Policy applies, and
every label is escaped: key and model names end up in the markup.
"""

from __future__ import annotations

from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
FONT = 'font-family="system-ui, sans-serif"'


def _num(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.0f}k"
    return f"{n:g}"


def stacked_bars(title: str, buckets: list[str], series: dict[str, list[int]], width: int = 640,
                 height: int = 220, tick_every: int = 1) -> str:
    """Stacked bars, one per bucket, one colour per series, with a legend; tooltips give exact values."""
    left, right, top, bottom = 44, 8, 24, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(1, len(buckets))
    totals = [sum(vals[i] for vals in series.values()) for i in range(len(buckets))]
    peak = max(totals, default=0) or 1
    bar_w = plot_w / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height + 18 * _legend_rows(series)}" '
             f'width="{width}" role="img" aria-label="{escape(title)}">',
             f'<title>{escape(title)}</title>',
             f'<text x="{left}" y="15" {FONT} font-size="13" font-weight="600" fill="#222">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 10}" {FONT} font-size="10" text-anchor="end" fill="#555">'
             f'{_num(peak)}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" {FONT} font-size="10" text-anchor="end" fill="#555">0</text>']
    for i, bucket in enumerate(buckets):
        x = left + i * bar_w
        y = float(top + plot_h)
        for s, (name, vals) in enumerate(series.items()):
            v = vals[i]
            if not v:
                continue
            h = plot_h * v / peak
            y -= h
            parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(1.0, bar_w - 2):.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[s % len(PALETTE)]}"><title>{escape(bucket)} · {escape(name)}: {v}</title>'
                         f'</rect>')
        if i % max(1, tick_every) == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" {FONT} font-size="9" '
                         f'text-anchor="middle" fill="#555">{escape(bucket)}</text>')
    if not series:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" {FONT} font-size="12" '
                     f'text-anchor="middle" fill="#888">no requests yet</text>')
    parts += _legend(series, left, height - 8)
    parts.append("</svg>")
    return "".join(parts)


def _legend_rows(series: dict[str, list[int]]) -> int:
    return max(0, (len(series) - 1) // 4)


def _legend(series: dict[str, list[int]], x0: int, y0: int) -> list[str]:
    out = []
    for s, name in enumerate(series):
        x, y = x0 + (s % 4) * 150, y0 + (s // 4) * 18
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{PALETTE[s % len(PALETTE)]}"/>'
                   f'<text x="{x + 14}" y="{y}" {FONT} font-size="11" fill="#333">{escape(name[:22])} '
                   f'({sum(series[name])})</text>')
    return out


def meter(label: str, used: float, limit: float | None, note: str = "", width: int = 420,
          shown: str | None = None) -> str:
    """A horizontal gauge: `used` of `limit` (no limit: an empty track with the count)."""
    share = min(1.0, used / limit) if limit else 0.0
    colour = "#59a14f" if share < 0.75 else "#edc948" if share < 0.95 else "#e15759"
    if shown is None:
        shown = f"{_num(used)} / {_num(limit)}" if limit else f"{_num(used)} (no limit)"
    track_w = width - 160
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} 34" width="{width}" role="img" '
            f'aria-label="{escape(label)}: {escape(shown)}"><title>{escape(label)}: {escape(shown)} {escape(note)}</title>'
            f'<text x="0" y="14" {FONT} font-size="12" fill="#222">{escape(label[:24])}</text>'
            f'<rect x="150" y="3" width="{track_w}" height="14" rx="3" fill="#e8e8e8"/>'
            f'<rect x="150" y="3" width="{track_w * share:.1f}" height="14" rx="3" fill="{colour}"/>'
            f'<text x="150" y="30" {FONT} font-size="10" fill="#555">{escape(shown)}'
            f'{" · " + escape(note) if note else ""}</text></svg>')
