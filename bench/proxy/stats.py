"""The interval both `table.py` and `pooled.py` print for per-round ratios."""
import math
import statistics

# Student's t at 0.975 for 1..30 degrees of freedom (1.96 past 30).
_T975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
         2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def geomean_ci(ratios):
    """Geometric mean of `ratios` and its 95% interval (Student's t on their
    logarithms), as (mean, low, high); low and high are None for fewer than
    two ratios."""
    logs = [math.log(r) for r in ratios]
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), None, None
    df = len(logs) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    h = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def format_ci(ratios):
    """`geomean_ci` as text: `1.234 [1.100, 1.380]`."""
    m, lo, hi = geomean_ci(ratios)
    return f"{m:.3f}" if lo is None else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
