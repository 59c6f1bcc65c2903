#!/usr/bin/env python3
"""PyTorch timing of one LCM-LoRA distillation step at SD1.5 size, to set beside
`target/release/examples/train_probe sd15-lora RES` (same shapes: random SD1.5 U-Net weights as
teacher, rank-64 adapters with alpha 64 on the layers train_lcm_distill_lora_sd_wds.py adapts,
batch 1, RES^2 images, 77x768 text, pseudo-Huber loss, AdamW on the adapters, clipping; the target
is the student under no_grad). f32 on the CPU.

Written for this benchmark only; the step follows diffusers' train_lcm_distill_lora_sd_wds.py.
Needs torch, diffusers and peft (pip install peft).
Usage: python scripts/bench_lcd_lora_sd15_torch.py [--resolution 256] [--threads 2] [--steps 2]
"""
import argparse
import contextlib
import json
import pathlib
import resource
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    # f32; bf16-teacher: the frozen teacher's calls under bf16 autocast (what `lcm distill --dtype
    # bf16` does on the CPU); bf16: the whole step's forwards under autocast, as diffusers'
    # scripts with --mixed_precision bf16 (student and target too; f32 master weights).
    ap.add_argument("--dtype", choices=["f32", "bf16-teacher", "bf16"], default="f32")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.loads((pathlib.Path(__file__).parent.parent / "benches/sd15/unet.json").read_text())
    cfg.pop("time_cond_proj_dim", None)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    t0 = time.perf_counter()
    teacher = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(teacher.state_dict())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=TARGETS))
    unet.train()
    print(f"models in {time.perf_counter() - t0:.1f}s")
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = sched.alphas_cumprod
    grid = torch.arange(1, 51) * 20 - 1
    prev = torch.cat([ac[:1], ac[grid[:-1]]])
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    lat = args.resolution // 8
    z_all = torch.randn(4, 4, lat, lat)
    prompts = torch.randn(4, 77, 768)
    uncond = torch.randn(1, 77, 768)
    b, c = 1, 0.001

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
        cs, co = scalings(start)
        with autocast("student"):
            eps = unet(xt, start, ctx).sample.float()
        pred = cs * xt + co * x0(xt, eps, start)
        with torch.no_grad():
            with autocast("teacher"):
                ce = teacher(xt, start, ctx).sample.float()
                ue = teacher(xt, start, un).sample.float()
            wv = w.view(-1, 1, 1, 1)
            cx0 = x0(xt, ce, start) + wv * (x0(xt, ce, start) - x0(xt, ue, start))
            ceps = ce + wv * (ce - ue)
            ap_ = prev[idx].view(-1, 1, 1, 1)
            xp = ap_.sqrt() * cx0 + (1 - ap_).sqrt() * ceps
            with autocast("student"):
                te = unet(xp, tn, ctx).sample.float()
            cs2, co2 = scalings(tn)
            tgt = cs2 * xp + co2 * x0(xp, te, tn)
        loss = (torch.sqrt((pred - tgt) ** 2 + c * c) - c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    s = time.perf_counter()
    step()
    print(f"warm-up step {time.perf_counter() - s:.2f}s")
    times = []
    for _ in range(args.steps):
        s = time.perf_counter()
        step()
        times.append(time.perf_counter() - s)
        print(f"step {times[-1]:.2f}s")
    print({"mean_s": sum(times) / len(times), "times_s": [round(t, 3) for t in times],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "resolution": args.resolution, "threads": args.threads, "dtype": args.dtype})


if __name__ == "__main__":
    main()
