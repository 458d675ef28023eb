"""Where the time of a multi-GPU training step goes: a torch.profiler trace
(Chrome trace JSON) summarised per profiled step into

* ``step_ms``: wall time of the ``STEP`` annotations (``record_function``
  around each training step; CPU side);
* ``gpu_span_ms``: first kernel start to last kernel end in the window;
* ``compute_busy_ms`` / ``comm_busy_ms``: union of the intervals in which a
  non-NCCL / an NCCL kernel runs; ``comm_exposed_ms``: NCCL time with no
  compute kernel running beside it (communication not hidden);
  ``gpu_idle_ms``: span minus the union of all kernels;
* ``compute_gaps``: the idle gaps of the compute kernels longer than
  ``GAP_US`` (count, total, the largest few with the CPU ops running then);
* ``nccl``: count and time by collective; ``top_kernels``; ``top_cpu``: the
  CPU ops and annotations (FSDP's hooks among them) by total time.

    python bench/fsdp2_profile.py trace.json        # prints the summary
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

GAP_US = 50.0
TOP = 15
STEP = "train_step"  # the record_function name around each profiled step


def _union(intervals):
    """Merged (start, end) intervals, sorted."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(merged) -> float:
    return sum(e - s for s, e in merged)


def _intersection(a, b) -> float:
    """Total length of the overlap of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _is_comm(name: str) -> bool:
    return "nccl" in name.lower()


def summarise(events: list[dict]) -> dict:
    steps = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                    and e.get("name") == STEP), key=lambda e: e["ts"])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")
           and e.get("name") != STEP]
    if not steps or not kernels:
        return {"error": f"no profiled steps ({len(steps)}) or kernels ({len(kernels)}) in the trace"}
    lo, hi = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    # kernels launched inside the window run until shortly after it: take those that start in it
    ks = [k for k in kernels if lo <= k["ts"] <= hi + 1e6]
    comm = _union((k["ts"], k["ts"] + k["dur"]) for k in ks if _is_comm(k["name"]))
    compute = _union((k["ts"], k["ts"] + k["dur"]) for k in ks if not _is_comm(k["name"]))
    every = _union((k["ts"], k["ts"] + k["dur"]) for k in ks)
    span = every[-1][1] - every[0][0]
    gaps = [(compute[i][1], compute[i + 1][0]) for i in range(len(compute) - 1)
            if compute[i + 1][0] - compute[i][1] > GAP_US]
    n = len(steps)

    def cpu_ops_at(t0, t1, limit=4):
        names = defaultdict(float)
        for e in cpu:
            s, d = e["ts"], e["dur"]
            if s < t1 and s + d > t0 and d < (t1 - t0) * 20:  # ops active in the gap, not the whole step
                names[e["name"]] += min(s + d, t1) - max(s, t0)
        return [k for k, _ in sorted(names.items(), key=lambda kv: -kv[1])[:limit]]

    largest = sorted(gaps, key=lambda g: g[0] - g[1])[:6]
    nccl = defaultdict(lambda: [0, 0.0])
    by_kernel = defaultdict(lambda: [0, 0.0])
    for k in ks:
        by_kernel[k["name"][:90]][0] += 1
        by_kernel[k["name"][:90]][1] += k["dur"]
        if _is_comm(k["name"]):
            key = next((c for c in ("AllGather", "ReduceScatter", "AllReduce", "Broadcast", "SendRecv")
                        if c.lower() in k["name"].lower()), k["name"][:40])
            nccl[key][0] += 1
            nccl[key][1] += k["dur"]
    by_cpu = defaultdict(lambda: [0, 0.0])
    for e in cpu:
        if lo <= e["ts"] <= hi:
            by_cpu[e["name"][:90]][0] += 1
            by_cpu[e["name"][:90]][1] += e["dur"]
    ms = 1e-3
    per = 1.0 / n
    return {
        "steps": n,
        "step_ms": [round(s["dur"] * ms, 2) for s in steps],
        "gpu_span_ms": round(span * ms * per, 2),
        "compute_busy_ms": round(_length(compute) * ms * per, 2),
        "comm_busy_ms": round(_length(comm) * ms * per, 2),
        "comm_exposed_ms": round((_length(comm) - _intersection(comm, compute)) * ms * per, 2),
        "gpu_idle_ms": round((span - _length(every)) * ms * per, 2),
        "compute_gaps": {"count_per_step": round(len(gaps) * per, 1),
                         "total_ms_per_step": round(sum(b - a for a, b in gaps) * ms * per, 2),
                         "largest": [{"ms": round((b - a) * ms, 3), "cpu_ops": cpu_ops_at(a, b)} for a, b in largest]},
        "nccl_per_step": {k: {"count": round(c * per, 1), "ms": round(t * ms * per, 2)} for k, (c, t) in nccl.items()},
        "top_kernels": [{"name": k, "count_per_step": round(c * per, 1), "ms_per_step": round(t * ms * per, 2)}
                        for k, (c, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:TOP]],
        "top_cpu": [{"name": k, "count_per_step": round(c * per, 1), "ms_per_step": round(t * ms * per, 2)}
                    for k, (c, t) in sorted(by_cpu.items(), key=lambda kv: -kv[1][1])[:TOP]],
        "fsdp_cpu": [{"name": k, "count_per_step": round(c * per, 1), "ms_per_step": round(t * ms * per, 2)}
                     for k, (c, t) in sorted(by_cpu.items(), key=lambda kv: -kv[1][1]) if k.startswith("FSDP")][:TOP],
    }


def summarise_file(path) -> dict:
    with open(path) as f:
        doc = json.load(f)
    return summarise(doc["traceEvents"] if isinstance(doc, dict) else doc)


if __name__ == "__main__":
    print(json.dumps(summarise_file(sys.argv[1]), indent=1))
