#!/usr/bin/env python3
"""PyTorch timing of one latent-consistency-distillation step at the fixture size, to set beside
`cargo run --release --example train_probe` (same shapes: batch 8, 16x16x4 latents, 77x32 text,
tiny-sd teacher, student/target from tiny-lcm, pseudo-Huber loss, AdamW, clipping, EMA).

The step follows diffusers' train_lcm_distill_sd_wds.py; written for this benchmark only.
Usage: python scripts/bench_lcd_step_torch.py [--fixtures tests/fixtures] [--threads 2] [--steps 5]
"""
import argparse
import contextlib
import copy
import resource
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file


def guidance_embedding(w, dim):
    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    arg = w[:, None] * freq[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    ap.add_argument("--threads", type=int, default=2)
    # f32; bf16-teacher: the frozen teacher's calls under bf16 autocast (what `lcm distill --dtype
    # bf16` does on the CPU); bf16: the whole step's forwards under autocast, as diffusers'
    # scripts with --mixed_precision bf16 (student and target too; f32 master weights).
    ap.add_argument("--dtype", choices=["f32", "bf16-teacher", "bf16"], default="f32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fx = args.fixtures
    teacher = UNet2DConditionModel.from_pretrained(f"{fx}/tiny-sd/unet", torch_dtype=torch.float32).eval().requires_grad_(False)
    student = UNet2DConditionModel.from_pretrained(f"{fx}/tiny-lcm/unet", torch_dtype=torch.float32).train()
    target = copy.deepcopy(student).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(f"{fx}/tiny-sd/scheduler")
    ac = sched.alphas_cumprod
    g = load_file(f"{fx}/golden.safetensors")
    z_all, prompts, uncond = g["lcd_z0"], g["lcd_prompt_embeds"], g["lcd_uncond_prompt_embeds"][:1]
    grid = torch.arange(1, 51) * 20 - 1
    prev = torch.cat([ac[:1], ac[grid[:-1]]])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-2)
    b, c = args.batch, 0.001

    def scalings(t):
        s = t.float() * 10.0
        return (0.25 / (s**2 + 0.25)).view(-1, 1, 1, 1), (s / (s**2 + 0.25) ** 0.5).view(-1, 1, 1, 1)

    def x0(x, eps, t):
        a = ac[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def autocast(part):
        on = args.dtype == "bf16" or (args.dtype == "bf16-teacher" and part == "teacher")
        return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def step():
        rows = torch.randint(0, z_all.shape[0], (b,))
        z, ctx, un = z_all[rows], prompts[rows], uncond.repeat(b, 1, 1)
        idx = torch.randint(0, 50, (b,))
        start = grid[idx]
        tn = (start - 20).clamp(min=0)
        noise = torch.randn_like(z)
        xt = sched.add_noise(z, noise, start)
        w = 5 + 10 * torch.rand(b)
        wemb = guidance_embedding(w, 32)
        cs, co = scalings(start)
        with autocast("student"):
            eps = student(xt, start, ctx, timestep_cond=wemb).sample.float()
        pred = cs * xt + co * x0(xt, eps, start)
        with torch.no_grad():
            with autocast("teacher"):
                ce = teacher(xt, start, ctx).sample.float()
                ue = teacher(xt, start, un).sample.float()
            wv = w.view(-1, 1, 1, 1)
            cx0 = x0(xt, ce, start) + wv * (x0(xt, ce, start) - x0(xt, ue, start))
            ceps = ce + wv * (ce - ue)
            ap = prev[idx].view(-1, 1, 1, 1)
            xp = ap.sqrt() * cx0 + (1 - ap).sqrt() * ceps
            with autocast("student"):
                te = target(xp, tn, ctx, timestep_cond=wemb).sample.float()
            cs2, co2 = scalings(tn)
            tgt = cs2 * xp + co2 * x0(xp, te, tn)
        loss = (torch.sqrt((pred - tgt) ** 2 + c * c) - c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.mul_(0.95).add_(ps, alpha=0.05)
        return loss.item()

    step()
    times = []
    for _ in range(args.steps):
        s = time.perf_counter()
        step()
        times.append(time.perf_counter() - s)
    print({"median_s": statistics.median(times), "times_s": [round(t, 4) for t in times],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batch": b,
           "threads": args.threads, "dtype": args.dtype})


if __name__ == "__main__":
    main()
