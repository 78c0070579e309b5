"""An independent PyTorch implementation of NCSNv2 (ermongroup/ncsnv2, models/ncsnv2.py, class NCSNv2).

Written for jointdiff from the architecture's description, as the oracle for the Rust code: it is never
run by the tests, only by make_golden.py (once, to produce the committed fixtures) and by benchmarks.
Module and parameter names follow the reference state_dict verbatim so that checkpoints interchange.

`forward(x)` returns net(x): the reference output *before* its division by sigmas[y].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3(cin, cout, bias=True, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=1, padding=dilation, dilation=dilation, bias=bias)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++: instance norm plus a correction by the normalised channel means."""

    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(c))
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu = x.mean(dim=(2, 3))                                   # [N, C]
        mt = (mu - mu.mean(dim=1, keepdim=True)) / torch.sqrt(mu.var(dim=1, keepdim=True) + 1e-5)
        var = x.var(dim=(2, 3), unbiased=False)
        h = (x - mu[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + 1e-5)
        h = h + mt[:, :, None, None] * self.alpha[None, :, None, None]
        return self.gamma[None, :, None, None] * h + self.beta[None, :, None, None]


class ConvMeanPool(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=1, padding=k // 2, bias=True)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, down=False, dilation=None):
        super().__init__()
        d = dilation or 1
        self.cin, self.cout, self.down = cin, cout, down
        if down:
            self.conv1 = conv3(cin, cin, dilation=d)
            self.normalize2 = InstanceNormPlus(cin)
            if dilation is not None:
                self.conv2 = conv3(cin, cout, dilation=d)
                self.shortcut = conv3(cin, cout, dilation=d)
            else:
                self.conv2 = ConvMeanPool(cin, cout, 3)
                self.shortcut = ConvMeanPool(cin, cout, 1)
        else:
            self.conv1 = conv3(cin, cout, dilation=d)
            self.normalize2 = InstanceNormPlus(cout)
            self.conv2 = conv3(cout, cout, dilation=d)
            if cin != cout:
                self.shortcut = conv3(cin, cout, dilation=d) if dilation else nn.Conv2d(cin, cout, 1)
        self.normalize1 = InstanceNormPlus(cin)

    def forward(self, x):
        h = self.conv1(F.elu(self.normalize1(x)))
        h = self.conv2(F.elu(self.normalize2(h)))
        s = x if (self.cin == self.cout and not self.down) else self.shortcut(x)
        return s + h


class RCU(nn.Module):
    def __init__(self, f, blocks):
        super().__init__()
        self.blocks = blocks
        for i in range(blocks):
            for j in range(2):
                setattr(self, f"{i + 1}_{j + 1}_conv", conv3(f, f, bias=False))

    def forward(self, x):
        for i in range(self.blocks):
            r = x
            for j in range(2):
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(F.elu(x))
            x = x + r
        return x


class MSF(nn.Module):
    def __init__(self, planes, f):
        super().__init__()
        self.convs = nn.ModuleList([conv3(c, f) for c in planes])

    def forward(self, xs, size):
        out = 0
        for conv, x in zip(self.convs, xs):
            out = out + F.interpolate(conv(x), size=size, mode="bilinear", align_corners=True)
        return out


class CRP(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.convs = nn.ModuleList([conv3(f, f, bias=False) for _ in range(2)])

    def forward(self, x):
        x = F.elu(x)
        p = x
        for conv in self.convs:
            p = conv(F.max_pool2d(p, 5, stride=1, padding=2))
            x = p + x
        return x


class Refine(nn.Module):
    def __init__(self, planes, f, end=False):
        super().__init__()
        self.adapt_convs = nn.ModuleList([RCU(c, 2) for c in planes])
        self.output_convs = RCU(f, 3 if end else 1)
        if len(planes) > 1:
            self.msf = MSF(planes, f)
        self.crp = CRP(f)

    def forward(self, xs, size):
        hs = [a(x) for a, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, size) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h))


class NCSNv2(nn.Module):
    def __init__(self, channels, ngf, input_map=True):
        super().__init__()
        g = ngf
        self.input_map = input_map
        self.begin_conv = nn.Conv2d(channels, g, 3, padding=1)
        self.normalizer = InstanceNormPlus(g)
        self.end_conv = nn.Conv2d(g, channels, 3, padding=1)
        self.res1 = nn.ModuleList([ResBlock(g, g), ResBlock(g, g)])
        self.res2 = nn.ModuleList([ResBlock(g, 2 * g, down=True), ResBlock(2 * g, 2 * g)])
        self.res3 = nn.ModuleList([ResBlock(2 * g, 2 * g, True, 2), ResBlock(2 * g, 2 * g, False, 2)])
        self.res4 = nn.ModuleList([ResBlock(2 * g, 2 * g, True, 4), ResBlock(2 * g, 2 * g, False, 4)])
        self.refine1 = Refine([2 * g], 2 * g)
        self.refine2 = Refine([2 * g, 2 * g], 2 * g)
        self.refine3 = Refine([2 * g, 2 * g], g)
        self.refine4 = Refine([g, g], g, end=True)

    def forward(self, x):
        h = 2 * x - 1.0 if self.input_map else x
        h = self.begin_conv(h)
        layers = []
        for stage in (self.res1, self.res2, self.res3, self.res4):
            for blk in stage:
                h = blk(h)
            layers.append(h)
        l1, l2, l3, l4 = layers
        r = self.refine1([l4], l4.shape[2:])
        r = self.refine2([l3, r], l3.shape[2:])
        r = self.refine3([l2, r], l2.shape[2:])
        r = self.refine4([l1, r], l1.shape[2:])
        return self.end_conv(F.elu(self.normalizer(r)))
