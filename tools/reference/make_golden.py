"""Makes the golden NCSNv2 fixtures under fixtures/golden/ with the independent PyTorch model.

    python tools/reference/make_golden.py            # from the repository root, torch + numpy + safetensors

For each config: random weights (PyTorch's default init, then every parameter perturbed by N(0, 0.1^2)
noise times its scale so biases and norm parameters are non-trivial), a `sigmas` buffer (which loaders must
ignore), a batch-2 input in [0, 1], and net(x) computed in float64 then stored as float32.
"""
import os
import numpy as np
import torch
from safetensors.torch import save_file
from ncsnv2_ref import NCSNv2

CONFIGS = [
    # name, channels, size, ngf, prefix
    ("ncsnv2_28x28x1_ngf16", 1, 28, 16, ""),
    ("ncsnv2_32x32x3_ngf8", 3, 32, 8, "module."),  # DataParallel-style names
    ("ncsnv2_64x64x3_ngf4", 3, 64, 4, ""),
]


def main():
    out_dir = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "golden")
    os.makedirs(out_dir, exist_ok=True)
    for i, (name, c, size, ngf, prefix) in enumerate(CONFIGS):
        torch.manual_seed(1000 + i)
        net = NCSNv2(c, ngf)
        with torch.no_grad():
            for pname, p in net.named_parameters():
                if pname.endswith(("alpha", "gamma")):
                    p.add_(0.3 * torch.randn_like(p))          # around 1, clearly not 1
                elif pname.endswith(("beta", "bias")):
                    p.copy_(0.2 * torch.randn_like(p))         # clearly not 0
                else:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
        sd = {prefix + k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
        sd[prefix + "sigmas"] = torch.tensor(np.geomspace(50.0, 0.01, 10), dtype=torch.float32)
        x = torch.rand(2, c, size, size)
        net64 = net.double()
        with torch.no_grad():
            y = net64(x.double()).float()
        save_file(sd, os.path.join(out_dir, name + ".safetensors"))
        np.save(os.path.join(out_dir, name + "_input.npy"), x.numpy())
        np.save(os.path.join(out_dir, name + "_output.npy"), y.numpy())
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{name}: {n_params} parameters, output std {y.std().item():.4f}")


if __name__ == "__main__":
    main()
