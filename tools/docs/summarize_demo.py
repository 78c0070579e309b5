"""Summarises `jointdiff demo --csv` files (pair, method, psnr, ssim) into a markdown table: mean and std
(population) of PSNR and SSIM per method over all pairs of all files, in the order methods first appear.

    python tools/docs/summarize_demo.py proj_0.csv proj_50.csv ...
"""
import math, sys

rows, order = {}, []
for path in sys.argv[1:]:
    for line in open(path).read().splitlines()[1:]:
        # pair first, psnr and ssim last; the method between (older files have commas in it)
        pair, rest = line.split(",", 1)
        method, psnr, ssim = rest.rsplit(",", 2)
        method = method.replace(", ", ": ")
        if method not in rows:
            rows[method] = {}
            order.append(method)
        rows[method][int(pair)] = (float(psnr), float(ssim))


def ms(v):
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


print("| method | pairs | PSNR dB (mean ± std) | SSIM (mean ± std) |")
print("|---|---|---|---|")
for name in order:
    vals = list(rows[name].values())
    (pm, ps), (sm, ss) = ms([v[0] for v in vals]), ms([v[1] for v in vals])
    print(f"| {name} | {len(vals)} | {pm:.2f} ± {ps:.2f} | {sm:.3f} ± {ss:.3f} |")

# the targets: the joint posterior mean against the trivial inverse and the baseline's mean (same K)
mean = lambda name: sum(v[0] for v in rows[name].values()) / len(rows[name])
joint = [m for m in order if m.startswith("joint") and "mean of" in m]
base = [m for m in order if m.startswith("baseline") and "mean of" in m]
triv = [m for m in order if m.startswith("trivial")]
if joint and base and triv:
    j = mean(joint[0])
    print()
    print(f"{joint[0]}: {j - mean(triv[0]):+.2f} dB over the trivial inverse (target +4), "
          f"{j - mean(base[0]):+.2f} dB over {base[0]} (target +3)")
