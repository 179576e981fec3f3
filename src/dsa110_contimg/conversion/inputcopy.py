"""Copying a group's UVH5 inputs into its staging directory, in the background."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import structlog

from .staging import disk_error, is_no_space

log = structlog.get_logger(__name__)


def stage_inputs(files: list[Path], dest: Path) -> list[Path]:
    """Copy the subband files into the staging directory (kernel-side copy)."""
    out = []
    for f in files:
        target = dest / f.name
        try:
            shutil.copyfile(f, target)
        except OSError as exc:
            if is_no_space(exc):
                raise disk_error(exc, target) from None
            raise
        out.append(target)
    return out


class InputCopier:
    """:func:`stage_inputs` in a background thread; :meth:`wait` returns the copies or
    re-raises the copy's error (always wait before removing the staging directory)."""

    def __init__(self, files: list[Path], dest: Path) -> None:
        self._files, self._dest = files, dest
        self._result: list[Path] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="contimg-stage-inputs",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = stage_inputs(self._files, self._dest)
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        """Wait for the copy to stop, ignoring its outcome (we are failing anyway)."""
        self._thread.join()

    def wait(self) -> list[Path]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
