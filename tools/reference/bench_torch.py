"""Times the PyTorch NCSNv2 (tools/reference/ncsnv2_ref.py) forward on CPU, as `jointdiff bench forward` does.

    python tools/reference/bench_torch.py --size 28 --channels 1 --ngf 32 --batch 1 --iters 20 --threads 2

Prints one JSON object with ms_per_forward (median), images_per_s and gflops (convolution FLOPs counted as
2 * out_elems * in_channels * kh * kw, the same count jointdiff uses).
"""
import argparse, json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(__file__))
from ncsnv2_ref import NCSNv2


def conv_flops(net, x):
    total = 0
    hooks = []

    def hook(mod, inp, out):
        nonlocal total
        total += 2 * out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = NCSNv2(a.channels, a.ngf).eval()
    x = torch.rand(a.batch, a.channels, a.size, a.size)
    flops = conv_flops(net, x)
    ts = []
    with torch.no_grad():
        for _ in range(3):
            net(x)
        for _ in range(a.iters):
            t0 = time.perf_counter()
            net(x)
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    ms = ts[len(ts) // 2]
    print(json.dumps({"backend": "pytorch", "torch": torch.__version__, "threads": a.threads, "size": a.size,
                      "channels": a.channels, "ngf": a.ngf, "batch": a.batch, "gflop_per_forward": flops / 1e9,
                      "ms_per_forward": ms, "images_per_s": a.batch * 1e3 / ms, "gflops": flops / 1e9 / (ms / 1e3)}))


if __name__ == "__main__":
    main()
