"""Sums an Nsight Compute per-kernel CSV by kernel name: where a helix step spends GPU time.

scripts/gpu-profile.sh runs it on helix's and PyTorch's step side by side. By hand, on the GPU
machine (dist/helix-train unpacked, LD_LIBRARY_PATH as scripts/gpu-env.sh sets it):
  ncu --metrics gpu__time_duration.sum --cache-control none --clock-control none \
      --print-summary per-kernel --csv dist/helix-train bench --config configs/bench/lora7b.toml \
      --random-weights --layers 2 --warmup 0 --steps 1 > ncu.csv
  python3 scripts/ncu_summary.py ncu.csv
Prints the total kernel time and the 30 kernels that take most of it, with their launch counts.
"""
import csv, os, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = None
agg = collections.defaultdict(lambda: [0, 0.0])
units = set()
for r in rows:
    if 'Kernel Name' in r and hdr is None:
        hdr = r; continue
    if hdr and len(r) == len(hdr):
        d = dict(zip(hdr, r))
        if d.get('Metric Name') != 'gpu__time_duration.sum': continue
        name = d['Kernel Name'][:70]
        try:
            inv = int(d.get('Invocations', '1')); v = float(d['Average'].replace(',', ''))
        except Exception:
            continue
        unit = d.get('Metric Unit', ''); units.add(unit)
        scale = {'ns': 1e-6, 'nsecond': 1e-6, 'us': 1e-3, 'usecond': 1e-3, 'ms': 1.0, 'msecond': 1.0}.get(unit, 1e-6)
        agg[name][0] += inv; agg[name][1] += inv * v * scale
tot = sum(v[1] for v in agg.values())
print(f"units {units}; total kernel time {tot:.2f} ms over {sum(v[0] for v in agg.values())} launches")
for name, (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:30]:
    print(f"{ms:8.3f} ms {n:5d}x {name}")
