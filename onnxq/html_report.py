"""The JSON report as one self-contained HTML page for people.

Inline CSS and inline SVG only, no script and no external resource (a Content-Security-Policy says so too):
the page must work offline and as an email attachment. Every section is optional, so older or smaller
reports still render. Non-finite floats arrive as the strings "inf"/"-inf"/"nan" (see validate._json_safe).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

DEFAULT_SLICE_GATE_DB = 10.0
MAX_SLICE_BARS = 256
TOP_NODES = 20
MAX_TABLE_ROWS = 200
MAX_PRECISION_CELLS = 12_000
MAX_PRECISION_ROWS = 60  # up to this many nodes the precision map lists each; above, it groups them by op

_CSS = """
:root { color-scheme: light; --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --zebra: #f9fafb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--fg); background: #fff; }
main { max-width: 960px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.paths { color: var(--muted); font-size: 13px; word-break: break-all; } .paths code { color: var(--fg); }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 13px;
  color: #fff; vertical-align: middle; margin-left: 8px; }
.pass { background: #16a34a; } .fail { background: #dc2626; } .none { background: #9ca3af; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; max-width: 100%; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; } tbody tr:nth-child(even) { background: var(--zebra); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { color: #dc2626; font-weight: 600; } td.good { color: #16a34a; }
.muted, figcaption { color: var(--muted); font-size: 12px; } .skipped { color: #92400e; background: #fffbeb;
  border: 1px solid #fde68a; padding: 6px 10px; border-radius: 6px; }
figure { margin: 8px 0 16px; } svg { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: #374151; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px;
  border-radius: 2px; }
pre { background: #f3f4f6; padding: 10px 12px; border-radius: 6px; overflow: auto; font-size: 12px; }
ul { margin: 4px 0 12px; padding-left: 20px; }
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_PRECISION_COLORS = {
    "int4": "#7c3aed",
    "uint4": "#a78bfa",
    "int8": "#2563eb",
    "uint8": "#60a5fa",
    "int16": "#0f766e",
    "uint16": "#5eead4",
    "fp8": "#db2777",
    "fp16": "#f59e0b",
    "float16": "#f59e0b",
    "bf16": "#ea580c",
    "bfloat16": "#ea580c",
    "fp32": "#9ca3af",
    "float32": "#9ca3af",
    "float": "#9ca3af",
}
_EXTRA_COLORS = ["#65a30d", "#0891b2", "#be123c", "#a16207", "#4338ca", "#047857", "#78716c"]
# Chart colors differ from the badges' (#16a34a, #dc2626), so a screenshot test can tell bars from badges.
_BAR, _BAR_BAD, _BAR_EXACT, _BAR_NONE = "#3b82f6", "#ef4444", "#22c55e", "#9ca3af"


# --- values -------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A number, including the JSON-safe strings "inf"/"-inf"/"nan"; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _finite(value: Any) -> float | None:
    v = _num(value)
    return v if v is not None and math.isfinite(v) else None


def _db(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—" if value is None else _e(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "exact" if v > 0 else "−∞ (zero reference)"
    return f"{v:.2f} dB"


def _fmt(value: Any, spec: str = ".4g") -> str:
    v = _num(value)
    if v is None:
        return "—" if value is None else _e(value)
    if not math.isfinite(v):
        return {"inf": "∞", "-inf": "−∞"}.get(str(v), "n/a")
    return format(v, spec)


def _pct(value: Any) -> str:
    v = _num(value)
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.2f} %"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# --- HTML building blocks -----------------------------------------------------------------------------


def _badge(passed: Any) -> str:
    if passed is True:
        return '<span class="badge pass">PASS</span>'
    if passed is False:
        return '<span class="badge fail">FAIL</span>'
    return '<span class="badge none">not judged</span>'


def _table(headers: list[str] | None, rows: list[list[str]], numeric: frozenset[int] | set[int] = frozenset()) -> str:
    """Cells are HTML already (escaped by the caller); `numeric` columns are right-aligned; no headers, no head."""

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers or []))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _truncate(text: str, limit: int) -> str:
    """Middle ellipsis: node names carry their meaning at both ends (/layer.3/attn/MatMul)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[-(limit - head - 1) :]


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(label)}">{body}</svg>'
    )


# --- charts -------------------------------------------------------------------------------------------


def _buckets(values: list[float | None]) -> tuple[list[tuple[int, int, float | None]], int]:
    """(first, last, minimum) per bar; over MAX_SLICE_BARS slices, the minimum of each bucket (worst wins)."""
    size = max(1, math.ceil(len(values) / MAX_SLICE_BARS))
    out = []
    for start in range(0, len(values), size):
        chunk = [v for v in values[start : start + size] if v is not None and not math.isnan(v)]
        judged = [v for v in chunk if v != -math.inf]
        out.append(
            (start, min(start + size, len(values)) - 1, min(judged) if judged else (chunk[0] if chunk else None))
        )
    return out, size


def _slice_chart(name: str, slices: dict[str, Any], threshold: float) -> str:
    raw = _list(slices.get("sqnr_db"))
    if not raw:
        return ""
    bars, size = _buckets([_num(v) for v in raw])
    finite = [_clamp(v) for _, _, v in bars if v is not None and math.isfinite(v)]
    threshold = _clamp(threshold)
    hi = max([*finite, threshold, 1.0]) * 1.1
    lo = min([*finite, 0.0])
    width, height, left, right, top, bottom = 720, 220, 46, 64, 12, 30
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * plot_h

    step = plot_w / len(bars)
    gap = step * 0.18 if step > 4 else 0.0
    parts = []
    used: set[str] = set()  # which states the bars show: the legend names only those
    for tick in _ticks(lo, hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    mid = top + plot_h / 2
    parts.append(
        f'<text x="11" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 11 {mid:.1f})">SQNR (dB)</text>'
    )
    worst = slices.get("worst_index")
    for i, (first, last, v) in enumerate(bars):
        x = left + i * step + gap / 2
        span = f"{first}" if first == last else f"{first}–{last} (min)"
        if v is None or math.isnan(v) or v == -math.inf:
            what = "reference all zeros, not judged" if v == -math.inf else "n/a"
            used.add("none")
            parts.append(
                f'<rect x="{x:.2f}" y="{y(0) - 2:.1f}" width="{max(step - gap, 0.5):.2f}" height="2" '
                f'fill="{_BAR_NONE}"><title>{_e(name)}[{span}]: {what}</title></rect>'
            )
            continue
        shown = hi if v == math.inf else _clamp(v)
        state = "exact" if v == math.inf else ("bad" if v < threshold else "good")
        used.add(state)
        color = {"exact": _BAR_EXACT, "bad": _BAR_BAD, "good": _BAR}[state]
        y0, y1 = sorted((y(shown), y(0)))
        parts.append(
            f'<rect x="{x:.2f}" y="{y0:.1f}" width="{max(step - gap, 0.5):.2f}" height="{max(y1 - y0, 0.5):.1f}" '
            f'fill="{color}"><title>{_e(name)}[{span}]: {_db(v)}</title></rect>'
        )
    ty = y(threshold)
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="{_BAR_BAD}" '
        f'stroke-dasharray="5 3" stroke-width="1.2"/>'
        f'<text x="{width - right + 4}" y="{ty + 4:.1f}" fill="{_BAR_BAD}">gate {threshold:g} dB</text>'
    )
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#9ca3af"/>')
    base = height - bottom + 14
    parts.append(f'<text x="{left}" y="{base}">0</text>')
    parts.append(f'<text x="{width - right}" y="{base}" text-anchor="end">{len(raw) - 1}</text>')
    if isinstance(worst, int) and 0 <= worst < len(raw):
        wx = left + (worst // size + 0.5) * step
        parts.append(
            f'<text x="{wx:.1f}" y="{base}" text-anchor="middle" fill="{_BAR_BAD}" font-weight="600">'
            f"▲ worst {worst}</text>"
        )
    axis = slices.get("axis", "?")
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">slice index along axis {_e(axis)}'
        "</text>"
    )
    note = f"{len(raw)} slices along axis {_e(axis)}"
    if size > 1:
        note += f", aggregated into {len(bars)} bars of {size} (each bar is its bucket's minimum)"
    states = [("good", _BAR, "≥ gate"), ("bad", _BAR_BAD, "below gate"), ("exact", _BAR_EXACT, "exact")]
    legend = "".join(
        f"<span><i style='background:{color}'></i>{text}</span>"
        for state, color, text in [*states, ("none", _BAR_NONE, "not judged")]
        if state in used
    )
    caption = (
        f"<figcaption>{_e(name)}: SQNR per slice, {note}; worst slice {_e(worst)} at "
        f"{_db(slices.get('worst_sqnr_db'))}. <span class='legend'>{legend}</span></figcaption>"
    )
    return f"<figure>{_svg(width, height, ''.join(parts), f'SQNR per slice of {name}')}{caption}</figure>"


def _clamp(v: float, limit: float = 1e6) -> float:
    """Absurd values (a corrupt report) still give a finite scale."""
    return max(-limit, min(limit, v))


def _ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 4)) if span > 0 else 1.0
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 6) for k in range(int((hi - first) / step) + 1)]


def _drop_chart(nodes: list[dict[str, Any]]) -> str:
    rows = [(n, _num(n.get("drop_db"))) for n in nodes]
    if not rows:
        return ""
    finite = [_clamp(d) for _, d in rows if d is not None and math.isfinite(d)]
    hi = max([*finite, 1e-9]) * 1.1
    lo = min([*finite, 0.0])
    width, label_w, row_h, top = 760, 340, 20, 6
    value_w = 70
    plot_w = width - label_w - value_w
    height = top * 2 + row_h * len(rows)

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="0" y2="{height}" stroke="#9ca3af"/>']
    for i, (node, drop) in enumerate(rows):
        name, op = str(node.get("name", "")), str(node.get("op_type", ""))
        label = f"{_truncate(name, 44)} · {_truncate(op, 16)}"
        cy = top + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{cy + 14}" text-anchor="end">{_e(label)}</text>')
        tip = f"{name} ({op}): drop {_fmt(drop, '.2f')} dB, SQNR {_db(node.get('sqnr_db'))}"
        if drop is None or math.isnan(drop):
            parts.append(f'<text x="{x(0) + 4:.1f}" y="{cy + 14}">n/a<title>{_e(tip)}</title></text>')
            continue
        shown = hi if drop == math.inf else (lo if drop == -math.inf else _clamp(drop))
        x0, x1 = sorted((x(0), x(shown)))
        parts.append(
            f'<rect x="{x0:.1f}" y="{cy + 3}" width="{max(x1 - x0, 0.5):.1f}" height="{row_h - 6}" fill="#f97316">'
            f"<title>{_e(tip)}</title></rect>"
        )
        parts.append(f'<text x="{x1 + 4:.1f}" y="{cy + 14}">{_fmt(drop, ".2f")} dB</text>')
    return _svg(width, height, "".join(parts), "SQNR drop per node")


def _precision_chart(nodes: list[dict[str, Any]]) -> str:
    total = len(nodes)
    shown = nodes[:MAX_PRECISION_CELLS]
    cell = 12 if len(shown) <= 1500 else 6
    pitch = cell + (2 if cell > 8 else 1)
    cols = 720 // pitch
    rows = math.ceil(len(shown) / cols)
    colors = dict(_PRECISION_COLORS)
    counts: dict[str, int] = {}
    parts = []
    for i, node in enumerate(shown):
        precision = str(node.get("precision", "?"))
        counts[precision] = counts.get(precision, 0) + 1
        if precision not in colors:
            colors[precision] = _EXTRA_COLORS[len([c for c in colors if c not in _PRECISION_COLORS]) % 7]
        tip = f"{node.get('name', '')} ({node.get('op_type', '')}): {precision}"
        parts.append(
            f'<rect x="{(i % cols) * pitch}" y="{(i // cols) * pitch}" width="{cell}" height="{cell}" rx="1.5" '
            f'fill="{colors[precision]}"><title>{_e(tip)}</title></rect>'
        )
    svg = _svg(cols * pitch, rows * pitch, "".join(parts), "precision per node in graph order")
    legend = "".join(
        f"<span><i style='background:{colors[p]}'></i>{_e(p)} ({n})</span>"
        for p, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    note = f"{total} nodes in graph order, left to right; hover a square for its node."
    if total > len(shown):
        note += f" Only the first {len(shown)} are drawn."
    figure = f"<figure>{svg}<figcaption><div class='legend'>{legend}</div>{note}</figcaption></figure>"
    return figure + _precision_table(nodes)


def _precision_table(nodes: list[dict[str, Any]]) -> str:
    """Readable without hovering: every node for a small graph, else one row per op type with its counts."""
    if len(nodes) <= MAX_PRECISION_ROWS:
        rows = [[_e(n.get("name", "")), _e(n.get("op_type", "")), _e(n.get("precision", "?"))] for n in nodes]
        return _table(["node", "op", "precision"], rows)
    by_op: dict[str, dict[str, int]] = {}
    for node in nodes:
        counts = by_op.setdefault(str(node.get("op_type", "?")), {})
        precision = str(node.get("precision", "?"))
        counts[precision] = counts.get(precision, 0) + 1
    precisions = sorted({p for counts in by_op.values() for p in counts})
    rows = [
        [_e(op), str(sum(counts.values())), *(str(counts.get(p, "")) for p in precisions)]
        for op, counts in sorted(by_op.items(), key=lambda kv: -sum(kv[1].values()))
    ]
    numeric = set(range(1, len(precisions) + 2))
    return _table(["op", "nodes", *precisions], rows, numeric)


def pareto_chart(front: list[dict[str, Any]], chosen: dict[str, Any] | None, probes: list[dict[str, Any]]) -> str:
    """Loss against cost ratio for every point of the exact front; probes (validated points) ringed and the
    chosen point filled. Losses span decades, so the y axis is log10."""
    points = [(_num(p.get("cost_ratio")), _num(p.get("loss"))) for p in front]
    points = [
        (c, loss)
        for c, loss in points
        if c is not None and loss is not None and math.isfinite(c) and math.isfinite(loss)
    ]
    if not points:
        return ""
    floor = min([loss for _, loss in points if loss > 0] or [1e-9]) / 2

    def log(v: float) -> float:
        return math.log10(max(v, floor))

    xs, ys = [c for c, _ in points], [log(loss) for _, loss in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1e-3), (y_hi if y_hi > y_lo else y_lo + 1)
    width, height, left, bottom, pad = 720, 300, 60, 36, 12

    def x(v: float) -> float:
        return left + (_clamp(v) - x_lo) / (x_hi - x_lo) * (width - left - pad)

    def y(v: float) -> float:
        return pad + (y_hi - v) / (y_hi - y_lo) * (height - bottom - pad)

    parts = [f'<line x1="{left}" x2="{width - pad}" y1="{height - bottom}" y2="{height - bottom}" stroke="#9ca3af"/>']
    for t in _ticks(x_lo, x_hi):
        parts.append(f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y_lo, y_hi):
        parts.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">1e{t:g}</text>')
    parts.append(f'<text x="{(width + left) / 2:.0f}" y="{height - 4}" text-anchor="middle">cost / fp32</text>')
    path = " ".join(f"{x(c):.1f},{y(log(loss)):.1f}" for c, loss in points)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#60a5fa"/>')
    for c, loss in points:
        parts.append(
            f'<circle cx="{x(c):.1f}" cy="{y(log(loss)):.1f}" r="2.5" fill="#2563eb">'
            f"<title>cost {c:.3f}, loss {loss:.3g}</title></circle>"
        )
    for probe in probes:
        index = probe.get("index")
        if isinstance(index, int) and 0 <= index < len(front):
            c, loss = _num(front[index].get("cost_ratio")), _num(front[index].get("loss"))
            if c is not None and loss is not None:
                tip = f"validated: {_fmt(probe.get('score'))} at cost {c:.3f}"
                parts.append(
                    f'<circle cx="{x(c):.1f}" cy="{y(log(loss)):.1f}" r="6" fill="none" stroke="#f97316">'
                    f"<title>{_e(tip)}</title></circle>"
                )
    if chosen and _num(chosen.get("cost_ratio")) is not None and _num(chosen.get("loss")) is not None:
        c, loss = _num(chosen["cost_ratio"]), _num(chosen["loss"])
        parts.append(
            f'<circle cx="{x(c):.1f}" cy="{y(log(loss)):.1f}" r="5" fill="#16a34a">'  # type: ignore[arg-type]
            f"<title>chosen: cost {c:.3f}, loss {loss:.3g}</title></circle>"
        )
    return _svg(width, height, "".join(parts), "Pareto front: predicted loss against cost")


# --- sections -----------------------------------------------------------------------------------------


def _header(report: dict[str, Any]) -> str:
    recipe = _dict(report.get("recipe"))
    name = recipe.get("name") or "custom recipe"
    found = (("input", report.get("input") or report.get("model")), ("output", report.get("output")))
    paths = [f"{label}: <code>{_e(path)}</code>" for label, path in found if path]
    desc = f"<div class='muted'>{_e(recipe['description'])}</div>" if recipe.get("description") else ""
    return (
        f"<header><h1>onnxq report: {_e(name)}{_badge(report.get('passed'))}</h1>{desc}"
        f"<div class='paths'>{'<br>'.join(paths)}</div></header>"
    )


def _summary(report: dict[str, Any]) -> str:
    out = []
    sizes = _dict(report.get("sizes"))
    rows = []
    src, dst = _finite(sizes.get("input_bytes")), _finite(sizes.get("output_bytes"))
    if src is not None:
        rows.append(["input size", f"{src / 1e6:.3f} MB ({int(src):,} bytes)"])
    if dst is not None:
        rows.append(["output size", f"{dst / 1e6:.3f} MB ({int(dst):,} bytes)"])
    if src and dst:
        change = f"×{src / dst:.2f} smaller" if dst <= src else f"×{dst / src:.2f} larger"
        rows.append(["size ratio", f"{dst / src:.3f} ({change})"])
    if _num(report.get("calibration_seconds")) is not None:
        rows.append(["calibration", f"{_fmt(report['calibration_seconds'], '.3f')} s"])
    if rows:
        out.append(_table(None, rows))
    passes = [p for p in _list(report.get("passes")) if isinstance(p, dict)]
    if passes:
        out.append("<h3>Passes</h3>")
        out.append(
            _table(
                ["pass", "seconds", "modified"],
                [
                    [_e(p.get("name", "?")), _fmt(p.get("seconds"), ".3f"), "yes" if p.get("modified") else "no"]
                    for p in passes
                ],
                {1},
            )
        )
    out.append(_counts_table("Operators in the output", _dict(report.get("ops"))))
    notes = _list(report.get("notes"))
    if notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "<section><h2>Summary</h2>" + "".join(out) + "</section>" if out else ""


def _slice_threshold(report: dict[str, Any], provider: dict[str, Any]) -> float:
    for gate in _list(provider.get("gates")):
        if isinstance(gate, dict) and str(gate.get("gate", "")).startswith("min_slice_sqnr_db"):
            value = _finite(gate.get("threshold"))
            if value is not None:
                return value
    gates = _dict(_dict(_dict(report.get("recipe")).get("validate")).get("gates"))
    value = _finite(gates.get("min_slice_sqnr_db"))
    return DEFAULT_SLICE_GATE_DB if value is None else value


def _validation(report: dict[str, Any]) -> str:
    providers = [p for p in _list(report.get("validation")) if isinstance(p, dict)]
    if not providers:
        return ""
    out = ["<section><h2>Validation</h2>"]
    for prov in providers:
        name = prov.get("provider", "?")
        if prov.get("skipped"):
            out.append(f"<h3>{_e(name)}</h3><p class='skipped'>skipped: {_e(prov['skipped'])}</p>")
            continue
        out.append(f"<h3>{_e(name)}{_badge(prov.get('passed'))}</h3>")
        out.append(f"<p class='muted'>{_e(prov.get('samples', '?'))} samples</p>")
        outputs = [o for o in _list(prov.get("outputs")) if isinstance(o, dict)]
        threshold = _slice_threshold(report, prov)
        rows = []
        for o in outputs:
            s = _dict(o.get("slices"))
            worst = f"[{_e(s.get('worst_index'))}] {_db(s.get('worst_sqnr_db'))}" if s else "—"
            rows.append(
                [
                    _e(o.get("name", "?")),
                    _db(o.get("sqnr_db")),
                    _fmt(o.get("cosine"), ".5f"),
                    _fmt(o.get("max_abs_error")),
                    _fmt(o.get("mean_abs_error")),
                    _pct(o.get("top1_agreement")),
                    worst,
                ]
            )
        if rows:
            headers = ["output", "SQNR", "cosine", "max |err|", "mean |err|", "top-1 agreement", "worst slice"]
            out.append(_table(headers, rows, {1, 2, 3, 4, 5, 6}))
        if prov.get("accuracy_float") is not None:
            out.append(
                f"<p>label accuracy: float {_pct(prov.get('accuracy_float'))}, "
                f"quantized {_pct(prov.get('accuracy_quantized'))}</p>"
            )
        gates = [g for g in _list(prov.get("gates")) if isinstance(g, dict)]
        if gates:
            out.append(
                _table(
                    ["gate", "threshold", "value", "result"],
                    [
                        [
                            _e(g.get("gate", "?")),
                            _fmt(g.get("threshold")),
                            _fmt(g.get("value")),
                            "<span class='badge pass'>pass</span>"
                            if g.get("passed")
                            else "<span class='badge fail'>fail</span>",
                        ]
                        for g in gates
                    ],
                    {1, 2},
                )
            )
        out.extend(
            _slice_chart(str(o.get("name", "?")), _dict(o.get("slices")), threshold)
            for o in outputs
            if _dict(o.get("slices"))
        )
    return "".join(out) + "</section>"


def _localization(report: dict[str, Any]) -> str:
    loc = _dict(report.get("localization"))
    nodes = [n for n in _list(loc.get("nodes")) if isinstance(n, dict)]
    whatif = _dict(loc.get("whatif"))
    if not nodes and not whatif:
        return ""

    def key(n: dict[str, Any]) -> float:
        d = _num(n.get("drop_db"))
        return -math.inf if d is None or math.isnan(d) else d

    ranked = sorted(nodes, key=key, reverse=True)
    metric = loc.get("metric", "SQNR")
    out = ["<section><h2>Where the error comes from</h2>"]
    out.append(
        f"<p class='muted'>provider {_e(loc.get('provider', '?'))}, {_e(loc.get('samples', '?'))} samples, "
        f"ranked by {_e(metric)}: input SQNR − output SQNR of each node.</p>"
    )
    if ranked:
        top = ranked[:TOP_NODES]
        out.append(
            f"<figure>{_drop_chart(top)}<figcaption>top {len(top)} of {len(nodes)} nodes by SQNR drop"
            "</figcaption></figure>"
        )
        rows = [
            [
                _e(n.get("name", "")),
                _e(n.get("op_type", "")),
                _db(n.get("sqnr_db")),
                _db(n.get("input_sqnr_db")),
                _fmt(n.get("drop_db"), ".2f"),
            ]
            for n in ranked[:MAX_TABLE_ROWS]
        ]
        out.append(_table(["node", "op_type", "SQNR", "input SQNR", "drop (dB)"], rows, {2, 3, 4}))
        if len(ranked) > MAX_TABLE_ROWS:
            out.append(f"<p class='muted'>{len(ranked) - MAX_TABLE_ROWS} more nodes not listed.</p>")
    if whatif and _list(whatif.get("kept_float")):
        kept = [str(k) for k in _list(whatif.get("kept_float"))]
        names = ", ".join(f"<code>{_e(k)}</code>" for k in kept[:10]) + (
            f" and {len(kept) - 10} more" if len(kept) > 10 else ""
        )
        wmetric = whatif.get("metric", metric)
        passes_after = whatif.get("gates_pass_after")
        verdict = "" if passes_after is None else (", and the gates pass" if passes_after else "; the gates still fail")
        if whatif.get("helped") is False:
            verdict += f". That does not help: {_e(str(whatif.get('advice') or ''))}"
        out.append(
            f"<p><strong>What if:</strong> keeping {len(kept)} node{'s' if len(kept) != 1 else ''} in float "
            f"({names or 'none'}) moves {_e(wmetric)} from <strong>{_fmt(whatif.get('before'), '.2f')}</strong> to "
            f"<strong>{_fmt(whatif.get('after'), '.2f')}</strong>{verdict}.</p>"
        )
    return "".join(out) + "</section>"


def _counts_table(title: str, counts: dict[str, Any]) -> str:
    if not counts:
        return ""
    rows = [[_e(k), _e(v)] for k, v in sorted(counts.items(), key=lambda kv: -(_finite(kv[1]) or 0))]
    return f"<h3>{_e(title)}</h3>" + _table(["op_type", "nodes"], rows, {1})


def _realization(report: dict[str, Any]) -> str:
    real = _dict(report.get("realization"))
    kernels, floats = _dict(real.get("integer_kernels")), _dict(real.get("float_compute"))
    fallbacks = [f for f in _list(real.get("fallbacks")) if isinstance(f, dict)]
    if not (kernels or floats or fallbacks):
        return ""
    out = [
        "<section><h2>What the runtime actually ran</h2>",
        f"<p class='muted'>provider {_e(real.get('provider', '?'))}</p>",
        _counts_table("Integer kernels", kernels),
        _counts_table("Float compute", floats),
    ]
    if fallbacks:
        rows = [[_e(f.get("node", "")), _e(f.get("op_type", "")), _e(f.get("reason", ""))] for f in fallbacks]
        out.append("<h3>Fallbacks to float</h3>" + _table(["node", "op_type", "reason"], rows[:MAX_TABLE_ROWS]))
    elif real.get("fallbacks") == []:
        out.append("<p>No fallbacks: every quantized group runs on an integer kernel.</p>")
    return "".join(out) + "</section>"


def _latency(report: dict[str, Any]) -> str:
    rows = [
        [
            _e(r.get("provider", "?")),
            _e(r.get("threads", "?")),
            _fmt(r.get("float_ms"), ".3f"),
            _fmt(r.get("quantized_ms"), ".3f"),
            f"×{_fmt(r.get('speedup'), '.2f')}",
        ]
        for r in _list(report.get("latency"))
        if isinstance(r, dict)
    ]
    if not rows:
        return ""
    table = _table(["provider", "threads", "float (ms)", "quantized (ms)", "speedup"], rows, {1, 2, 3, 4})
    return f"<section><h2>Latency</h2>{table}</section>"


def _precision(report: dict[str, Any]) -> str:
    nodes = [n for n in _list(report.get("precision")) if isinstance(n, dict)]
    return f"<section><h2>Precision map</h2>{_precision_chart(nodes)}</section>" if nodes else ""


def _mixed(report: dict[str, Any]) -> str:
    mixed = _dict(report.get("mixed_precision"))
    if not mixed:
        return ""
    front = [p for p in _list(mixed.get("front")) if isinstance(p, dict)]
    probes = [p for p in _list(mixed.get("probes")) if isinstance(p, dict)]
    chosen = _dict(mixed.get("chosen"))
    chart = pareto_chart(front, chosen, probes)
    seconds = _dict(mixed.get("seconds"))
    facts = (
        f"<p>Objective {_e(mixed.get('objective'))}; chosen plan costs {_fmt(mixed.get('chosen_cost_ratio'), '.3f')} "
        f"of fp32. Sensitivity measured in {_fmt(seconds.get('sensitivity'), '.1f')} s with "
        f"{_e(mixed.get('workers'))} worker(s). Proxy rank agreement with the measured losses (Spearman): "
        + ", ".join(f"{_e(k)} {_fmt(v, '.2f')}" for k, v in _dict(mixed.get("proxy_agreement")).items())
        + "</p>"
    )
    rows = [
        [
            _e(g.get("node")),
            _e(g.get("op_type")),
            _e(g.get("choice")),
            ", ".join(f"{_e(c)} {_fmt(_dict(o).get('loss'), '.3g')}" for c, o in _dict(g.get("options")).items()),
        ]
        for g in _list(mixed.get("groups"))
        if isinstance(g, dict)
    ]
    table = _table(["node", "op", "choice", "loss per candidate"], rows)
    caption = "Exact Pareto front (blue), validated probes (orange rings), chosen plan (green)."
    figure = f"<figure>{chart}<figcaption>{caption}</figcaption></figure>"
    return f"<section><h2>Mixed precision</h2>{facts}{figure}{table}</section>"


def _recipe(report: dict[str, Any]) -> str:
    recipe = report.get("recipe")
    if not recipe:
        return ""
    import yaml

    text = yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False, width=100)
    lines = text.count("\n")
    return (
        f"<section><h2>Recipe</h2><details><summary>the resolved recipe as YAML ({lines} lines; rerun it with "
        f"<code>--recipe FILE</code>)</summary><pre>{_e(text)}</pre></details></section>"
    )


# --- entry points -------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The whole page as one string."""
    name = _dict(report.get("recipe")).get("name") or "report"
    output = Path(str(report["output"])).name if report.get("output") else ""
    title = "onnxq: " + " · ".join(x for x in (str(name), output) if x)
    sections = (_header, _summary, _validation, _localization, _realization, _latency, _mixed, _precision, _recipe)
    body = "".join(section(report) for section in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}<footer class='muted'>generated by onnxq</footer></main></body></html>\n"
    )


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Atomic write, like write_json: a reader never sees half a page."""
    from onnxq.outputs import write_text

    return write_text(Path(path), render(report))
