"""PyTorch peer for the motion models' speed (docs/benchmarks.md): the same computation as
`lcm generate --model tiny-motion --steps 1` after text encoding — one pass of the latent
denoiser (MLD skip transformer, sizes from configs/tiny-motion/denoiser) and the motion VAE's
decoder (configs/tiny-motion/motion_vae) for a 4-second motion — in PyTorch fp32 on CPU with random
weights, batch 1 and batch 32; and the teacher's DDIM 50 with CFG (100 denoiser passes + one
decode). Prints JSON with medians in ms per motion.

    python scripts/bench_motion_torch.py [--threads 2] [--repeats 20] [--frames 80]
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=20)
ap.add_argument("--frames", type=int, default=80)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

den_cfg = json.load(open(os.path.join(ROOT, "configs/tiny-motion/denoiser/config.json")))
vae_cfg = json.load(open(os.path.join(ROOT, "configs/tiny-motion/motion_vae/config.json")))


class Skip(nn.Module):
    """k pre-norm layers in, one middle, k out fed [x; skip] through a linear, final LayerNorm."""

    def __init__(self, width, heads, ff, layers):
        super().__init__()
        k = layers // 2
        layer = lambda: nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, activation="gelu",
                                                   batch_first=True, norm_first=True)
        self.inp = nn.ModuleList([layer() for _ in range(k)])
        self.mid = layer()
        self.skip = nn.ModuleList([nn.Linear(2 * width, width) for _ in range(k)])
        self.out = nn.ModuleList([layer() for _ in range(k)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        skips = []
        for l in self.inp:
            x = l(x)
            skips.append(x)
        x = self.mid(x)
        for p, l in zip(self.skip, self.out):
            x = l(p(torch.cat([x, skips.pop()], -1)))
        return self.norm(x)


def sinusoid(t, dim):
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


class Denoiser(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["width"]
        self.c = c
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.sentence = nn.Linear(c["text_dim"], d)
        self.words = nn.Linear(c["text_dim"], d)
        self.lat_in = nn.Linear(c["latent_channels"], d)
        self.pos = nn.Parameter(torch.randn(1, c["latent_tokens"], d) * 0.02)
        self.net = Skip(d, c["heads"], c["ff"], c["layers"])
        self.lat_out = nn.Linear(d, c["latent_channels"])

    def forward(self, x, t, cond):
        temb = self.time(sinusoid(t, self.c["width"]))[:, None]
        tokens = torch.cat([temb, self.sentence(cond[:, :1]), self.words(cond[:, 1:]),
                            self.lat_in(x) + self.pos], 1)
        h = self.net(tokens)
        return self.lat_out(h[:, -self.c["latent_tokens"]:])


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["width"]
        self.c = c
        self.lat_in = nn.Linear(c["latent_channels"], d)
        self.net = Skip(d, c["heads"], c["ff"], c["layers"])
        self.out = nn.Linear(d, c["features"])

    def forward(self, z, frames):
        q = sinusoid(torch.arange(frames), self.c["width"])[None].expand(z.shape[0], -1, -1)
        h = self.net(torch.cat([self.lat_in(z), q], 1))
        return self.out(h[:, self.c["latent_tokens"]:])


den, dec = Denoiser(den_cfg).eval(), Decoder(vae_cfg).eval()


def bench(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


out = {"threads": args.threads, "frames": args.frames, "torch": torch.__version__}
with torch.inference_mode():
    for b in [1, 32]:
        x = torch.randn(b, den_cfg["latent_tokens"], den_cfg["latent_channels"])
        cond = torch.randn(b, den_cfg["text_tokens"], den_cfg["text_dim"])
        t = torch.full((b,), 999)

        def one_step():
            eps = den(x, t, cond)
            dec(x - eps, args.frames)

        out[f"student_1_step_ms_per_motion_b{b}"] = 1e3 * bench(one_step, args.repeats) / b
    b = 1
    x = torch.randn(b, den_cfg["latent_tokens"], den_cfg["latent_channels"])
    cond2 = torch.randn(2 * b, den_cfg["text_tokens"], den_cfg["text_dim"])

    def teacher():
        z = x
        for i in range(50):
            tt = torch.full((2 * b,), 999 - 20 * i)
            e = den(torch.cat([z, z]), tt, cond2)
            z = z - 0.01 * (e[b:] + 7.5 * (e[b:] - e[:b]))
        dec(z, args.frames)

    out["teacher_ddim50_cfg_ms_per_motion_b1"] = 1e3 * bench(teacher, max(3, args.repeats // 4))
print(json.dumps(out, indent=1))
