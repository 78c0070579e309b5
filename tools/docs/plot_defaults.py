"""Plots docs/results/defaults_sweep.csv (PSNR against steps per rule, validation pairs) into
docs/results/defaults_steps.png.   pip install matplotlib; python3 tools/docs/plot_defaults.py"""
import csv, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
rows = list(csv.DictReader(open(os.path.join(ROOT, "docs", "results", "defaults_sweep.csv"))))
fig, ax = plt.subplots(figsize=(6, 4))
series = {}
for r in rows:
    key = f"{r['rule']} K={r['samples']} (lambda {r['lambda']}, mu {r['mu']})"
    series.setdefault(key, []).append((int(r["steps"]), float(r["psnr"])))
for key, pts in sorted(series.items()):
    if len(pts) < 2 and "pigdm K=1 (lambda 1.2" not in key:
        ax.scatter(*zip(*pts), label=key, s=20)
        continue
    pts.sort()
    ax.plot(*zip(*pts), marker="o", label=key)
ax.set_xscale("log")
ax.set_xticks([25, 50, 100, 200, 400, 600])
ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
ax.set_xlabel("reverse-time steps")
ax.set_ylabel("PSNR dB (16 validation pairs)")
ax.set_title("fashion-digits validation: PSNR against steps")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "docs", "results", "defaults_steps.png"), dpi=110)
print("wrote docs/results/defaults_steps.png")
