"""Sky and beam helpers the simulator uses: the instrument's own (one definition)."""

from __future__ import annotations

from ..instrument import C_M_S, airy_power, enu_unit, pointing_altaz

__all__ = ["C_M_S", "airy_power", "enu_unit", "pointing_altaz"]
