"""Add to the worker forkserver's preload list: parses astropy's IERS table and loads the
conversion kernel once.

Every conversion needs UT1-UTC (LSTs, apparent coordinates). astropy parses its bundled
IERS-A text table on first use, ~1.8 s in every fresh worker process; parsed in the
forkserver, each forked worker inherits it for free. Offline: never tries to download.
"""

from __future__ import annotations

from astropy.utils import iers

from ..instrument import offline_astropy

offline_astropy()
iers.earth_orientation_table.get()

# The conversion's compiled kernel: importing numba and loading the cached machine code
# costs ~0.6 s, once here instead of in every worker.
from . import kernel  # noqa: E402

kernel.warm()
