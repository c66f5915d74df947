"""The verdict rules of ``fsam-reproduce`` and ``tools.targets``: pure functions, no torch.

Every verdict comes from an interval, never from the sign of a difference:

* Runs are compared **paired by seed**: the same seed gives every method the same initialisation
  and data order, so for a claim "A is lower than B" the statistic is the per-seed difference
  ``d_s = A_s - B_s`` over the seeds both have.
* The interval is the **95% Student t interval of the mean paired difference**:
  ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` (``sd`` with ``n - 1`` in the denominator). The t
  quantile is computed here (regularised incomplete beta function, bisection), no scipy.
* **The verdict follows from the interval alone**: "reproduced" only if the whole interval lies on
  the side the claim names (strictly: an interval touching 0 is not on either side), "contradicted"
  only if the whole interval lies on the other side, "inconclusive" otherwise, and always
  "inconclusive" with fewer than 2 pairs (no interval exists).
* An optional ``widen`` (>= 0) is added on both sides of the interval before the verdict: the
  lambda_max rule widens by the Lanczos residuals, so a gap must exceed the residual *and* the seed
  interval.
* A claim made of several comparisons ("beats SAM and AdamW") is reproduced only if every part is,
  contradicted if any part is, inconclusive otherwise (:func:`all_of`).

Only *fresh* seeds enter a verdict: the seeds used to choose the learning rate and rho (the
selection seeds) are never among the rows given to :func:`claims` (the runner filters them, and
:func:`claims` takes the fresh seeds explicitly and drops every other row). Only the exact
methods enter a claim or stand as the exact reference of a sub-2x variant: :func:`is_exact`
(``ascent_every`` 1 and ``ascent_direction`` "gradient"; a row without the field is "gradient").
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from fsam_ds.names import METHODS, SAM_METHODS

LEVEL = 0.95
REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
RULE = (
    "paired by seed; mean paired difference with its 95% Student t interval; reproduced only if the "
    "whole interval lies on the claimed side, contradicted only if it lies wholly on the other side, "
    "inconclusive otherwise or with fewer than 2 pairs"
)

SAM_TYPES = SAM_METHODS
TOLERANCE_PAIRS = (("FunctionalSAM", "SAM"), ("PreconditionedFunctionalSAM", "PreconditionedSAM"))


# ---------------------------------------------------------------------------------------------
# Student t
# ---------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def z_quantile(p: float) -> float:
    """The normal quantile (the t quantile's limit), by bisection on erf."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# Intervals and verdicts
# ---------------------------------------------------------------------------------------------


def interval(xs: Sequence[float], level: float = LEVEL) -> Dict[str, Any]:
    """Mean, sample sd and the two-sided ``level`` t interval of the mean of ``xs``
    (``lo``/``hi``/``half`` None with fewer than 2 values)."""
    xs = [float(x) for x in xs]
    n = len(xs)
    out: Dict[str, Any] = {
        "n": n,
        "mean": statistics.fmean(xs) if xs else None,
        "sd": None,
        "half": None,
        "lo": None,
        "hi": None,
        "t": None,
    }
    if n >= 2:
        sd = statistics.stdev(xs)
        t = t_quantile(0.5 + level / 2.0, n - 1)
        half = t * sd / math.sqrt(n)
        out.update(sd=sd, t=t, half=half, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def decide(lo: Optional[float], hi: Optional[float], side: str, n: int) -> str:
    """The verdict of a claim "the difference is < 0" (``side`` "less") or "> 0" ("greater") from its
    interval [lo, hi] alone."""
    if side not in ("less", "greater"):
        raise ValueError(f"side must be 'less' or 'greater', got {side!r}")
    if n < 2 or lo is None or hi is None:
        return INCONCLUSIVE
    if side == "less":
        return REPRODUCED if hi < 0 else CONTRADICTED if lo > 0 else INCONCLUSIVE
    return REPRODUCED if lo > 0 else CONTRADICTED if hi < 0 else INCONCLUSIVE


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Dict[int, float]:
    """Per-seed differences a_s - b_s over the seeds both have (values that are None are dropped)."""
    return {s: float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None}


def check_values(
    values: Mapping[int, float], side: str, widen: float = 0.0, level: float = LEVEL, label: str = ""
) -> Dict[str, Any]:
    """The verdict on per-seed values (a paired difference, or any per-seed statistic against 0)."""
    iv = interval(list(values.values()), level)
    lo = iv["lo"] - widen if iv["lo"] is not None else None
    hi = iv["hi"] + widen if iv["hi"] is not None else None
    return {
        "label": label,
        "side": side,
        "seeds": sorted(values),
        "values": dict(values),
        **iv,
        "widen": widen,
        "lo_widened": lo,
        "hi_widened": hi,
        "verdict": decide(lo, hi, side, iv["n"]),
    }


def compare(
    a: Mapping[int, float], b: Mapping[int, float], side: str, widen: float = 0.0, level: float = LEVEL, label: str = ""
) -> Dict[str, Any]:
    """Claim "a - b < 0" (side "less") or "> 0" ("greater"), paired by seed."""
    return check_values(paired(a, b), side, widen, level, label)


def all_of(verdicts: Iterable[str]) -> str:
    vs = list(verdicts)
    if not vs:
        return INCONCLUSIVE
    if all(v == REPRODUCED for v in vs):
        return REPRODUCED
    if any(v == CONTRADICTED for v in vs):
        return CONTRADICTED
    return INCONCLUSIVE


def seeds_needed(sd: float, half_width: float, level: float = LEVEL, normal: bool = False, n_max: int = 100000) -> int:
    """The smallest number of pairs n whose ``level`` interval half-width ``q * sd / sqrt(n)`` is at
    most ``half_width`` (q: the t quantile with n - 1 degrees of freedom, or the normal one)."""
    if sd <= 0:
        return 2
    for n in range(2, n_max + 1):
        q = z_quantile(0.5 + level / 2) if normal else t_quantile(0.5 + level / 2, n - 1)
        if q * sd / math.sqrt(n) <= half_width:
            return n
    return n_max


# ---------------------------------------------------------------------------------------------
# The paper's claims on the runner's rows
# ---------------------------------------------------------------------------------------------


GRADIENT, MOMENTUM = "gradient", "momentum"  # the values of a row's "ascent_direction"


def ascent_every_of(row: Mapping[str, Any]) -> int:
    """A row's ``ascent_every`` (1 when absent)."""
    return int(row.get("ascent_every") or 1)


def direction_of(row: Mapping[str, Any]) -> str:
    """A row's ``ascent_direction``: "gradient" (this step's pass-1 gradient, also every row
    written before the field existed) or "momentum" (AdamW's first moment)."""
    return str(row.get("ascent_direction") or GRADIENT)


def is_variant(row: Mapping[str, Any], ascent_every: int = 1, direction: str = GRADIENT) -> bool:
    """Whether ``row`` is the run of that ascent variant (``ascent_every``, ``ascent_direction``)."""
    return ascent_every_of(row) == ascent_every and direction_of(row) == direction


def is_exact(row: Mapping[str, Any]) -> bool:
    """The exact method: ``ascent_every`` 1 and the ascent from this step's gradient. Every verdict
    on a method (and every "exact" reference of a sub-2x variant) takes only these rows."""
    return is_variant(row, 1, GRADIENT)


def _rows(rows: Iterable[Mapping[str, Any]], fresh: Iterable[int], steps: Optional[int] = None) -> List[dict]:
    """The exact-method rows of fresh seeds (no ascent_every or momentum variant, the grid's horizon)."""
    fs = set(fresh)
    return [
        dict(r)
        for r in rows
        if r.get("seed") in fs and is_exact(r) and (steps is None or r.get("steps") in (None, steps))
    ]


def values(
    rows: Iterable[Mapping[str, Any]],
    method: str,
    rho: Optional[float] = None,
    key: str = "eval_loss",
    ascent_every: int = 1,
    steps: Optional[int] = None,
    direction: str = GRADIENT,
) -> Dict[int, float]:
    """{seed: row[key]} of one configuration (rho None: any; AdamW's rho is 0); by default the
    exact method's rows (``ascent_every`` 1, ``direction`` "gradient")."""
    out = {}
    for r in rows:
        if r.get("method") != method or not is_variant(r, ascent_every, direction):
            continue
        if rho is not None and method != "AdamW" and not math.isclose(float(r.get("rho", 0.0)), rho):
            continue
        if steps is not None and r.get("steps") not in (None, steps):
            continue
        if r.get(key) is not None:
            out[int(r["seed"])] = float(r[key])
    return out


def _claim(name: str, pairs: str, parts: List[dict], verdict: str, note: str = "") -> Dict[str, Any]:
    return {"claim": name, "pairs": pairs, "parts": parts, "verdict": verdict, "note": note}


def tolerance(
    rows: Sequence[Mapping[str, Any]], method: str, ref: str, best_rho: Mapping[str, float]
) -> Dict[str, Any]:
    """ "``method`` tolerates larger rho than ``ref``": at EQUAL rho, over every swept rho above both
    selected rhos (R), each method's degradation from its own selected rho on the same seed;
    per seed x_s = mean over R of [(L_m(rho) - L_m(rho*_m)) - (L_ref(rho) - L_ref(rho*_ref))];
    claimed side: x < 0 (``method`` degrades less). One interval over the seeds (per-rho parts are
    kept for the table, they take no part in the verdict)."""
    bm, br = best_rho.get(method), best_rho.get(ref)
    if bm is None or br is None:
        return _claim(
            f"{method} tolerates larger rho than {ref}",
            f"{method} vs {ref}, equal rho",
            [],
            INCONCLUSIVE,
            "one of the two methods was not run",
        )
    rhos_m = {float(r["rho"]) for r in rows if r.get("method") == method}
    rhos_r = {float(r["rho"]) for r in rows if r.get("method") == ref}
    big = sorted(x for x in rhos_m & rhos_r if x > max(bm, br) + 1e-12)
    base_m, base_r = values(rows, method, bm), values(rows, ref, br)
    per_rho: List[Dict[str, Any]] = []
    acc: Dict[int, List[float]] = {}
    for rho in big:
        dm = paired(values(rows, method, rho), base_m)
        dr = paired(values(rows, ref, rho), base_r)
        d = paired(dm, dr)
        per_rho.append(check_values(d, "less", label=f"rho {rho:g}"))
        for s, v in d.items():
            acc.setdefault(s, []).append(v)
    x = {s: statistics.fmean(v) for s, v in acc.items() if len(v) == len(big)}
    name = f"{method} tolerates larger rho than {ref}"
    pairs = (
        f"{method} vs {ref} at equal rho {', '.join(f'{r:g}' for r in big) or '(none)'} (degradation from "
        f"each one's selected rho, {bm:g} and {br:g})"
    )
    if not big:
        return _claim(
            name,
            pairs,
            [],
            INCONCLUSIVE,
            f"no swept rho with fresh-seed runs of both lies above both selected rhos ({max(bm, br):g})",
        )
    main = check_values(x, "less", label="mean over those rho")
    return _claim(name, pairs, [main] + per_rho, main["verdict"])


def lambda_claim(
    rows: Sequence[Mapping[str, Any]], method: str, best_rho: Mapping[str, float], level: float = LEVEL
) -> Dict[str, Any]:
    """ "``method`` finds solutions with smaller lambda_max (Hessian) than AdamW at equal or better eval
    loss": the paired lambda gap's interval widened on both sides by the largest sum of the two runs'
    Lanczos residuals ``||Av - lambda v||`` (a Ritz value is within its residual of an eigenvalue), so
    the gap must exceed residual and seed interval together. Reproduced iff that gap is reproduced
    and the eval loss is not significantly worse; contradicted iff the gap is contradicted or the
    eval loss is significantly worse (the claim says "at equal or better"); inconclusive otherwise."""
    rho = best_rho.get(method)
    lam_m, lam_a = values(rows, method, rho, "lambda_h"), values(rows, "AdamW", None, "lambda_h")
    res_m, res_a = values(rows, method, rho, "lambda_h_res"), values(rows, "AdamW", None, "lambda_h_res")
    common = set(lam_m) & set(lam_a)
    widen = max((res_m.get(s, math.inf) + res_a.get(s, math.inf) for s in common), default=0.0)
    gap = compare(
        lam_m,
        lam_a,
        "less",
        widen=widen if math.isfinite(widen) else 0.0,
        level=level,
        label="lambda_max H_L minus AdamW's, widened by the Lanczos residuals",
    )
    if not math.isfinite(widen):
        gap["verdict"] = INCONCLUSIVE
    worse = compare(
        values(rows, method, rho),
        values(rows, "AdamW"),
        "greater",
        level=level,
        label="eval loss minus AdamW's (claimed not worse)",
    )
    if gap["verdict"] == CONTRADICTED or worse["verdict"] == REPRODUCED:
        v = CONTRADICTED
    elif gap["verdict"] == REPRODUCED:
        v = REPRODUCED
    else:
        v = INCONCLUSIVE
    return _claim(
        f"{method} has a smaller lambda_max than AdamW at equal or better eval loss",
        f"{method} vs AdamW",
        [gap, worse],
        v,
    )


def claims(
    rows: Sequence[Mapping[str, Any]],
    best_rho: Mapping[str, float],
    fresh_seeds: Iterable[int],
    steps: Optional[int] = None,
    level: float = LEVEL,
) -> List[Dict[str, Any]]:
    """Every paper claim the runner checks, on the fresh-seed rows only (other seeds are dropped
    here). ``rows``: dicts with method, rho, seed, eval_loss and optionally ascent_every, steps,
    lambda_h, lambda_h_res, mean_max_prob, logit_fraction. ``best_rho``: the rho selected for each
    SAM type on the selection seeds."""
    rows = _rows(rows, fresh_seeds, steps)
    have = {r["method"] for r in rows}
    L = {m: values(rows, m, best_rho.get(m)) for m in have}
    out: List[Dict[str, Any]] = []

    def cmp(a, b, side):
        return compare(L[a], L[b], side, level=level, label=f"{a} minus {b}, eval loss")

    if {"SAM", "AdamW"} <= have:
        p = cmp("SAM", "AdamW", "greater")
        out.append(_claim("SAM is worse than AdamW at equal steps", "SAM vs AdamW", [p], p["verdict"]))
    if {"FunctionalSAM", "SAM"} <= have:
        p = cmp("FunctionalSAM", "SAM", "less")
        out.append(_claim("FunctionalSAM improves on SAM", "FunctionalSAM vs SAM", [p], p["verdict"]))
    for m in ("PreconditionedFunctionalSAM", "PreconditionedSAM"):
        if m in have and "AdamW" in have:
            parts = [cmp(m, "SAM", "less")] if "SAM" in have else []
            parts.append(cmp(m, "AdamW", "less"))
            note = "" if "SAM" in have else "SAM was not run: the SAM part is missing"
            v = all_of(p["verdict"] for p in parts) if "SAM" in have else INCONCLUSIVE
            out.append(_claim(f"{m} beats SAM and AdamW", f"{m} vs SAM, {m} vs AdamW", parts, v, note))
    for m, ref in TOLERANCE_PAIRS:
        if m in have and ref in have:
            out.append(tolerance(rows, m, ref, best_rho))
    if "SAM" in have and best_rho.get("SAM") is not None:
        bs = best_rho["SAM"]
        big = sorted({float(r["rho"]) for r in rows if r["method"] == "SAM" and float(r["rho"]) > bs + 1e-12})
        base = values(rows, "SAM", bs)
        sam_acc: Dict[int, List[float]] = {}
        for rho in big:
            for s, d_s in paired(values(rows, "SAM", rho), base).items():
                sam_acc.setdefault(s, []).append(d_s)
        x = {s: statistics.fmean(ds) for s, ds in sam_acc.items() if len(ds) == len(big)}
        p = check_values(x, "greater", level=level, label="SAM's mean degradation above its selected rho")
        big_rhos = ", ".join(f"{r:g}" for r in big) or "(none)"
        out.append(
            _claim(
                "SAM degrades as rho grows past its best",
                f"SAM at rho {big_rhos} vs SAM at {bs:g}",
                [p],
                p["verdict"] if big else INCONCLUSIVE,
                "" if big else "no fresh-seed SAM run above its selected rho",
            )
        )
    if "AdamW" in have:
        for m in SAM_TYPES:
            if m in have:
                out.append(lambda_claim(rows, m, best_rho, level))
    fr = [m for m in METHODS if m in have]
    parts = []
    for m in fr:
        lf = values(rows, m, best_rho.get(m), "logit_fraction")
        if lf:
            parts.append(
                check_values(
                    {s: v - 0.5 for s, v in lf.items()}, "greater", level=level, label=f"{m}: logit fraction minus 0.5"
                )
            )
    if parts:
        out.append(
            _claim(
                "The logit path dominates the sharpness along the gradient (fraction > 0.5)",
                "each method against 0.5",
                parts,
                all_of(p["verdict"] for p in parts),
            )
        )
    if {"SAM", "AdamW"} <= have:
        p = compare(
            values(rows, "SAM", best_rho.get("SAM"), "mean_max_prob"),
            values(rows, "AdamW", None, "mean_max_prob"),
            "greater",
            level=level,
            label="SAM minus AdamW, mean max-probability",
        )
        if p["n"]:
            out.append(_claim("SAM makes predictions more confident", "SAM vs AdamW", [p], p["verdict"]))
    return out


def retention(
    adamw: Mapping[int, float],
    exact: Mapping[int, float],
    variant: Mapping[int, float],
    share: float = 0.8,
    level: float = LEVEL,
) -> Dict[str, Any]:
    """ "``variant`` keeps at least ``share`` of ``exact``'s eval-loss gain over AdamW": per seed
    d_s = (A_s - V_s) - share * (A_s - E_s), claimed side d > 0 (a linear form: no ratio of noisy
    means). It is only decided where the exact method's own gain is reproduced (E - A < 0 on its
    interval); otherwise inconclusive (the share of an unresolved gain means nothing)."""
    seeds = sorted(set(adamw) & set(exact) & set(variant))
    d = {s: (adamw[s] - variant[s]) - share * (adamw[s] - exact[s]) for s in seeds}
    main = check_values(d, "greater", level=level, label=f"(AdamW - variant) - {share:g} x (AdamW - exact)")
    gain = compare(
        {s: exact[s] for s in seeds},
        {s: adamw[s] for s in seeds},
        "less",
        level=level,
        label="exact minus AdamW, eval loss",
    )
    v = main["verdict"] if gain["verdict"] == REPRODUCED else INCONCLUSIVE
    note = "" if gain["verdict"] == REPRODUCED else "the exact method's own gain over AdamW is not resolved"
    a_m = statistics.fmean(adamw[s] for s in seeds) if seeds else None
    kept = None
    if a_m is not None:
        g = a_m - statistics.fmean(exact[s] for s in seeds)
        kept = (a_m - statistics.fmean(variant[s] for s in seeds)) / g if g else None
    return {
        "claim": f"keeps >= {share:.0%} of the exact method's gain",
        "parts": [main, gain],
        "verdict": v,
        "note": note,
        "kept_point": kept,
        "n": len(seeds),
    }


def fmt_interval(p: Mapping[str, Any], spec: str = "+.4f") -> str:
    """ "+0.0123 [-0.0040, +0.0286] (n=4)" or "+0.0123 (n=1, no interval)"."""
    if p.get("mean") is None:
        return "no pairs"
    if p.get("lo") is None:
        return f"{format(p['mean'], spec)} (n={p['n']}, no interval)"
    s = f"{format(p['mean'], spec)} [{format(p['lo'], spec)}, {format(p['hi'], spec)}] (n={p['n']})"
    if p.get("widen"):
        s += f", widened by {p['widen']:.3g} to [{format(p['lo_widened'], spec)}, {format(p['hi_widened'], spec)}]"
    return s
