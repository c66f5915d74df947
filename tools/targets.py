"""The targets table of docs/performance.md, rendered from the JSON that ``fsam-bench --json`` and
``fsam-reproduce`` write (no verdict is typed by hand).

    python -m tools.targets                                    # print, from docs/perf/*.json and docs/results/*.json
    python -m tools.targets --bench b1.json b2.json --reproduce docs/results/results.json --write docs/performance.md

``--write`` replaces the text between ``<!-- targets:begin -->`` and ``<!-- targets:end -->``.

The rule: a target is **met** only if its bound holds at the worst timed run of the variant the
target names (no other method stands in for it) and, for memory, beyond the memory resolution;
otherwise it is "not met", "not resolved" (the data cannot decide it) or "not measured" (no JSON
holds that variant in that setting). Exactly:

* Step time (bound B on variant / AdamW): in every bench JSON of the target's setting (preset, ZeRO
  stage, ranks), the worst ratio is the largest per-round ratio ``t_variant[i] / t_AdamW[i]`` when
  the run was interleaved (round i of both ran back to back under the same load), or
  ``max(t_variant) / median(t_AdamW)`` when it was sequential. For an ``ascent_every: k`` variant,
  whose cost is a cycle's (one step of k computes the ascent), the interleaved ratio is taken over
  every k rounds in a row, ``sum(t_variant[i:i+k]) / sum(t_AdamW[i:i+k])`` (each such window holds
  exactly one computing step), the largest over i; sequential, ``sum(t_variant[i:i+k]) / (k x
  median(t_AdamW))``; with fewer than k timed rounds, as for any other variant (the computing round
  then decides). Met iff the largest of those over all the files is <= B; not met otherwise.
* Memory (bound B on the variant's own memory / AdamW's): with r the resolution of one reading
  (``memory_resolution_bytes`` in the bench JSON: 15 MiB for the CPU resident set, 0 for CUDA's
  allocator), a difference of two readings is good to u = 2r. With d = own_variant - own_AdamW and
  the allowance A = (B - 1) x own_AdamW: not resolved if A <= u (the bound is finer than the
  measurement); met iff d + u <= A and d >= -u (a reading below AdamW's by more than u means the
  resolution is not what it says); not met iff d - u > A; not resolved otherwise. Over several
  files: not met if any is, met if all are, not resolved otherwise.
* Eval-loss retention (the variant keeps >= share of the exact method's gain over AdamW), from
  ``fsam-reproduce`` JSON, fresh seeds only (the exact method and AdamW: rows that
  :func:`tools.verdicts.is_exact` accepts; the variant: its ``ascent_every`` and
  ``ascent_direction``): :func:`tools.verdicts.retention` (per seed
  ``(AdamW - variant) - share (AdamW - exact)``, its 95% t interval above 0, decided only where the
  exact method's own gain is reproduced): reproduced -> met, contradicted -> not met, inconclusive
  -> not resolved.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tools import verdicts

PROG = "fsam-targets"
REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- targets:begin -->", "<!-- targets:end -->"
MET, NOT_MET, NOT_RESOLVED, NOT_MEASURED = "met", "not met", "not resolved", "not measured"
MIB = 2**20
DEFAULT_CPU_RESOLUTION = 15 * MIB

Z0_2M = {"preset": "2m", "zero_stage": 0, "world_size": 1}
Z0_24M = {"preset": "24m", "zero_stage": 0, "world_size": 1}
Z3_2M = {"preset": "2m", "zero_stage": 3, "world_size": 2}
Z3_24M = {"preset": "24m", "zero_stage": 3, "world_size": 2}


def _where(s: Mapping[str, Any]) -> str:
    return f"{s['preset']}, ZeRO-{s['zero_stage']}, {s['world_size']} rank(s)"


TARGETS: List[Dict[str, Any]] = (
    [
        {
            "kind": "time",
            "variant": v,
            "bound": 2.05,
            "setting": s,
            "title": f"exact {v} <= 2.05x AdamW step time, {_where(s)}",
        }
        for s in (Z0_2M, Z0_24M, Z3_2M, Z3_24M)
        for v in ("FunctionalSAM", "PreconditionedFunctionalSAM")
    ]
    + [
        {
            "kind": "memory",
            "variant": "PreconditionedFunctionalSAM+recompute",
            "bound": 1.10,
            "setting": s,
            "title": f'PreconditionedFunctionalSAM `"recompute"` own peak memory <= 1.10x AdamW, {_where(s)}',
        }
        for s in (Z0_2M, Z0_24M, Z3_2M)
    ]
    + [
        {
            "kind": "time",
            "variant": "PreconditionedFunctionalSAM+every4",
            "bound": 1.35,
            "setting": s,
            "title": "sub-2x mode: PreconditionedFunctionalSAM `ascent_every: 4` <= 1.35x AdamW step time, "
            f"{_where(s)}",
        }
        for s in (Z0_2M, Z3_2M)
    ]
    + [
        {
            "kind": "retention",
            "method": "PreconditionedFunctionalSAM",
            "every": 4,
            "share": 0.8,
            "variant": "PreconditionedFunctionalSAM ascent_every 4",
            "title": "sub-2x mode: PreconditionedFunctionalSAM `ascent_every: 4` keeps >= 80% of exact "
            "PreconditionedFunctionalSAM's eval-loss gain over AdamW (fresh seeds)",
        }
    ]
    # ascent_direction "momentum": compute model 4/3 (a forward at theta for g_F plus pass 2, no
    # pass-1 backward); the bound allows 5% over it for the ascent's elementwise work
    + [
        {
            "kind": "time",
            "variant": "PreconditionedFunctionalSAM+momentum",
            "bound": 1.40,
            "setting": s,
            "title": f'sub-2x mode: PreconditionedFunctionalSAM `ascent_direction: "momentum"` <= 1.40x AdamW step '
            f"time, {_where(s)}",
        }
        for s in (Z0_2M, Z3_2M)
    ]
    + [
        {
            "kind": "retention",
            "method": "PreconditionedFunctionalSAM",
            "every": 1,
            "direction": "momentum",
            "share": 0.8,
            "variant": "PreconditionedFunctionalSAM ascent_direction momentum",
            "title": 'sub-2x mode: PreconditionedFunctionalSAM `ascent_direction: "momentum"` keeps >= 80% of exact '
            "PreconditionedFunctionalSAM's eval-loss gain over AdamW (fresh seeds)",
        }
    ]
)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def bench_setting(doc: Mapping[str, Any]) -> Dict[str, Any]:
    s = doc.get("setting") or doc.get("args") or {}
    return {
        "preset": s.get("preset"),
        "zero_stage": s.get("zero_stage"),
        "world_size": s.get("world_size", 1),
        "sequential": bool(s.get("sequential", False)),
    }


def is_bench(doc: Mapping[str, Any]) -> bool:
    return isinstance(doc.get("rows"), list) and ("setting" in doc or "args" in doc) and "runs" not in doc


def is_reproduce(doc: Mapping[str, Any]) -> bool:
    return str(doc.get("schema", "")).startswith("fsam-reproduce/") and isinstance(doc.get("runs"), list)


def load(paths: Sequence[str]) -> List[Dict[str, Any]]:
    out = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        doc["_path"] = str(p)
        out.append(doc)
    return out


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------


def _row(doc: Mapping[str, Any], variant: str) -> Optional[Mapping[str, Any]]:
    return next((r for r in doc["rows"] if r.get("variant") == variant), None)


def _the_row(doc: Mapping[str, Any], variant: str) -> Mapping[str, Any]:
    """The row of ``variant`` in a bench JSON that has one (:func:`_matching` chose it)."""
    row = _row(doc, variant)
    if row is None:
        raise KeyError(f"bench JSON without a row {variant!r}")
    return row


def _matching(benches: Sequence[Mapping[str, Any]], target: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    out = []
    for d in benches:
        s = bench_setting(d)
        if all(s.get(k) == v for k, v in target["setting"].items()) and _row(d, target["variant"]) and _row(d, "AdamW"):
            out.append(d)
    return out


def worst_time_ratio(doc: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """The variant's worst step-time ratio to AdamW in one bench JSON (see the module docstring)."""
    row = _the_row(doc, variant)
    tv = [float(x) for x in row["times_s"]]
    ta = [float(x) for x in _the_row(doc, "AdamW")["times_s"]]
    med = statistics.median(tv) / statistics.median(ta)
    k = int(row.get("every") or _every_of(variant))
    if 1 < k <= len(tv):  # ascent_every k: the cost of a cycle (k rounds in a row hold one ascent)
        whole = {"median": med, "whole": sum(tv) / (len(tv) * statistics.median(ta))}
        if not bench_setting(doc)["sequential"] and len(tv) == len(ta) and all(x > 0 for x in ta):
            windows = [sum(tv[i : i + k]) / sum(ta[i : i + k]) for i in range(len(tv) - k + 1)]
            whole["whole"] = sum(tv) / sum(ta)
            return {"worst": max(windows), "how": f"per {k} rounds in a row", **whole}
        windows = [sum(tv[i : i + k]) / (k * statistics.median(ta)) for i in range(len(tv) - k + 1)]
        return {"worst": max(windows), "how": f"{k} rounds in a row / {k} x AdamW median", **whole}
    if not bench_setting(doc)["sequential"] and len(tv) == len(ta) and all(x > 0 for x in ta):
        return {"worst": max(v / a for v, a in zip(tv, ta)), "median": med, "how": "per round"}
    return {"worst": max(tv) / statistics.median(ta), "median": med, "how": "max / AdamW median"}


def _every_of(variant: str) -> int:
    """k of a ``...+everyK`` variant name (older JSON rows carry no ``every``), else 1."""
    m = re.search(r"\+every(\d+)", variant)
    return int(m.group(1)) if m else 1


def time_result(target: Mapping[str, Any], benches: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    docs = _matching(benches, target)
    if not docs:
        return {"result": NOT_MEASURED, "data": "no bench JSON of this setting holds the variant"}
    per = [(d["_path"], worst_time_ratio(d, target["variant"])) for d in docs]
    worst = max(w["worst"] for _, w in per)
    res = MET if worst <= target["bound"] else NOT_MET
    data = "; ".join(
        f"`{Path(p).name}`: worst {w['worst']:.2f}x ({w['how']}), "
        + (f"whole run {w['whole']:.2f}x" if "whole" in w else f"median {w['median']:.2f}x")
        for p, w in per
    )
    return {"result": res, "data": data, "worst": worst}


def memory_decision(own_v: float, own_a: float, bound: float, resolution: float) -> str:
    """The memory rule on one pair of readings (bytes)."""
    u = 2.0 * resolution
    allowance = (bound - 1.0) * own_a
    d = own_v - own_a
    if allowance <= u:
        return NOT_RESOLVED
    if d + u <= allowance and d >= -u:
        return MET
    if d - u > allowance:
        return NOT_MET
    return NOT_RESOLVED


def memory_result(target: Mapping[str, Any], benches: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    docs = [
        d
        for d in _matching(benches, target)
        if _the_row(d, target["variant"]).get("own_bytes") is not None and _the_row(d, "AdamW").get("own_bytes")
    ]
    if not docs:
        return {"result": NOT_MEASURED, "data": "no bench JSON of this setting holds the variant's own memory"}
    parts, results = [], []
    for d in docs:
        res = d.get("memory_resolution_bytes")
        if res is None:
            res = DEFAULT_CPU_RESOLUTION if d.get("device", "cpu") == "cpu" else 0
        ov, oa = float(_the_row(d, target["variant"])["own_bytes"]), float(_the_row(d, "AdamW")["own_bytes"])
        r = memory_decision(ov, oa, target["bound"], float(res))
        results.append(r)
        parts.append(
            f"`{Path(d['_path']).name}`: own {ov / MIB:.1f} vs AdamW {oa / MIB:.1f} MiB ({ov / oa:.2f}x; "
            f"difference {(ov - oa) / MIB:+.1f} MiB, allowance {(target['bound'] - 1) * oa / MIB:.1f} MiB, "
            f"resolution +-{2 * res / MIB:.0f} MiB): {r}"
        )
    if NOT_MET in results:
        out = NOT_MET
    elif all(r == MET for r in results):
        out = MET
    else:
        out = NOT_RESOLVED
    return {"result": out, "data": "; ".join(parts)}


def retention_result(target: Mapping[str, Any], reproduces: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    parts, results = [], []
    for doc in reproduces:
        s = doc["settings"]
        fresh, m, k = set(s.get("fresh_seeds") or []), target["method"], target["every"]
        rows = [r for r in doc["runs"] if r["seed"] in fresh and r.get("steps") in (None, s["steps"])]
        rho, lr = doc["best_rho"].get(m), doc.get("lr")

        def vals(method, every, direction=verdicts.GRADIENT, rows=rows, rho=rho, lr=lr):
            return {
                r["seed"]: r["eval_loss"]
                for r in rows
                if r["method"] == method
                and verdicts.is_variant(r, every, direction)
                and r.get("eval_loss") is not None
                and (
                    method == "AdamW"
                    and abs(r["lr"] - lr) < 1e-15
                    or method != "AdamW"
                    and rho is not None
                    and abs(r["rho"] - rho) < 1e-12
                )
            }

        v = vals(m, k, target.get("direction", verdicts.GRADIENT))
        if not v:
            continue
        # AdamW and the exact method: verdicts.is_exact rows only (never a momentum or every-k run)
        ret = verdicts.retention(vals("AdamW", 1), vals(m, 1), v, share=target["share"])
        r = {verdicts.REPRODUCED: MET, verdicts.CONTRADICTED: NOT_MET}.get(ret["verdict"], NOT_RESOLVED)
        results.append(r)
        kept = f", point share {ret['kept_point']:.0%}" if ret.get("kept_point") is not None else ""
        parts.append(
            f"`{Path(doc['_path']).name}` ({s.get('dataset', '?')}, {s['preset']}, {s['steps']} steps): "
            f"{verdicts.fmt_interval(ret['parts'][0])}{kept}" + (f" ({ret['note']})" if ret["note"] else "")
        )
    if not results:
        return {"result": NOT_MEASURED, "data": "no fsam-reproduce JSON holds fresh-seed runs of the variant"}
    out = NOT_MET if NOT_MET in results else MET if all(r == MET for r in results) else NOT_RESOLVED
    return {"result": out, "data": "; ".join(parts)}


def evaluate(
    benches: Sequence[Mapping[str, Any]],
    reproduces: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]] = TARGETS,
) -> List[Dict[str, Any]]:
    out = []
    for t in targets:
        if t["kind"] == "time":
            r = time_result(t, benches)
        elif t["kind"] == "memory":
            r = memory_result(t, benches)
        elif t["kind"] == "retention":
            r = retention_result(t, reproduces)
        else:
            raise ValueError(f"unknown target kind {t['kind']!r}")
        out.append({**t, **r})
    return out


def render(results: Sequence[Mapping[str, Any]], sources: Sequence[str]) -> str:
    lines = [
        "Rendered by `python -m tools.targets` from "
        + (", ".join(f"`{s}`" for s in sources) if sources else "no JSON (none committed yet)")
        + "; the rule is in `tools/targets.py`: met only if the bound holds at the worst timed run of the "
        "variant the target names and, for memory, beyond the memory resolution (+-2 x the resolution of one "
        'reading); "not resolved": the data cannot decide; "not measured": no JSON holds it.',
        "",
        "| target | variant | data | result |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r['title']} | `{r['variant']}` | {r['data']} | **{r['result']}** |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the file has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + block + END + tail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Render the targets table of docs/performance.md from fsam-bench and fsam-reproduce JSON"
    )
    p.add_argument("--bench", nargs="*", default=None, help="fsam-bench --json files (default docs/perf/*.json)")
    p.add_argument("--reproduce", nargs="*", default=None, help="fsam-reproduce JSON (default docs/results/*.json)")
    p.add_argument("--write", default=None, metavar="MD", help=f"replace the {BEGIN} block of this file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    bench = a.bench if a.bench is not None else sorted(glob.glob(str(REPO / "docs" / "perf" / "*.json")))
    repro = a.reproduce if a.reproduce is not None else sorted(glob.glob(str(REPO / "docs" / "results" / "*.json")))
    try:
        docs = load(list(bench) + list(repro))
    except (OSError, json.JSONDecodeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    benches = [d for d in docs if is_bench(d)]
    reproduces = [d for d in docs if is_reproduce(d)]
    bad = [d["_path"] for d in docs if not is_bench(d) and not is_reproduce(d)]
    if bad:
        print(f"{PROG}: error: not fsam-bench or fsam-reproduce JSON: {', '.join(bad)}", file=sys.stderr)
        return 2

    def rel(p):
        try:
            return str(Path(p).resolve().relative_to(REPO))
        except ValueError:
            return str(p)

    block = render(evaluate(benches, reproduces), [rel(d["_path"]) for d in docs])
    if a.write:
        path = Path(a.write)
        try:
            path.write_text(replace_block(path.read_text(), block))
        except (OSError, ValueError) as err:
            print(f"{PROG}: error: --write {a.write}: {err}", file=sys.stderr)
            return 2
    else:
        print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
