"""The HTML report: a real run's report plus every optional section, parsed strictly and opened in Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DIGITS

import onnxq
from onnxq.html_report import render, write_html

EVIL = "<script>alert(1)</script>/attn/MatMul"
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}
# Colors that only a drawn chart puts on the page (checked in the screenshot's pixels).
RED = (239, 68, 68)  # slice bars under the gate
GREEN = (34, 197, 94)  # an exact ("inf") slice
ORANGE = (249, 115, 22)  # SQNR-drop bars
VIOLET = (124, 58, 237)  # int4 squares in the precision map


class StrictParser(HTMLParser):
    """Fails on what browsers silently repair: unclosed or mismatched tags, resource references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.svgs = 0
        self.titles_in_svg: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)
        self.svgs += tag == "svg"
        self._in_title = tag == "title" and "svg" in self.stack

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.titles_in_svg.append(data)

    def _check(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.errors.append(f"<{tag}> is not allowed")
        for name, value in attrs:
            if name in ("src", "href", "xlink:href") or (name == "style" and "url(" in (value or "")):
                self.errors.append(f"<{tag} {name}={value!r}> references a resource")


def parse(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real int8 run on the digits CNN, plus plausible versions of every optional section."""
    tmp = tmp_path_factory.mktemp("html")
    model = tmp / "digits_cnn.onnx"
    shutil.copy(DIGITS / "digits_cnn.onnx", model)
    result = onnxq.run(model, "int8", calib=str(DIGITS / "calib.npz"), output=tmp / "q.onnx")
    report = json.loads(json.dumps(result.report()))  # what a reader of report.json gets
    report["input"] = str(model)
    assert report["validation"][0]["outputs"][0]["slices"]  # the real per-class slices get a chart too

    rng = np.random.default_rng(0)
    heads = [float(v) for v in rng.uniform(24, 34, 48)]
    heads[16:24] = [3.1, 2.7, 4.0, 3.3, 2.9, 3.6, 3.0, 2.5]  # one collapsed head of a concatenated output
    heads[40] = "inf"
    wide = [float(v) for v in rng.uniform(28, 40, 600)]
    wide[300], wide[301], wide[5] = 6.0, "nan", "-inf"
    cpu = report["validation"][0]
    cpu["outputs"] += [
        _output("qkv_concat", 18.2, {"axis": 2, "sqnr_db": heads, "worst_index": 23, "worst_sqnr_db": 2.5}),
        _output("hidden", "inf", {"axis": 1, "sqnr_db": wide, "worst_index": 300, "worst_sqnr_db": 6.0}),
    ]
    cpu["gates"].append(
        {"gate": "min_slice_sqnr_db (qkv_concat[2=23])", "threshold": 10.0, "value": 2.5, "passed": False}
    )
    cpu["passed"] = report["passed"] = False
    report["validation"].append(
        {
            "provider": "cuda",
            "samples": 0,
            "skipped": "CUDAExecutionProvider is not available",
            "outputs": [],
            "gates": [],
        }
    )

    graph = onnx.load(result.output).graph
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(graph.node)]
    nodes = [
        {"name": f"/layers.{i // 6}/attn/proj_{i % 6}/MatMul_with_a_long_suffix", "op_type": "MatMul"}
        for i in range(30)
    ]
    nodes[3]["name"] = EVIL
    drops = [float(v) for v in rng.uniform(0, 8, 30)]
    drops[7] = "inf"
    report["localization"] = {
        "provider": "cpu",
        "samples": 32,
        "metric": "sqnr_db",
        "nodes": [
            {**n, "sqnr_db": 30 - d if isinstance(d, float) else "-inf", "input_sqnr_db": 30.0, "drop_db": d}
            for n, d in zip(nodes, drops, strict=True)
        ],
        "whatif": {
            "kept_float": [nodes[7]["name"], EVIL],
            "before": 18.2,
            "after": 27.9,
            "metric": "sqnr_db",
            "gates_pass_after": True,
        },
    }
    report["realization"] = {
        "provider": "cpu",
        "integer_kernels": {"QLinearConv": 4, "QGemm": 1},
        "float_compute": {"GlobalAveragePool": 1},
        "fallbacks": [{"node": EVIL, "op_type": "MatMul", "reason": "no int8 kernel for this input type"}],
    }
    report["latency"] = [
        {"provider": "cpu", "threads": 1, "float_ms": 0.84, "quantized_ms": 0.41, "speedup": 2.05},
        {"provider": "cpu", "threads": 8, "float_ms": 0.33, "quantized_ms": 0.21, "speedup": 1.57},
    ]
    cycle = ["int4", "int4", "int8", "uint8", "fp16", "fp32", "int16", "bf16"]
    report["precision"] = [
        {"name": name, "op_type": n.op_type, "precision": "int8" if n.op_type in ("Conv", "Gemm") else "fp32"}
        for name, n in zip(names, graph.node, strict=True)
    ] + [{"name": f"/block/{i}", "op_type": "MatMul", "precision": cycle[i % 8]} for i in range(400)]
    report["precision"].append({"name": EVIL, "op_type": "MatMul", "precision": "int4"})
    return report


def _output(name: str, sqnr: float | str, slices: dict) -> dict:
    return {
        "name": name,
        "sqnr_db": sqnr,
        "cosine": 0.998,
        "max_abs_error": 0.31,
        "mean_abs_error": 0.02,
        "top1_agreement": None,
        "slices": slices,
    }


def test_every_section_renders_offline_and_escaped(full_report: dict) -> None:
    page = render(full_report)
    parser = parse(page)
    assert "http://" not in page and "https://" not in page
    assert "url(" not in page and "@import" not in page
    # 3 slice charts (digits logits, qkv_concat, hidden), SQNR-drop bars, precision map
    assert parser.svgs == page.count("<svg") == 5
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert any(EVIL in title for title in parser.titles_in_svg)  # hover text carries the full name, unescaped
    assert "CUDAExecutionProvider is not available" in page
    assert "exact" in page  # "inf" SQNR
    assert "aggregated into 200 bars of 3" in page  # 600 slices
    assert (
        "FAIL" in page
        and "Latency" in page
        and "What if" in page
        and "the gates pass" in page
        and "Fallbacks to float" in page
    )
    for section in ("Summary", "Validation", "Where the error comes from", "Precision map", "Recipe"):
        assert f"<h2>{section}</h2>" in page


def test_the_page_teaches_without_hovering(full_report: dict) -> None:
    import yaml

    page = render(full_report)
    recipe = re.search(r"<details><summary>the resolved recipe as YAML.*?<pre>(.*?)</pre></details>", page, re.S)
    assert recipe is not None and yaml.safe_load(html.unescape(recipe.group(1)))["name"] == "int8"
    assert page.count("slice index along axis") == 3 and page.count(">SQNR (dB)</text>") == 3
    # the big precision map (400+ nodes) is grouped by op, with a count per precision
    assert re.search(r"<th>op</th><th class=\"num\">nodes</th>(<th class=\"num\">[^<]+</th>)+", page)
    small = render({**full_report, "precision": full_report["precision"][:5]})
    assert "<th>node</th><th>op</th><th>precision</th>" in small
    # the digits logits have no exact or unjudged slice: their legend does not list those states
    digits_caption = re.search(r"<figcaption>[^<]*: SQNR per slice, 10 slices.*?</figcaption>", page, re.S)
    assert digits_caption is not None and "exact" not in digits_caption.group(0)
    assert "not judged" not in digits_caption.group(0)


def test_small_and_old_reports_render(full_report: dict, tmp_path: Path) -> None:
    for report in ({}, {"output": "m.q.onnx"}, {"validation": [], "passed": True, "localization": {}}):
        parse(render(report))
    old = json.loads(json.dumps(full_report))  # as before localization, precision, and per-slice metrics
    for key in ("input", "localization", "realization", "latency", "precision", "ops"):
        del old[key]
    for output in old["validation"][0]["outputs"]:
        del output["slices"]
    page = render(old)
    assert parse(page).svgs == 0 and "Validation" in page
    path = write_html(old, tmp_path / "r.html")
    assert path.read_text(encoding="utf-8") == render(old)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # atomic: no temp file left behind


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_chromium_draws_the_charts(full_report: dict, tmp_path: Path) -> None:
    from PIL import Image

    page = write_html(full_report, tmp_path / "report.html")
    base = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    url = page.resolve().as_uri()
    png = tmp_path / "report.png"  # a window tall enough for the whole page, so every chart is in the pixels
    shot = subprocess.run(
        [*base, f"--screenshot={png}", "--window-size=1280,6000", url], capture_output=True, text=True, timeout=180
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for run in (shot, dom):
        assert "Uncaught" not in run.stderr and "SyntaxError" not in run.stderr, run.stderr[-2000:]
    assert dom.stdout.count("<svg") == 5 and "<rect" in dom.stdout

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    assert len(np.unique(packed)) > 20, "blank screenshot"
    # More pixels than the 11-px legend swatches of that color could give: the bars and squares are there.
    expected = {"below-gate slice bars": (RED, 600), "exact slice": (GREEN, 600), "drop bars": (ORANGE, 2000)}
    expected["int4 squares"] = (VIOLET, 2000)
    for what, (color, least) in expected.items():
        assert _near(pixels, color) > least, f"no {what} drawn"


def _near(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 6) -> int:
    return int(np.sum(np.all(np.abs(pixels.astype(int) - color) <= tol, axis=1)))
