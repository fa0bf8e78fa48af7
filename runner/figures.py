"""How a measured figure is shown to a person: rounded to what means something (eval loss 7.648, not
7.648067477817449). Records, metrics files and MLflow keep the full values."""

import math
from typing import Any


def figure(value: Any) -> str:
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.3f}"
    return f"{value:.3g}"
