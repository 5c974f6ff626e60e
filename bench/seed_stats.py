"""Seed statistics for the benchmarks: mean and std over seeds, and Welch's two-sided t-test.

The p-value uses scipy's Student t when it is installed, else the regularized incomplete beta below (tested
against scipy and Welch's textbook example in tests/test_bench_kd_vs_ce.py).
"""

import math
import statistics


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def welch_t(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and its Welch-Satterthwaite degrees of freedom for mean(a) - mean(b). A sample of
    one value is a constant (variance 0): the test is then the one-sample t-test of the other against it."""
    va = statistics.variance(a) / len(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) / len(b) if len(b) > 1 else 0.0
    diff = statistics.fmean(a) - statistics.fmean(b)
    se2 = va + vb
    if se2 == 0:
        return (0.0 if diff == 0 else math.copysign(math.inf, diff)), math.inf
    df = se2 ** 2 / sum(v ** 2 / (len(x) - 1) for v, x in ((va, a), (vb, b)) if len(x) > 1)
    return diff / math.sqrt(se2), df


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom: scipy's, else I_x(df/2, 1/2) / 2 with
    x = df / (df + t^2), the regularized incomplete beta (`_betainc`)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2))
    try:
        from scipy.stats import t as student_t
        return float(student_t.sf(t, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn here
        tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
        return tail if t > 0 else 1 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0 else
                                  -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 / (1 + num * d if abs(1 + num * d) > 1e-300 else 1e-300)
        c = 1 + num / c if abs(1 + num / c) > 1e-300 else 1e-300
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of equal means; None when there is no spread to test against (neither
    sample has two values, or neither varies: e.g. a teacher's figure, the same shards in every seed, against a
    constant reference)."""
    if len(a) < 2 and len(b) < 2:
        return None
    t, df = welch_t(a, b)
    if math.isinf(df):
        return None
    return min(1.0, 2 * student_t_sf(abs(t), df))
