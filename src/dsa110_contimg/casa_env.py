"""Make CASA run offline without touching the user's ``~/.casa``.

CASA 6.6+ wants its measures data at import time and tries to download it. We ship the
``casadata`` wheel instead and point CASA at it through casaconfig's documented per-process
hook, the ``CASASITECONFIG`` variable naming a site config file that we own. That file also
moves CASA's cache and log files under the state directory, out of the working directory.
Call :func:`prepare_casa` before anything imports ``casatools``; child processes inherit it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .products import atomic_write

_TEMPLATE = '''\
# Written by dsa110-contimg (casa_env.py): CASA offline, data from the casadata wheel.
import os as _os
measurespath = {measures!r}
datapath = [{measures!r}]
measures_auto_update = False
data_auto_update = False
skipnetworkcheck = True
cachedir = {cache!r}
startupfile = {startup!r}
logfile = _os.path.join({logdir!r}, "casa-%d.log" % _os.getpid())
nologger = True
log2term = False
'''


def casadata_path() -> str:
    import casadata  # the wheel holding geodetic/, ephemerides/, catalogs/ ...

    return str(Path(casadata.datapath).resolve())


def prepare_casa(state_dir: Path) -> Path:
    """Write the site config under ``state_dir/casa`` and export ``CASASITECONFIG``."""
    root = Path(state_dir).resolve() / "casa"
    logdir = root / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    cfg = root / "casasiteconfig.py"
    text = _TEMPLATE.format(measures=casadata_path(), cache=str(root),
                            startup=str(root / "startup.py"), logdir=str(logdir))
    if not cfg.exists() or cfg.read_text() != text:
        atomic_write(cfg, text)
    os.environ["CASASITECONFIG"] = str(cfg)
    # casatasks imports matplotlib, which would otherwise write its font cache under HOME.
    mpl = root / "matplotlib"
    mpl.mkdir(exist_ok=True)
    os.environ.setdefault("MPLCONFIGDIR", str(mpl))
    return cfg


def casa_log_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "casa" / "logs"
