"""A self-contained HTML report (inline SVG charts, no external assets) from one or more prune reports."""
from __future__ import annotations

import html
import json

W, H, PAD = 720, 300, 48


def _esc(x) -> str:
    return html.escape(str(x))


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def bar_chart(rows: list[tuple[str, int, int]], title: str) -> str:
    """Horizontal bars: original width (light) and kept width (dark) per layer/group."""
    if not rows:
        return ""
    bh, gap, label_w = 14, 6, 260
    height = PAD + len(rows) * (bh + gap)
    top = max(r[1] for r in rows) or 1
    scale = (W - label_w - 60) / top
    parts = [f'<svg class="chart" data-chart="widths" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
             f'role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="18" font-size="14" font-weight="bold">{_esc(title)}</text>']
    for i, (name, before, after) in enumerate(rows):
        y = PAD - 14 + i * (bh + gap)
        parts.append(f'<text x="{label_w - 6}" y="{y + bh - 3}" font-size="11" text-anchor="end">{_esc(name[-40:])}</text>')
        parts.append(f'<rect class="before" x="{label_w}" y="{y}" width="{before * scale:.1f}" height="{bh}" fill="#c9d6ea"/>')
        parts.append(f'<rect class="after" x="{label_w}" y="{y}" width="{after * scale:.1f}" height="{bh}" fill="#2b5797"/>')
        parts.append(f'<text x="{label_w + before * scale + 4:.1f}" y="{y + bh - 3}" font-size="11">{after}/{before}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str, name: str) -> str:
    """A scatter/line chart of y against x (one polyline per series)."""
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs + [0.0]), max(xs + [1.0])
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x):
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def py(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    colors = ["#2b5797", "#e07b00", "#2e8b57", "#b22222"]
    parts = [f'<svg class="chart" data-chart="{_esc(name)}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="18" font-size="14" font-weight="bold">{_esc(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#444"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#444"/>',
             f'<text x="{W / 2}" y="{H - 10}" font-size="12" text-anchor="middle">{_esc(xlabel)}</text>',
             f'<text x="12" y="{H / 2}" font-size="12" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{_esc(ylabel)}</text>']
    for v in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{PAD - 4}" y="{py(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.3g}</text>')
    for v in (x0, (x0 + x1) / 2, x1):
        parts.append(f'<text x="{px(v):.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">{v:.2f}</text>')
    for k, (label, s) in enumerate(series.items()):
        s = sorted(p for p in s if p[1] is not None)
        c = colors[k % len(colors)]
        if len(s) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        for x, y in s:
            parts.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"/>')
        parts.append(f'<text x="{W - PAD}" y="{PAD + 14 * k}" font-size="11" fill="{c}" text-anchor="end">{_esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _widths(report: dict) -> list[tuple[str, int, int]]:
    rows = []
    for g in report.get("groups", []):
        if g.get("prunable"):
            name = g["sources"][0]["node"] if g.get("sources") else f"group {g['id']}"
            cpu = g.get("channels_per_unit", 1)
            rows.append((name + (f" (+{len(g['sources']) - 1})" if len(g.get("sources", [])) > 1 else ""),
                         g["size"] * cpu, g["kept"] * cpu))
    for layer in report.get("layers", []):  # eigendamage ranks
        rows.append((layer["layer"] + " rows", layer["rows"], layer["kept_rows"]))
        rows.append((layer["layer"] + " cols", layer["cols"], layer["kept_cols"]))
    return rows


def _summary_rows(report: dict) -> list[tuple[str, str, str]]:
    t = report["totals"]
    rows = [("MACs (batch 1)", _human(t["macs_before"]), f"{_human(t['macs_after'])} ({t['macs_ratio']:.1%})"),
            ("parameters", _human(t["params_before"]), f"{_human(t['params_after'])} ({t['params_ratio']:.1%})")]
    for b in report.get("bench", {}).get("rows", []):
        rows.append((f"latency p50, batch {b['batch']} ({b['provider']})", f"{b['dense_p50_ms']:.3f} ms",
                     f"{b['pruned_p50_ms']:.3f} ms (speed-up x{b['speedup']:.2f})"))
    if "latency" in report:
        lat = report["latency"]
        rows.append((f"planned latency, batch {lat['batch']}", f"{lat['dense_ms']:.3f} ms",
                     f"{lat['measured_ms']:.3f} ms (target {lat['target_ms']:.3f}, predicted {lat['predicted_ms']:.3f})"))
    if "accuracy" in report:
        a = report["accuracy"]
        rows.append(("accuracy", f"{a['before']:.2%}", f"{a['after']:.2%}"))
        if "before_recovery" in a:
            rows.append(("accuracy before recovery", f"{a['before']:.2%}", f"{a['before_recovery']:.2%}"))
    if "file_size" in report:
        rows.append(("file size", _human(report["file_size"]["before"]) + "B", _human(report["file_size"]["after"]) + "B"))
    return rows


def _recovery_chart(report: dict) -> str:
    """Distillation loss against the step (rounds laid end to end): held-out and training loss."""
    rounds = (report.get("recovery") or {}).get("rounds") or []
    series: dict[str, list] = {"held-out loss": [], "training loss": []}
    offset = 0
    for r in rounds:
        for h in r.get("curve", []):
            series["held-out loss"].append((offset + h["step"], h.get("holdout_loss")))
            if h.get("train_loss") is not None:
                series["training loss"].append((offset + h["step"], h["train_loss"]))
        offset += r.get("steps", 0)
    series["held-out loss"] = [p for p in series["held-out loss"] if p[1] is not None and p[1] == p[1]]
    if not series["held-out loss"]:
        series.pop("held-out loss")
    return line_chart(series, "recovery: distillation loss", "step", "loss", "recovery-loss") if any(series.values()) else ""


def render(reports: list[dict], title: str = "graphprune report") -> str:
    """reports: one prune report per budget (a sweep gives several); the first is shown in detail."""
    main = reports[0]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
           "<style>body{font-family:sans-serif;margin:24px;max-width:900px}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
           "svg{display:block;margin:16px 0}</style></head><body>",
           f"<h1>{_esc(title)}</h1>",
           f"<p>{_esc(main.get('input', ''))} &rarr; {_esc(main.get('output', ''))}; criterion "
           f"<b>{_esc(main.get('criterion'))}</b>, compensation {_esc(main.get('compensation'))}, budget "
           f"{_esc(json.dumps(main.get('budget')))}; verification "
           f"{'passed' if (main.get('verification') or {}).get('ok') else 'not run'}</p>"]
    out.append('<table id="summary"><tr><th></th><th>before</th><th>after</th></tr>')
    for name, a, b in _summary_rows(main):
        out.append(f"<tr><td>{_esc(name)}</td><td>{_esc(a)}</td><td>{_esc(b)}</td></tr>")
    out.append("</table>")
    out.append(bar_chart(_widths(main), "kept width per group (channels)"))
    out.append(_recovery_chart(main))
    if len(reports) > 1:
        acc = {"accuracy": [(r["totals"]["macs_ratio"], r.get("accuracy", {}).get("after")) for r in reports]}
        if any(p[1] is not None for p in acc["accuracy"]):
            base = reports[0].get("accuracy", {}).get("before")
            if base is not None:
                acc["accuracy"].append((1.0, base))
            out.append(line_chart(acc, "accuracy vs MACs", "MACs kept (fraction)", "top-1 accuracy", "accuracy-vs-macs"))
        lat: dict[str, list] = {}
        for r in reports:
            for b in r.get("bench", {}).get("rows", []):
                lat.setdefault(f"batch {b['batch']}", []).append((r["totals"]["macs_ratio"], b["pruned_p50_ms"]))
                lat[f"batch {b['batch']}"].append((1.0, b["dense_p50_ms"]))
        if lat:
            out.append(line_chart(lat, "latency vs MACs", "MACs kept (fraction)", "p50 latency (ms)", "latency-vs-macs"))
        out.append('<table id="sweep"><tr><th>budget</th><th>MACs</th><th>params</th><th>accuracy</th></tr>')
        for r in reports:
            acc_after = r.get("accuracy", {}).get("after")
            out.append(f"<tr><td>{_esc(r['budget'].get('ratio'))}</td><td>{r['totals']['macs_ratio']:.1%}</td>"
                       f"<td>{r['totals']['params_ratio']:.1%}</td>"
                       f"<td>{'' if acc_after is None else f'{acc_after:.2%}'}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(x for x in out if x)
