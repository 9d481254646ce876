#!/usr/bin/env python3
"""Reference values for src/stats from SciPy, written to tests/fixtures/stats_scipy.json.

Run with any Python that has numpy and scipy (scripts/bench-verify makes such a venv):
    python3 scripts/stats-fixtures.py
Each case records its inputs and SciPy's outputs; tests/it/stats.rs compares hallmark's tests to
them (1e-9 relative where SciPy computes exactly, 1e-6 where SciPy approximates).
"""
import json
import os

import numpy as np
import scipy
from scipy import stats

rng = np.random.default_rng(20261125)
cases = {"scipy": scipy.__version__, "ttest": [], "wilcoxon_exact": [], "wilcoxon_approx": [],
         "binomial": [], "mcnemar": []}

# One-sided paired t-test with margin: H1 mean(d) > tau, i.e. ttest_rel(P_w, P_b + tau, 'greater').
for n, shift, tau in [(5, 0.5, 0.2), (10, 0.3, 0.2), (30, 0.25, 0.2), (100, 0.0, 0.2), (100, 0.9, 0.2),
                      (20, 0.2, 0.0), (3, 0.7, 0.2), (50, 0.05, 0.1)]:
    pb = rng.uniform(0, 0.3, n)
    pw = np.clip(pb + shift + rng.normal(0, 0.15, n), 0, 1)
    r = stats.ttest_rel(pw, pb + tau, alternative="greater")
    for alpha in [0.01, 0.05]:
        ci = r.confidence_interval(confidence_level=1 - alpha)
        cases["ttest"].append({"d": (pw - pb).tolist(), "tau": tau, "alpha": alpha, "statistic": float(r.statistic),
                               "pvalue": float(r.pvalue), "ci_low": float(ci.low) + tau})

# Wilcoxon signed-rank on d - tau, one-sided 'greater' (zeros dropped).
for n, shift in [(5, 0.3), (8, 0.0), (12, 0.2), (20, -0.1), (30, 0.15), (50, 0.05)]:
    d = rng.normal(shift, 0.3, n)
    r = stats.wilcoxon(d, alternative="greater", method="exact")
    cases["wilcoxon_exact"].append({"d": d.tolist(), "tau": 0.0, "statistic": float(r.statistic), "pvalue": float(r.pvalue)})
for n, shift, rounding in [(60, 0.1, None), (100, 0.3, 1), (80, 0.0, 1), (200, 0.05, 2), (15, 0.2, 1)]:
    d = rng.normal(shift, 0.4, n)
    if rounding is not None:
        d = np.round(d, rounding)  # ties and zeros
    r = stats.wilcoxon(d, alternative="greater", method="approx", correction=True, zero_method="wilcox")
    cases["wilcoxon_approx"].append({"d": d.tolist(), "tau": 0.0, "statistic": float(r.statistic), "pvalue": float(r.pvalue)})

# Exact binomial test, H1 p > p0, with the Clopper-Pearson one-sided lower bound.
for k, n, p0 in [(0, 10, 0.2), (3, 10, 0.2), (9, 10, 0.2), (95, 100, 0.2), (30, 100, 0.2), (50, 50, 0.2), (7, 20, 0.5), (1, 1, 0.2)]:
    r = stats.binomtest(k, n, p0, alternative="greater")
    for alpha in [0.01, 0.05]:
        ci = r.proportion_ci(confidence_level=1 - alpha, method="exact")
        cases["binomial"].append({"k": k, "n": n, "p0": p0, "alpha": alpha, "pvalue": float(r.pvalue), "ci_low": float(ci.low)})

# Exact McNemar, one-sided: n01 = pairs hit only when triggered, n10 = only when benign.
for n01, n10 in [(10, 0), (5, 5), (0, 4), (40, 3), (12, 9), (1, 0)]:
    r = stats.binomtest(n01, n01 + n10, 0.5, alternative="greater")
    cases["mcnemar"].append({"n01": n01, "n10": n10, "pvalue": float(r.pvalue)})

out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "stats_scipy.json")
with open(out, "w") as f:
    json.dump(cases, f, indent=1)
    f.write("\n")
print("wrote", out)
