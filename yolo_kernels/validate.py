"""What the input checks of every family share: the bound on normalised box sizes and the error
that names the first bad row. (Each family's checks: ``anchor/validate.py``, ``anchor_free/validate.py``.)"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_BOX_SIZE", "first_bad_row"]

#: The largest normalised box width or height accepted. Real pipelines clip boxes to the image
#: (w, h <= 1); an unclipped crop can leave a box a little larger than the image. Boxes in pixels
#: are far above 2 (a row of them trains silently on wrong cells otherwise), so they are rejected.
#: A size of 0 is accepted: such a box matches no anchor, as in the originals (both families).
MAX_BOX_SIZE = 2.0


def first_bad_row(bad: np.ndarray, values: np.ndarray, message: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = values[row].tolist()
        shown = [float(f"{v:.7g}") for v in value] if isinstance(value, list) else float(f"{value:.7g}")
        raise ValueError(f"{message}, got {shown} at row {row}")
