"""A run's files are one result: the model (and its .data files), its report and its statistics are staged
in a hidden folder beside the output and renamed into place together at the end, or not at all.

An interrupt or an error before `commit` leaves the output folder as it was; a report of an earlier model
at the same path is removed when the new model lands without one, so a stale report never sits beside a
model it does not describe. `committed` records what the last commit wrote, so the CLI can say exactly
which files exist when an interrupt comes after it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from onnxq.errors import UsageError

committed: list[Path] = []  # the files the last commit in this process put in place


def check_output_path(path: Path, source: Path | None = None) -> None:
    """Refuse an output path that cannot be written, before any work starts."""
    if source is not None and path.resolve() == source.resolve():
        raise UsageError(
            f"output path '{path}' is the input model", "choose another output with -o, the input is never modified"
        )
    if path.is_dir():
        raise UsageError(f"output path '{path}' is a folder", f"name a file, e.g. -o {path / 'model.q.onnx'}")
    folder = path.parent if str(path.parent) else Path(".")
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"output path '{path}' is under '{blocking}', which is a file", "choose another -o path")
    if not folder.is_dir():
        raise UsageError(f"output folder '{folder}' does not exist", "create it first or choose another -o path")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder '{folder}' is not writable", "choose another -o path")


def publish(path: Path) -> None:
    """Give a file we wrote the permissions a new file gets here (mkstemp makes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(path: Path, text: str) -> Path:
    """Atomic: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Staging:
    """Files destined for `folder`, written first into a hidden folder inside it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dir = Path(tempfile.mkdtemp(prefix=".onnxq-", suffix=".tmp", dir=folder))
        self.stale: list[Path] = []  # final paths that must not survive the commit (an old model's report)
        self.late_writes: list[Callable[[], Path | None]] = []  # written at commit (None: nothing to write)

    def path(self, final: Path) -> Path:
        """Where to write the file that will become `final` (which must be in `folder`)."""
        return self.dir / final.name

    def commit(self, main: Path, before_replace: Callable[[set[Path]], None] = lambda _paths: None) -> list[Path]:
        """Move every staged file into place, `main` (the model) last; returns the final paths."""
        staged = sorted(self.dir.iterdir(), key=lambda p: (p.name == main.name, p.name))
        finals = [self.folder / p.name for p in staged]
        with deferred_interrupts():
            before_replace({p.resolve() for p in finals})
            for old in self.stale:
                if old not in finals:
                    old.unlink(missing_ok=True)
            for source, final in zip(staged, finals, strict=True):
                os.replace(source, final)
            finals += [path for write in self.late_writes if (path := write()) is not None]
            committed[:] = finals
        self.abort()
        return finals

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def staged(folder: Path) -> Iterator[Staging]:
    """A Staging that is removed, with all it holds, unless committed."""
    stage = Staging(folder)
    try:
        yield stage
    finally:
        stage.abort()


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C waits until the block is done, then raises KeyboardInterrupt (main thread only): the renames of
    a commit land together, and a C extension's module init is never interrupted (that can crash Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
