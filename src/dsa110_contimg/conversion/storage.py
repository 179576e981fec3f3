"""Where a group's Measurement Set lives, behind one API for the daemon.

Conversion builds the MS in a staging area (tmpfs, or the scratch disk when tmpfs is short)
and either keeps it in the tmpfs work area until the group is finished or publishes it to
its product directory. The daemon asks only: where is it now (:meth:`MSStorage.locate`),
move it to its product place (:meth:`MSStorage.archive`), and tidy what dead processes left
(:meth:`MSStorage.free_dead_staging`, :meth:`MSStorage.kept_groups`). How staging, the work
area and publishing work is :mod:`.staging` and :mod:`.workarea`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..products import product_dir, safe_stem
from . import staging, warmfiles, workarea


def ms_path_for(output_dir: Path, group_id: str) -> Path:
    """The MS's place among the group's products."""
    return product_dir(output_dir, group_id) / (safe_stem(group_id) + ".ms")


@dataclass(frozen=True)
class MSStorage:
    output_dir: Path
    scratch_dir: Path
    tmpfs_path: Path
    state_dir: Path
    publish_fsync: bool = True
    publish_direct: bool = True

    @property
    def work_dir(self) -> Path:
        """The tmpfs work area conversion keeps MSs in (passed to the conversion stage)."""
        return workarea.work_dir(self.tmpfs_path, self.state_dir)

    def final(self, group_id: str) -> Path:
        """Where the group's MS ends up among its products."""
        return ms_path_for(self.output_dir, group_id)

    def locate(self, group_id: str, recorded: Path) -> Path | None:
        """Where the MS is now: where conversion put it (``recorded``), else archived, else
        None (lost with tmpfs, e.g. to a reboot)."""
        return workarea.locate_ms(Path(recorded), self.final(group_id))

    def archive(self, group_id: str, recorded: Path) -> Path | None:
        """Move a kept MS from the work area to its product place; None when it is already
        there. Idempotent (an archive interrupted after its rename completes)."""
        final = self.final(group_id)
        if Path(recorded) == final:
            return None
        return workarea.archive_ms(Path(recorded), final, self.publish_fsync,
                                   self.publish_direct)

    def kept_groups(self) -> list[tuple[str, Path]]:
        """(group id, MS) of every MS kept in the work area."""
        out = []
        for ms in workarea.kept_ms(self.work_dir):
            gid = workarea.group_of(ms)
            if gid is not None:
                out.append((gid, ms))
        return out

    def free_dead_staging(self) -> list[Path]:
        """Remove staging directories whose owner process is gone (a worker killed by OOM, a
        crash, a stage timeout); returns them."""
        return staging.clean_stale_staging(self.scratch_dir, self.tmpfs_path)

    def free_warm_columns(self) -> None:
        """Drop the tile files kept warm for the next conversion (a stopped daemon holds no
        RAM)."""
        warmfiles.clear(warmfiles.pool_dir(self.work_dir), remove_dirs=True)
