"""compare.py's figures: the decode floor, engine-vs-engine ratios and the closing table."""

from __future__ import annotations

import os

from benchmarks.compare_models import MODELS

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def llc_bytes() -> int:
    """Size of the last-level cache of cpu0 (0 when unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for idx in [d for d in os.listdir(base) if d.startswith("index")]:
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
    except (OSError, ValueError):
        return 0
    return best


def decode_floor(model: str, dtype: str, workload_desc: dict, read_gbs: float) -> dict:
    """Bytes one decode step must read (all weights it touches + the KV cache at the mean
    context length of the decode) over the read bandwidth measured before this engine ran."""
    shape = MODELS[model]
    nbytes = DTYPE_BYTES[dtype]
    weights = shape.weight_bytes_per_decode_step(nbytes)
    mean_ctx = workload_desc["input"] + workload_desc["output"] / 2
    kv = int(shape.kv_bytes_per_token(nbytes) * mean_ctx)
    llc = llc_bytes()
    return {"weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
            "read_gbs": read_gbs, "llc_bytes": llc,
            # weights that fit in the last-level cache need not come from DRAM each step
            "fits_in_llc": bool(llc) and weights + kv < llc,
            "floor_ms": round(1e3 * (weights + kv) / (read_gbs * 1e9), 3)}


def annotate(row: dict, engine: str, model: str, dtype: str, bw: dict, spec: dict) -> dict:
    out = {"engine": engine, "model": model, "dtype": dtype, **row,
           "read_gbs": bw["read_gbs_best"], "copy_gbs": bw["copy_gbs_best"],
           "loadavg_before": [round(x, 2) for x in bw["loadavg"]]}
    if "decode_ms_per_token" in row:
        first = next(w for w in spec["workloads"] if w["name"] == row["workload"])["repeats"][0][0]
        desc = {"input": len(first["prompt_token_ids"]), "output": first["max_tokens"]}
        floor = decode_floor(model, dtype, desc, bw["read_gbs_best"])
        out["floor"] = floor
        out["floor_ms"] = floor["floor_ms"]
        out["fraction_of_floor"] = round(floor["floor_ms"] / row["decode_ms_per_token"], 3)
    return out


def add_ratios(rows: list[dict]) -> None:
    """Per row: this engine's output tok/s over every other engine's on the same
    (model, dtype, workload); for decode also their ms/token over this one's (>1 = faster)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["workload"]), {})[r["engine"]] = r
    for by_engine in groups.values():
        for engine, r in by_engine.items():
            others = {e: o for e, o in by_engine.items() if e != engine}
            r["output_tps_ratio_vs"] = {
                e: round(r["output_tokens_per_s"] / o["output_tokens_per_s"], 3)
                for e, o in others.items()}
            if "decode_ms_per_token" in r:
                r["decode_speedup_vs"] = {
                    e: round(o["decode_ms_per_token"] / r["decode_ms_per_token"], 3)
                    for e, o in others.items() if "decode_ms_per_token" in o}


def table(report: dict) -> str:
    rows = report["rows"]
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["dtype"], r["workload"]) for r in rows))
    by = {(r["model"], r["dtype"], r["workload"], r["engine"]): r for r in rows}
    lines = []
    head = f"{'model':6} {'dtype':8} {'workload':8} {'metric':18}" + "".join(
        f" {e:>10}" for e in engines)
    if "jaxserve" in engines:
        head += "".join(f" {'jax/' + e:>10}" for e in engines if e != "jaxserve")
    lines.append(head)
    for model, dtype, workload in keys:
        metrics = [("output tok/s", "output_tokens_per_s", False)]
        if workload == "decode":
            metrics += [("decode ms/token", "decode_ms_per_token", True),
                        ("floor fraction", "fraction_of_floor", False)]
        for label, key, lower_better in metrics:
            vals = {e: by.get((model, dtype, workload, e), {}).get(key) for e in engines}
            line = f"{model:6} {dtype[:8]:8} {workload:8} {label:18}" + "".join(
                f" {_fmt(vals[e]):>10}" for e in engines)
            if "jaxserve" in engines and key != "fraction_of_floor":
                for e in engines:
                    if e == "jaxserve":
                        continue
                    a, b = vals["jaxserve"], vals[e]
                    ratio = (b / a if lower_better else a / b) if a and b else None
                    line += f" {_fmt(ratio, 'x'):>10}"
            lines.append(line)
    floors: dict[tuple, list[float]] = {}
    for r in rows:
        if "floor_ms" in r:
            floors.setdefault((r["model"], r["dtype"]), []).append(r["floor_ms"])
    if floors:
        lines.append("decode floor ms/token = (weights + KV) bytes per step / read bandwidth "
                     "measured before each engine: " + "; ".join(
                         f"{m} {d} {min(v):.3g}..{max(v):.3g}" for (m, d), v in floors.items()))
    m = report.get("machine", {})
    if "loadavg_start" in m:
        lines.append(f"load average (1 min) at start {m['loadavg_start'][0]:.2f}, at end "
                     f"{m.get('loadavg_end', [float('nan')])[0]:.2f}, on {m.get('nproc')} cores")
    if any(r.get("floor", {}).get("fits_in_llc") for r in rows):
        lines.append("(a model whose weights fit in the last-level cache can beat this floor)")
    lines.append("jax/<engine>: jaxserve's speed over that engine's (>1 = jaxserve faster)")
    return "\n".join(lines)


def _fmt(v, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.3g}{suffix}" if abs(v) < 100 else f"{v:.0f}{suffix}"
