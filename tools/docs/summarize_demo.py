"""Summarises `jointdiff demo --csv` files (pair, method, psnr, ssim) into a markdown table: mean and std
(population) of PSNR and SSIM per method over all pairs of all files, in the order methods first appear.

    python tools/docs/summarize_demo.py proj_0.csv proj_50.csv ...
"""
import csv, math, sys

rows, order = {}, []
for path in sys.argv[1:]:
    for r in csv.DictReader(open(path)):
        if r["method"] not in rows:
            rows[r["method"]] = {}
            order.append(r["method"])
        rows[r["method"]][int(r["pair"])] = (float(r["psnr"]), float(r["ssim"]))


def ms(v):
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


print("| method | pairs | PSNR dB (mean ± std) | SSIM (mean ± std) |")
print("|---|---|---|---|")
for name in order:
    vals = list(rows[name].values())
    (pm, ps), (sm, ss) = ms([v[0] for v in vals]), ms([v[1] for v in vals])
    print(f"| {name} | {len(vals)} | {pm:.2f} ± {ps:.2f} | {sm:.3f} ± {ss:.3f} |")
