"""kdx and PyTorch bench results side by side.

    python3 tools/bench_compare.py KDX.json [TORCH.json ...]

KDX.json is the output of `kdx bench --json`, each TORCH.json that of `tools/torch_bench.py --json`
(several are merged: a GPU run times the torch.compile'd entries separately). Entries match by name;
kdx's f32 names carry a `/f32` suffix that PyTorch's CPU names lack. A file that is missing or not
JSON (a run that failed) is reported and left out. PyTorch entries kdx has no counterpart for are
listed after kdx's.
"""

import json
import sys


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: no results ({e})")
        return None


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    kdx = load(sys.argv[1]) or {"device": "?", "entries": []}
    reports = [r for r in map(load, sys.argv[2:]) if r]
    theirs = {e["name"]: e for r in reports for e in r["entries"]}
    framework = reports[0].get("framework", "?") if reports else "no PyTorch results"
    where = reports[0].get("device", "?") if reports else "-"
    print(f"kdx: {kdx['device']}    PyTorch: {framework} on {where}")
    ceilings = kdx.get("ceilings")
    if ceilings:
        gemm = ceilings.get("gemm_missing") or (
            f"cuBLAS {ceilings['gemm_bf16_gflops'] / 1e3:.0f} TFLOP/s bf16, "
            f"{ceilings['gemm_f32_gflops'] / 1e3:.1f} TFLOP/s f32"
        )
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s; {gemm}")
    print(f"{'entry':<48} {'kdx ms':>10} {'of peak':>8} {'torch ms':>10} {'speed-up':>9}")
    matched = set()
    for e in kdx["entries"]:
        name = e["name"]
        t = theirs.get(name) or theirs.get(name.removesuffix("/f32"))
        if t is not None:
            matched.add(t["name"])
        torch_ms = f"{t['median_ms']:>10.3f}" if t else f"{'-':>10}"
        mine = e.get("median_ms")
        if mine is None:
            status = "skipped" if e.get("skipped") else "FAILED"
            print(f"{name:<48} {status:>10} {'':>8} {torch_ms}")
            continue
        share = f"{100 * e['share_of_peak']:.1f}%" if "share_of_peak" in e else ""
        speedup = f"{t['median_ms'] / mine:>8.2f}x" if t else f"{'-':>9}"
        print(f"{name:<48} {mine:>10.3f} {share:>8} {torch_ms} {speedup}")
    for name, t in theirs.items():
        if name not in matched:
            print(f"{name:<48} {'-':>10} {'':>8} {t['median_ms']:>10.3f}")
    reasons = sorted({e["skipped"] for e in kdx["entries"] if e.get("skipped")})
    for reason in reasons:
        print(f"skipped: {reason}")
    for e in kdx["entries"]:
        if e.get("error"):
            print(f"FAILED {e['name']}: {e['error']}")


if __name__ == "__main__":
    main()
