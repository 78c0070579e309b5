"""Draws docs/training/loss_curves.png from the training logs in docs/training (CSV: step, loss, validation).

    python tools/docs/plot_training.py          # needs matplotlib; not used by CI
"""
import csv, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

D = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training")


def read(name):
    steps, loss, vsteps, vloss = [], [], [], []
    for row in csv.reader(open(os.path.join(D, name))):
        s = int(row[0])
        steps.append(s)
        loss.append(float(row[1]))
        if len(row) > 2 and row[2]:
            vsteps.append(s)
            vloss.append(float(row[2]))
    return steps, loss, vsteps, vloss


def smooth(steps, v, window):
    """Mean over the entries of the last `window` steps (the logs record every step or every 10th)."""
    out = []
    for i, s in enumerate(steps):
        w = [x for t, x in zip(steps[max(0, i - window):i + 1], v[max(0, i - window):i + 1]) if t > s - window]
        out.append(sum(w) / len(w))
    return out


fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for name, label in [("fashion_ngf32_loss.csv", "signal: Fashion-MNIST"), ("digits_ngf32_loss.csv", "noise: MNIST digits")]:
    s, l, vs, vl = read(name)
    p = ax[0].plot(s, smooth(s, l, 100), label=f"{label}, training (mean over 100 steps)")
    ax[0].plot(vs, vl, "o-", color=p[0].get_color(), label=f"{label}, validation (EMA weights)")
ax[0].set_yscale("log")
ax[0].set_xlabel("Adam step (batch 128)")
ax[0].set_ylabel("DSM loss (sum over pixels)")
ax[0].set_title("Default models (PyTorch trainer, H100)")
ax[0].legend(fontsize=7)
for name, label in [("side_by_side_pytorch.csv", "PyTorch trainer"), ("side_by_side_jointdiff.csv", "jointdiff train")]:
    s, l, vs, vl = read(name)
    p = ax[1].plot(s, smooth(s, l, 20), alpha=0.5, label=f"{label}, training (mean over 20 steps)")
    ax[1].plot(vs, vl, "o-", color=p[0].get_color(), label=f"{label}, validation")
ax[1].set_yscale("log")
ax[1].set_xlabel("Adam step (batch 16, no EMA)")
ax[1].set_title("Side by side on Fashion-MNIST, same settings")
ax[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(D, "loss_curves.png"), dpi=90)
print("wrote", os.path.join(D, "loss_curves.png"))
