#!/usr/bin/env python3
"""diffusers timings at the fixture size, to set beside `lcm bench --model tests/fixtures/tiny-lcm`.

Loads the tiny LCM pipeline folder (f32 on CPU), times the text encoder (77 tokens), one U-Net call,
the VAE decode and a full 4-step generation, and prints JSON with medians and the process's peak RSS.
Usage: python scripts/bench_fixture_diffusers.py [--model tests/fixtures/tiny-lcm] [--threads 2]
"""
import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import LatentConsistencyModelPipeline


def median_time(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tests/fixtures/tiny-lcm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = LatentConsistencyModelPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    hw = pipe.unet.config.sample_size
    results = {}
    with torch.no_grad():
        ids = torch.arange(77)[None]
        results["text"] = median_time(lambda: pipe.text_encoder(ids), args.warmup, args.repeats)
        x = torch.randn(1, pipe.unet.config.in_channels, hw, hw)
        ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
        cond = torch.randn(1, pipe.unet.config.time_cond_proj_dim)
        t = torch.tensor([999])
        results["unet"] = median_time(lambda: pipe.unet(x, t, ctx, timestep_cond=cond), args.warmup, args.repeats)
        z = torch.randn(1, pipe.vae.config.latent_channels, hw, hw)
        results["vae"] = median_time(lambda: pipe.vae.decode(z), args.warmup, args.repeats)
        results["pipeline"] = median_time(
            lambda: pipe("a photo of a cat", num_inference_steps=args.steps, guidance_scale=8.5,
                         height=size, width=size, output_type="np"),
            args.warmup, args.repeats)
    out = {k: {"median_s": m, "times_s": ts} for k, (m, ts) in results.items()}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = args.threads
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
