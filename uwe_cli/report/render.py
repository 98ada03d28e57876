"""The report page: HTML, inline CSS, inline SVG (histograms, boxes) and a small inline script (the map).

No external resource is referenced: thumbnails are base64 JPEGs, the map is drawn on a canvas from
JSON embedded in the page. Every string that comes from data (IDs, class names, metadata) is
escaped for HTML, and JSON inside `<script>` has `<` escaped so no ID can end the script early.
"""

from __future__ import annotations

import html
import json
import time
from typing import IO, Any

import numpy as np

from uwe_cli import __version__
from uwe_cli.picks import Pick, PickBox, Picks
from uwe_cli.report import ReportData, Thumb

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")
REGION_COLOUR = "#ffd400"
MAP_COLOURS = {"remaining": "#b8bcc4", "labeled": "#2f6fde", "picked": "#e4322b"}
HIST_BINS = 30

CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #e3e6ec; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header, section { max-width: 1400px; margin: 0 auto; padding: 12px 24px; }
h1 { font-size: 22px; margin: 12px 0 4px; } h2 { font-size: 17px; margin: 18px 0 8px; }
.sub { color: var(--muted); }
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
table.kv { border-collapse: collapse; width: 100%; font-size: 13px; }
table.kv td { border-top: 1px solid var(--line); padding: 3px 6px; vertical-align: top;
              overflow-wrap: anywhere; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; width: 1%; }
#map { width: 100%; height: 460px; display: block; background: #fff; cursor: crosshair; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 5px; }
#tip { position: fixed; pointer-events: none; background: #1d2330; color: #fff; font-size: 12px;
       padding: 3px 7px; border-radius: 4px; display: none; max-width: 420px; overflow-wrap: anywhere; }
svg.hist { width: 100%; height: auto; display: block; }
svg.hist .bar { fill: #8fa6cc; } svg.hist .bar.batch { fill: #e4322b; }
svg.hist text { font-size: 11px; fill: #667085; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 12px; }
.card { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.card:target { outline: 3px solid #e4322b; }
.frame { position: relative; background: #eef0f3; }
.frame img { display: block; width: 100%; height: auto; }
.frame img.heat { position: absolute; inset: 0; height: 100%; opacity: .55; display: none; }
body.show-heat .frame img.heat { display: block; }
.frame svg { position: absolute; inset: 0; width: 100%; height: 100%; overflow: visible; }
.frame svg text { paint-order: stroke; stroke: #000; stroke-width: 3px; fill: #fff;
                  vector-effect: non-scaling-stroke; }
figcaption { padding: 6px 8px 8px; font-size: 12px; }
figcaption .id { font-family: ui-monospace, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
figcaption .nums { color: var(--muted); }
.notes { color: #8a5a00; }
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('map-data').textContent);
  const canvas = document.getElementById('map');
  const tip = document.getElementById('tip');
  const colours = data.colours;
  let screen = [];
  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = '#ffffff'; ctx.fillRect(0, 0, w, h);
    const pad = 12, n = data.x.length;
    screen = new Array(n);
    let drawn = 0;
    for (const layer of [0, 1, 2]) {
      const r = layer === 2 ? 3.5 : layer === 1 ? 2.5 : 1.6;
      ctx.fillStyle = colours[layer];
      for (let i = 0; i < n; i++) {
        if (data.c[i] !== layer) continue;
        const px = pad + data.x[i] / 1000 * (w - 2 * pad);
        const py = h - pad - data.y[i] / 1000 * (h - 2 * pad);
        screen[i] = [px, py];
        ctx.beginPath(); ctx.arc(px, py, r, 0, 2 * Math.PI); ctx.fill();
        drawn++;
      }
    }
    canvas.dataset.drawn = String(drawn);
  }
  function nearest(ev) {
    const box = canvas.getBoundingClientRect();
    const mx = ev.clientX - box.left, my = ev.clientY - box.top;
    let best = -1, bestD = 64;
    for (let i = 0; i < screen.length; i++) {
      if (data.c[i] === 0 || !screen[i]) continue;
      const dx = screen[i][0] - mx, dy = screen[i][1] - my, d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }
  canvas.addEventListener('mousemove', function (ev) {
    const i = nearest(ev);
    if (i < 0) { tip.style.display = 'none'; return; }
    const k = data.p[i];
    tip.textContent = k >= 0 ? ('#' + data.ranks[k] + '  ' + data.ids[k]) : 'labeled unit';
    tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px';
    tip.style.display = 'block';
  });
  canvas.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  canvas.addEventListener('click', function (ev) {
    const i = nearest(ev);
    if (i >= 0 && data.p[i] >= 0) location.hash = 'pick-' + data.ranks[data.p[i]];
  });
  const toggle = document.getElementById('heat-toggle');
  if (toggle) toggle.addEventListener('change', function () {
    document.body.classList.toggle('show-heat', toggle.checked);
  });
  window.addEventListener('resize', draw);
  draw();
})();
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _script_json(value: Any) -> str:
    """JSON that is safe inside <script>: '<' escaped, so no data can close the element."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def _kv_table(items: dict[str, Any]) -> str:
    rows = []
    for key, value in items.items():
        if value is None:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append(f"<tr><td>{esc(key)}</td><td>{esc(shown)}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>' if rows else '<p class="sub">none</p>'


def histogram_svg(values: np.ndarray, lo: float, hi: float, title: str, css: str = "") -> str:
    """An SVG bar chart of `values` on HIST_BINS bins over [lo, hi]."""
    width, height, left, bottom, top = 420, 170, 36, 22, 18
    counts, edges = np.histogram(values, bins=HIST_BINS, range=(lo, hi if hi > lo else lo + 1))
    peak = max(int(counts.max()) if counts.size else 0, 1)
    bar_w = (width - left - 6) / HIST_BINS
    bars = []
    for i, count in enumerate(counts):
        h = (height - bottom - top) * count / peak
        x = left + i * bar_w
        y = height - bottom - h
        label = f"{edges[i]:.3g}–{edges[i + 1]:.3g}: {int(count):,}"
        bars.append(
            f'<rect class="bar {css}" x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}">'
            f"<title>{esc(label)}</title></rect>"
        )
    axis_y = height - bottom
    return (
        f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
        f'<text x="{left}" y="12">{esc(title)}</text>'
        f'<line x1="{left}" y1="{axis_y}" x2="{width - 6}" y2="{axis_y}" stroke="#98a2b3"/>'
        f"{''.join(bars)}"
        f'<text x="{left}" y="{height - 6}">{lo:.3g}</text>'
        f'<text x="{width - 6}" y="{height - 6}" text-anchor="end">{hi:.3g}</text>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak:,}</text>'
        f'<text x="{left - 4}" y="{axis_y}" text-anchor="end">0</text></svg>'
    )


def _box_svg(picks: Picks, box: PickBox) -> str:
    colour = PALETTE[box.label % len(PALETTE)]
    name = picks.display_name(box.label)
    tip = f"{name} score {_num(box.score, 3)} u {_num(box.uncertainty, 3)}"
    tip += " (represents its class in the embedding)" if box.representative else ""
    w, h = max(box.x2 - box.x1, 0), max(box.y2 - box.y1, 0)
    stroke = 'stroke-width="3"' if box.representative else 'stroke-width="1.5" stroke-dasharray="4 3"'
    return (
        f'<rect class="{"rep" if box.representative else "box"}" x="{box.x1:.1f}" y="{box.y1:.1f}" '
        f'width="{w:.1f}" height="{h:.1f}" fill="none" stroke="{colour}" {stroke} '
        f'vector-effect="non-scaling-stroke"><title>{esc(tip)}</title></rect>'
    )


def _box_label_svg(picks: Picks, box: PickBox, font: float) -> str:
    name = picks.display_name(box.label)
    text = f"{name} u={_num(box.uncertainty, 2)}"
    y = box.y1 + font if box.y1 < font else box.y1 - font * 0.25
    return f'<text x="{box.x1 + 2:.1f}" y="{y:.1f}" font-size="{font:.1f}">{esc(text)}</text>'


def card(picks: Picks, pick: Pick, thumb: Thumb) -> str:
    fw, fh = thumb.full
    overlay = []
    if pick.region is not None:
        x, y, w, h = pick.region
        overlay.append(
            f'<rect class="region" x="{x}" y="{y}" width="{w}" height="{h}" fill="none" '
            f'stroke="{REGION_COLOUR}" stroke-width="3" vector-effect="non-scaling-stroke"/>'
        )
    font = max(fw, fh) / 20
    overlay += [_box_svg(picks, b) for b in pick.boxes if not b.representative]
    overlay += [_box_svg(picks, b) for b in pick.boxes if b.representative]
    overlay += [_box_label_svg(picks, b, font) for b in pick.boxes if b.representative]
    svg = (
        f'<svg viewBox="0 0 {fw} {fh}" preserveAspectRatio="none">{"".join(overlay)}</svg>' if overlay else ""
    )
    heat = (
        f'<img class="heat" src="data:image/jpeg;base64,{thumb.heat}" alt="">'
        if thumb.heat is not None
        else ""
    )
    lines = [f'<b>#{pick.rank}</b> <span class="id">{esc(pick.id)}</span>']
    lines.append(
        f'<span class="nums">u {_num(pick.uncertainty)} · d {_num(pick.distance)} · {fw}×{fh}</span>'
    )
    if pick.label is not None:
        name = picks.display_name(pick.label)
        lines.append(f"predicted {esc(name)}" + (f" ({pick.score:.3f})" if pick.score is not None else ""))
    if picks.kind == "detection":
        classes = sorted({b.label for b in pick.boxes})
        names = ", ".join(picks.display_name(c) for c in classes)
        lines.append(
            f"{len(pick.boxes)} box{'es' if len(pick.boxes) != 1 else ''}"
            + (f": {esc(names)}" if names else "")
        )
    if pick.region is not None:
        x, y, w, h = pick.region
        lines.append(f'<span class="nums">region {x},{y} {w}×{h} of {esc(pick.image_id)}</span>')
    alt = esc(f"#{pick.rank} {pick.id}")
    # Tiny images (icons, digits) are shown enlarged: keep their pixels sharp instead of blurring them.
    pixelated = ' style="image-rendering: pixelated"' if thumb.width < 96 else ""
    return (
        f'<figure class="card" id="pick-{pick.rank}"><div class="frame">'
        f'<img class="thumb" src="data:image/jpeg;base64,{thumb.data}" width="{thumb.width}"{pixelated} '
        f'height="{thumb.height}" alt="{alt}">{heat}{svg}</div>'
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _map_payload(data: ReportData) -> dict[str, Any]:
    xy = np.rint(data.map_xy * 1000).astype(np.int64)
    return {
        "x": xy[:, 0].tolist(),
        "y": xy[:, 1].tolist(),
        "c": data.map_category.astype(int).tolist(),
        "p": data.map_pick.tolist(),
        "ids": [p.id for p in data.picks.picks],
        "ranks": [p.rank for p in data.picks.picks],
        "colours": [MAP_COLOURS["remaining"], MAP_COLOURS["labeled"], MAP_COLOURS["picked"]],
    }


def _histograms(data: ReportData) -> str:
    if data.pool_uncertainty is None or data.batch_uncertainty is None:
        return '<p class="sub">The pool has no uncertainty column.</p>'
    pool_u = data.pool_uncertainty[np.isfinite(data.pool_uncertainty)]
    lo, hi = float(pool_u.min()), float(pool_u.max())
    return (
        '<div class="panels">'
        + histogram_svg(pool_u, lo, hi, f"pool ({pool_u.size:,} units)")
        + histogram_svg(
            data.batch_uncertainty, lo, hi, f"batch ({len(data.batch_uncertainty):,} picks)", "batch"
        )
        + "</div>"
    )


def write_page(data: ReportData, stream: IO[str]) -> int:
    """Write the page; returns its size in bytes."""
    written = 0

    def out(text: str) -> None:
        nonlocal written
        stream.write(text)
        written += len(text.encode("utf-8"))

    picks = data.picks
    counts = [int((data.map_category == k).sum()) for k in range(3)]
    heat_toggle = (
        '<label><input type="checkbox" id="heat-toggle"> show uncertainty heatmaps</label>'
        if any(t.heat is not None for t in data.thumbs)
        else ""
    )
    notes = "".join(f'<p class="notes">{esc(n)}</p>' for n in data.notes)
    out(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(data.title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{esc(data.title)}</h1><p class="sub">{len(picks):,} picks from a pool of '
        f"{data.pool_size:,} units ({esc(picks.kind)}), {data.labeled:,} labeled · uwe {esc(__version__)} · "
        f"{esc(time.strftime('%Y-%m-%d %H:%M'))}</p>{notes}</header>"
        '<section class="panels"><div class="panel"><h2>Selection settings</h2>'
        f'{_kv_table(data.settings)}</div><div class="panel"><h2>Pool</h2>'
        f"{_kv_table({'files': ', '.join(str(f) for f in picks.source.files[:5]), 'rows': picks.source.rows, **data.metadata})}"
        "</div></section>"
        f'<section id="pool-map"><div class="panel"><h2>Map of the pool ({esc(data.map_method.upper())} of the embeddings)</h2>'
        '<p class="legend">'
        f'<span><i style="background:{MAP_COLOURS["remaining"]}"></i>remaining {counts[0]:,}</span>'
        f'<span><i style="background:{MAP_COLOURS["labeled"]}"></i>labeled {counts[1]:,}</span>'
        f'<span><i style="background:{MAP_COLOURS["picked"]}"></i>picked {counts[2]:,}</span>'
        '<span class="sub">hover for IDs, click a picked point to jump to it</span></p>'
        '<canvas id="map"></canvas></div></section>'
        f'<section id="uncertainty"><div class="panel"><h2>Uncertainty</h2><p class="sub">{esc(data.uncertainty_label)}</p>'
        f"{_histograms(data)}</div></section>"
        f'<section><h2>Batch in pick order</h2><p class="sub">{heat_toggle}</p><div class="grid">'
    )
    for pick, thumb in zip(picks.picks, data.thumbs, strict=True):
        out(card(picks, pick, thumb))
    out(
        '</div></section><div id="tip"></div>'
        f'<script type="application/json" id="map-data">{_script_json(_map_payload(data))}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
    return written
