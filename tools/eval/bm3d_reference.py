"""Optional BM3D reference for `jointdiff eval` (image experiments). BM3D's PyPI package is licensed for
non-commercial use only: it is never a dependency of the crates and never shipped; this script is run by
hand where it installs.

    pip install numpy bm3d
    jointdiff eval --experiment fashion-digits --out DIR ...     # writes DIR/reference_input.npy etc.
    python tools/eval/bm3d_reference.py DIR                                # writes DIR/bm3d.npy and DIR/bm3d.json
    jointdiff eval ... --out DIR                                 # same options: adds the bm3d row

BM3D denoises the same input as NLM (the measurement with the known noise mean taken out, inverted,
clipped); its sigma_psd is tuned on the validation items eval wrote (never the test pairs).
"""
import json, os, sys, time
import numpy as np
import bm3d

GRID = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))


def run(x, sigma):
    return np.clip(bm3d.bm3d(x[0].astype(np.float64), sigma_psd=sigma), 0, 1).astype(np.float32)[None]


def main(out):
    val_in = np.load(os.path.join(out, "validation_input.npy"))
    val_clean = np.load(os.path.join(out, "validation_clean.npy"))
    scores = [(np.mean([psnr(run(x, s), c) for x, c in zip(val_in, val_clean)]), s) for s in GRID]
    best = max(scores)[1]
    inp = np.load(os.path.join(out, "reference_input.npy"))
    t0 = time.time()
    est = np.stack([run(x, best) for x in inp])
    secs = (time.time() - t0) / len(inp)
    np.save(os.path.join(out, "bm3d.npy"), est.astype(np.float32))
    json.dump({"sigma": best, "seconds_per_image": secs, "tuning": [[s, p] for p, s in scores],
               "bm3d_version": getattr(bm3d, "__version__", "?")},
              open(os.path.join(out, "bm3d.json"), "w"), indent=1)
    print(f"bm3d: sigma {best} (validation), {secs:.3f} s/image; rerun the same eval command to add its row")


if __name__ == "__main__":
    main(sys.argv[1])
