"""A FUSE filesystem that loses, when its power is cut, everything not yet fsynced.

:class:`PowerCutFS` passes every operation through to a backing directory (what the page
cache holds) and keeps the durable state beside it, as the strictest reading of POSIX allows
a disk to keep it after a power loss:

- a file's content is what it held at its last ``fsync`` (a file created since and never
  fsynced is empty; one that existed at mount and was not written since is unchanged);
- a directory's entries are those it had at its last ``fsync`` of the directory (a create,
  rename or unlink not followed by one is undone; a directory made since and never fsynced
  is empty and, unless its parent was fsynced after, gone).

Files are followed by inode, so an fsynced file renamed into a directory that was not
fsynced keeps its old name. Every inode the model may still need is kept alive by a hard link
in the store (unlinked files) or moved there (removed directories).

:class:`PowerCutMount` runs the filesystem in a subprocess (``python -m faults.powercut``);
:meth:`PowerCutMount.cut` unmounts it, and the exiting process rewrites the backing directory
to the durable state; the next :meth:`PowerCutMount.mount` starts from there.

What it cannot see: file metadata (mode, times, xattrs) is not modelled (taken as durable);
``fdatasync`` counts as ``fsync``; writes through a shared ``mmap`` reach it only when the
kernel writes the pages back (at ``msync``, ``fsync``, unmount or memory pressure), so until
then they are neither lost nor kept; ``O_DIRECT`` is stripped (FUSE serves it as buffered
writes here), so a direct write is as volatile as any other until fsynced. Real filesystems
are usually kinder (ext4 commits renames with their data every few seconds): this is the
worst case they are allowed.

Needs ``/dev/fuse``, ``fusermount3`` and the ``mfusepy`` binding (libfuse3): see
:func:`unavailable`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: (kind, key) of a directory entry: "f" file inode, "d" directory inode, "l" symlink target
Entry = tuple[str, Any]


def unavailable() -> str | None:
    """Why the power-cut filesystem cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing (apt package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse3 missing
        return f"FUSE binding unusable: {exc} (pip mfusepy, apt libfuse3-3)"
    return None


class PowerCutModel:
    """The durable state of a backing tree, updated by the operations that change it."""

    def __init__(self, backing: Path, store: Path) -> None:
        self.backing = Path(backing)
        self.store = Path(store)
        self.keep = self.store / "keep"      # a hard link per file inode: it never dies
        self.data = self.store / "data"      # the durable content of each dirty inode
        self.graves = self.store / "graves"  # removed directories, kept for their inode
        for d in (self.keep, self.data, self.graves):
            d.mkdir(parents=True, exist_ok=True)
        self.dirty: set[int] = set()
        self.dirs: dict[int, dict[str, Entry]] = {}
        self.root = os.lstat(self.backing).st_ino
        for dirpath, _, filenames in os.walk(self.backing):
            self.dirs[os.lstat(dirpath).st_ino] = self._entries(Path(dirpath))
            for name in filenames:
                self._keep(Path(dirpath, name))

    def full(self, path: str) -> Path:
        return self.backing / path.lstrip("/")

    def _entries(self, directory: Path) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for p in directory.iterdir():
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[p.name] = ("d", st.st_ino)
            elif stat.S_ISLNK(st.st_mode):
                out[p.name] = ("l", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[p.name] = ("f", st.st_ino)
        return out

    def _keep(self, path: Path) -> int:
        ino = os.lstat(path).st_ino
        link = self.keep / str(ino)
        if not link.exists():
            os.link(path, link)
        return ino

    # ------------------------------------------------------------------ what changes state
    def created(self, path: Path) -> None:
        """A new file: durable content empty until it is fsynced."""
        ino = self._keep(path)
        (self.data / str(ino)).write_bytes(b"")
        self.dirty.add(ino)

    def modifying(self, ino: int) -> None:
        """Before the first change of a clean inode: keep its durable content."""
        if ino in self.dirty:
            return
        shutil.copyfile(self.keep / str(ino), self.data / str(ino))
        self.dirty.add(ino)

    def synced(self, ino: int) -> None:
        self.dirty.discard(ino)
        (self.data / str(ino)).unlink(missing_ok=True)

    def dir_synced(self, directory: Path) -> None:
        self.dirs[os.lstat(directory).st_ino] = self._entries(directory)

    def bury(self, directory: Path) -> None:
        """rmdir that keeps the inode (a durable listing may still name it)."""
        if any(directory.iterdir()):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(directory))
        ino = os.lstat(directory).st_ino
        os.rename(directory, self.graves / str(ino))

    # ------------------------------------------------------------------ the cut
    def durable_tree(self, into: Path) -> None:
        """Write the durable state to ``into`` (a new directory)."""
        self._build(self.root, into)

    def _build(self, ino: int, dest: Path) -> None:
        dest.mkdir()
        for name, (kind, key) in self.dirs.get(ino, {}).items():
            if kind == "d":
                self._build(key, dest / name)
            elif kind == "l":
                os.symlink(key, dest / name)
            else:
                src = self.data / str(key) if key in self.dirty else self.keep / str(key)
                shutil.copyfile(src, dest / name)

    def cut(self) -> None:
        """Replace the backing tree by its durable state and empty the store."""
        fresh = self.store.parent / f".{self.backing.name}.after-cut"
        shutil.rmtree(fresh, ignore_errors=True)
        self.durable_tree(fresh)
        for p in self.backing.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in fresh.iterdir():
            os.rename(p, self.backing / p.name)
        fresh.rmdir()
        shutil.rmtree(self.store)


def make_operations(model: PowerCutModel) -> Any:
    """The mfusepy operations over ``model`` (a function: the binding is imported late)."""
    import mfusepy

    class PowerCutFS(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.fstat(fh) if fh is not None else os.lstat(model.full(path))
            return {k: getattr(st, k) for k in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino")} | {
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(model.full(path))]

        def readlink(self, path: str) -> str:
            return os.readlink(model.full(path))

        def access(self, path: str, amode: int) -> int:
            if not os.access(model.full(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(model.full(path))
            return {k: getattr(st, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def open(self, path: str, flags: int) -> int:
            full = model.full(path)
            if flags & os.O_TRUNC:
                model.modifying(os.lstat(full).st_ino)
            return os.open(full, flags & ~(os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL))

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            full = model.full(path)
            existed = full.exists()
            if existed and flags & os.O_TRUNC:
                model.modifying(os.lstat(full).st_ino)
            fd = os.open(full, (flags & ~(os.O_DIRECT | os.O_APPEND)) | os.O_CREAT, mode)
            if not existed:
                model.created(full)
            return fd

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            model.modifying(os.fstat(fh).st_ino)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            if fh is not None:
                model.modifying(os.fstat(fh).st_ino)
                os.ftruncate(fh, length)
            else:
                full = model.full(path)
                model.modifying(os.lstat(full).st_ino)
                os.truncate(full, length)
            return 0

        def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
            model.modifying(os.fstat(fh).st_ino)
            os.posix_fallocate(fh, offset, size)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            model.synced(os.fstat(fh).st_ino)
            return 0

        def opendir(self, path: str) -> int:
            return 0

        def releasedir(self, path: str, fh: int) -> int:
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            model.dir_synced(model.full(path))
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(model.full(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            model.bury(model.full(path))
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(model.full(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            os.rename(model.full(old), model.full(new))
            return 0

        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, model.full(target))
            return 0

        def link(self, target: str, source: str) -> int:
            os.link(model.full(source), model.full(target))
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(model.full(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(model.full(path), uid, gid, follow_symlinks=False)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(model.full(path), ns=times, follow_symlinks=False)
            return 0

    return PowerCutFS()


class PowerCutMount:
    """The power-cut filesystem over ``backing``, mounted at ``mountpoint`` in a subprocess;
    its store (durable copies) lives in ``state`` (same filesystem as ``backing``)."""

    def __init__(self, backing: Path, mountpoint: Path, state: Path) -> None:
        self.backing, self.mountpoint, self.state = Path(backing), Path(mountpoint), Path(state)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def mount(self, timeout_s: float = 20.0) -> None:
        for d in (self.backing, self.mountpoint, self.state):
            d.mkdir(parents=True, exist_ok=True)
        log = open(self.state / "fuse.log", "ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faults.powercut", str(self.backing), str(self.state / "store"),
             str(self.mountpoint)], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount(cut=False)
                raise RuntimeError(f"power-cut FS did not mount: "
                                   f"{(self.state / 'fuse.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def unmount(self, cut: bool) -> None:
        """Unmount; with ``cut`` the exiting filesystem drops what was not fsynced."""
        if self.proc is None:
            return
        if cut:
            (self.state / "cut").write_text("")
        if os.path.ismount(self.mountpoint):
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                  capture_output=True, check=False)
            if done.returncode != 0:  # still busy (a killed process's cwd): detach lazily
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True, check=False)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("power-cut FS did not exit after unmount") from None
        rc, self.proc = self.proc.returncode, None
        (self.state / "cut").unlink(missing_ok=True)
        if rc != 0:
            raise RuntimeError(f"power-cut FS exited {rc}: "
                               f"{(self.state / 'fuse.log').read_text()[-2000:]}")
        if cut:
            self.cuts += 1

    def cut(self) -> None:
        """Power loss: everything not fsynced is gone; mounted again on what survived."""
        self.unmount(cut=True)
        self.mount()

    def __enter__(self) -> PowerCutMount:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount(cut=False)


def main(argv: list[str]) -> int:
    """``python -m faults.powercut BACKING STORE MOUNTPOINT``: serve until unmounted; then,
    if a ``cut`` file was left beside the store, reduce BACKING to its durable state."""
    import mfusepy

    backing, store, mountpoint = (Path(a) for a in argv)
    shutil.rmtree(store, ignore_errors=True)
    model = PowerCutModel(backing, store)
    mfusepy.FUSE(make_operations(model), str(mountpoint), foreground=True, nothreads=True,
                 default_permissions=True)
    if (store.parent / "cut").exists():
        model.cut()
        print(json.dumps({"cut": str(backing)}), flush=True)
    else:
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
