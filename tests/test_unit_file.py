"""The systemd unit: its required settings, its exposure score, and the daemon run under its
system-call filter and umask.

``systemd-analyze`` (Debian package ``systemd``) scores the unit offline and lists the
system-call groups; libseccomp's Python bindings (Debian ``python3-seccomp``) apply the
unit's filter to a real ``contimg run --once``. Without them those tests skip, saying so.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from daemon_harness import Daemon
from dsa110_contimg.cli import build_parser
from dsa110_contimg.config import PathsConfig, known_credentials

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "contimg.service"
FAILURE_UNIT = ROOT / "systemd" / "contimg-failure@.service"
MAX_EXPOSURE = 2.5


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order (keys may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        assert not line.endswith("\\"), "continuation lines are not used"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def one(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(sections, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


def _paths(entries: list[str]) -> set[str]:
    return {p.lstrip("-+") for entry in entries for p in entry.split()}


def test_unit_has_the_reliability_and_hardening_settings() -> None:
    u = parse_unit(UNIT)
    defaults = {f.name: f.default for f in PathsConfig.__dataclass_fields__.values()}
    # a worker's OOM kill costs its stage, not the daemon; memory and tasks bounded
    assert one(u, "Service", "OOMPolicy") == "continue"
    for key in ("MemoryHigh", "MemoryMax", "TasksMax"):
        assert one(u, "Service", key)
    assert int(one(u, "Unit", "StartLimitBurst")) >= 1
    assert one(u, "Unit", "StartLimitIntervalSec")
    assert one(u, "Unit", "OnFailure") == "contimg-failure@%n.service"
    # state, products and scratch required; the input mount never
    mounts = _paths(values(u, "Unit", "RequiresMountsFor"))
    assert mounts == {str(defaults[k]) for k in ("state_dir", "output_dir", "scratch_dir")}
    assert not any(str(defaults["input_dir"]).startswith(m) for m in mounts)
    assert str(defaults["input_dir"]) in _paths(values(u, "Service", "ReadOnlyPaths"))
    assert str(defaults["tmpfs_path"]) in _paths(values(u, "Service", "ReadWritePaths"))
    # hardening
    assert one(u, "Service", "UMask") == "0077"
    assert one(u, "Service", "ProtectProc") == "invisible"
    assert one(u, "Service", "PrivateDevices") == "yes"
    assert one(u, "Service", "SystemCallErrorNumber") == "EPERM"
    filters = values(u, "Service", "SystemCallFilter")
    assert filters[0].split()[0] == "@system-service", filters
    denied = {g for f in filters if f.startswith("~") for g in f[1:].split()}
    assert "@resources" not in denied, "workers are reniced (os.nice/setpriority)"
    assert values(u, "Service", "MemoryDenyWriteExecute") in ([], ["no"]), "numba's JIT"
    assert values(u, "Service", "RemoveIPC") in ([], ["no"]), "would delete staged MSs"
    # the credentials loaded are exactly those the configuration reads
    loaded = dict(v.split(":", 1) for v in values(u, "Service", "LoadCredential"))
    assert set(loaded) == set(known_credentials())
    assert all(Path(p).name == name for name, p in loaded.items())


def test_failure_unit_runs_an_existing_command_with_the_alert_secrets() -> None:
    u = parse_unit(FAILURE_UNIT)
    cmd = one(u, "Service", "ExecStart").split()
    assert Path(cmd[0]).name == "contimg" and cmd[1:] == ["alert-failure", "%i"]
    args = build_parser().parse_args(["alert-failure", "contimg.service"])
    assert args.unit == "contimg.service"
    loaded = {v.split(":", 1)[0] for v in values(u, "Service", "LoadCredential")}
    alert_secrets = {n for n, env in known_credentials().items() if env != "CONTIMG_API_TOKEN"}
    assert loaded == alert_secrets
    assert one(u, "Service", "EnvironmentFile") == one(parse_unit(UNIT), "Service",
                                                        "EnvironmentFile")


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package 'systemd')")
    return exe


@pytest.mark.parametrize("unit", [UNIT, FAILURE_UNIT], ids=lambda p: p.name)
def test_exposure_score(unit: Path) -> None:
    exe = _systemd_analyze()
    out = subprocess.run([exe, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout


# ---------------------------------------------------------------- under the unit's filter
def syscall_groups(exe: str) -> dict[str, list[str]]:
    """Every group ``systemd-analyze syscall-filter`` knows: {@group: members (calls, @groups)}."""
    out = subprocess.run([exe, "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in out.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not line[0].isspace():
            members = groups.setdefault(text, [])
        elif members is not None:
            members.append(text)
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups[name], groups) if name.startswith("@") else {name}
    return out


def unit_allow_list(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """systemd's reading of SystemCallFilter= lines: the first is an allow list (with @default
    added), later ones add to it, or take away when they start with '~'."""
    assert not filters[0].startswith("~"), "the unit's filter is an allow list"
    allowed = expand(["@default"], groups)
    for f in filters:
        if f.startswith("~"):
            allowed -= expand(f[1:].split(), groups)
        else:
            allowed |= expand(f.split(), groups)
    return allowed


def seccomp_module_path() -> str | None:
    """libseccomp's bindings for this Python's ABI: Debian's python3-seccomp works for any
    CPython of the same version, so look in the system's dist-packages too."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for d in ("/usr/lib/python3/dist-packages", *sys.path):
        candidate = Path(d or ".") / f"seccomp{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


# Runs in the child: load the bindings, install the filter and umask, exec the command.
LAUNCHER = r"""
import importlib.machinery, importlib.util, json, os, sys
spec = json.loads(open(sys.argv[1]).read())
loader = importlib.machinery.ExtensionFileLoader("seccomp", spec["module"])
seccomp = importlib.util.module_from_spec(importlib.util.spec_from_loader("seccomp", loader))
loader.exec_module(seccomp)
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(spec["errno"]))
for name in spec["allow"]:
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (ValueError, RuntimeError, OSError):
        pass  # unknown to this libseccomp or kernel: systemd skips those too
f.load()
os.umask(int(spec["umask"], 8))
os.execve(spec["argv"][0], spec["argv"], os.environ)
"""


class Confined:
    """Commands run as the unit would run them: its syscall filter (EPERM) and its umask."""

    def __init__(self, tmp: Path) -> None:
        exe = _systemd_analyze()
        module = seccomp_module_path()
        if module is None:
            pytest.skip("libseccomp's Python bindings not found for this Python "
                        f"(seccomp{sysconfig.get_config_var('EXT_SUFFIX')}; Debian package "
                        "'python3-seccomp')")
        u = parse_unit(UNIT)
        allowed = unit_allow_list(values(u, "Service", "SystemCallFilter"), syscall_groups(exe))
        self.errno = getattr(errno, one(u, "Service", "SystemCallErrorNumber"))
        self.spec = {"module": module, "allow": sorted(allowed), "errno": self.errno,
                     "umask": one(u, "Service", "UMask")}
        self.launcher = tmp / "confine.py"
        self.launcher.write_text(LAUNCHER)
        self.tmp = tmp
        self.runs = 0

    def argv(self, *cmd: str) -> list[str]:
        self.runs += 1
        spec = self.tmp / f"confine-{self.runs}.json"
        spec.write_text(json.dumps({**self.spec, "argv": list(cmd)}))
        return [sys.executable, str(self.launcher), str(spec)]


def test_filter_is_in_force_and_denies_with_eperm(tmp_path: Path) -> None:
    c = Confined(tmp_path)
    probe = ("import os\ntry:\n    os.setuid(os.getuid())\nexcept OSError as e:\n"
             "    print('denied', e.errno)\nelse:\n    print('allowed')\n"
             "print('umask', oct(os.umask(0)))\n")
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert free.stdout.startswith("allowed"), free.stdout + free.stderr  # the control
    out = subprocess.run(c.argv(sys.executable, "-c", probe), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"denied {c.errno}", "umask 0o77"], out.stdout


@pytest.mark.slow
def test_daemon_runs_a_group_under_the_units_filter_and_umask(tmp_path: Path) -> None:
    from dsa110_contimg.simulate import simulate_groups

    c = Confined(tmp_path)
    d = Daemon(tmp_path / "d")
    (truth,) = simulate_groups(d.input, preset="tiny", groups=1, seed=41)
    gid = truth["group_id"]
    started = time.time()
    with open(d.root / "daemon-confined.log", "w") as log:
        proc = subprocess.run(c.argv(sys.executable, "-m", "dsa110_contimg.cli", "run", "--once"),
                              env=d.env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=900)
    text = (d.root / "daemon-confined.log").read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert d.states() == {gid: "done"}, text[-4000:]
    products = d.output / gid[:10] / gid
    assert list(products.glob("*.pbcor.fits")) and (products / "qa.json").is_file()
    # UMask=0077: what the daemon and its workers made is the contimg user's alone
    made = [p for root in (d.output, d.state, d.scratch, d.tmpfs)
            for p in [root, *root.rglob("*")]
            if p.stat().st_mtime >= started - 1 and not p.is_symlink()]
    assert made
    shared = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in made
              if p.stat().st_mode & 0o077 and p not in (d.output, d.state, d.scratch, d.tmpfs)]
    assert not shared, shared[:20]
    # nothing the daemon does was denied; the workers got their nice levels (@resources)
    assert "Operation not permitted" not in text, text[-4000:]
    assert "worker_nice_failed" not in text, text[-4000:]
