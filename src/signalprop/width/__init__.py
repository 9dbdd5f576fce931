"""Width: the muP coordinate check with a verdict per layer (``sp.coord_check``).

Imports ``records``, ``init`` (the fans rule) and ``sweep``; drawing lives in
``report.coord_html``.
"""

from .coord import OPTIMIZERS, coord_check, optimizer, summarize
from .records import COORD_VERDICTS, CoordCheck, CoordLayer, CoordSeries, CoordVerdict

__all__ = ["COORD_VERDICTS", "CoordCheck", "CoordLayer", "CoordSeries", "CoordVerdict", "OPTIMIZERS", "coord_check", "optimizer",
           "summarize"]
