"""Where a group's products live: OUTPUT_DIR/YYYY-MM-DD/<group-id>/ (never deleted automatically)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BadInputError

#: MS table keyword holding the conversion stage's completion record (read by later stages)
CONVERSION_RECORD = "contimg_conversion"

_GROUP_ID = re.compile(r"^(\d{4}-\d{2}-\d{2})T\d{2}:\d{2}:\d{2}$")


def product_dir(output_dir: Path, group_id: str) -> Path:
    """The group's product directory; refuses ids that are not plain timestamps (no '..')."""
    m = _GROUP_ID.match(group_id)
    if not m:
        raise BadInputError(f"group id {group_id!r} is not a YYYY-MM-DDTHH:MM:SS timestamp")
    return Path(output_dir) / m.group(1) / group_id


def safe_stem(group_id: str) -> str:
    """The group id as a file-name stem CASA tolerates (no ':' in table names)."""
    product_dir(Path("."), group_id)
    return group_id.replace(":", "")
