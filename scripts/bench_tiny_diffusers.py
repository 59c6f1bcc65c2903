#!/usr/bin/env python3
"""The peer for the shipped default model: diffusers loads weights/tiny (an LCM pipeline folder
written by `lcm distill` + `lcm convert`) and times a 4-step 64² generation on CPU in fp32.

Optionally (--latents/--out-image) it also runs from given initial latents and writes the image,
so that `lcm generate --latents` can be compared with it pixel by pixel.

    python3 scripts/bench_tiny_diffusers.py [--model weights/tiny] [--threads 2] [--repeats 5]
        [--latents latents.safetensors --out-image diffusers.png] [--out bench.json]
        [--dtype f32|bf16]

`--dtype bf16` runs under torch.autocast("cpu", dtype=torch.bfloat16) (oneDNN's AMX path).
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import LatentConsistencyModelPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/tiny")
    ap.add_argument("--prompt", default="a large red circle in the center on a blue background")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latents")
    ap.add_argument("--out-image")
    ap.add_argument("--out")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        a.model, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run(latents=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return pipe(
            a.prompt,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance,
            height=size,
            width=size,
            latents=latents,
            generator=g,
            output_type="pil",
        ).images[0]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    with torch.inference_mode(), autocast:
        run()  # warm-up
        times = []
        for i in range(a.repeats):
            t = time.perf_counter()
            run(seed=i)
            times.append(time.perf_counter() - t)
        if a.latents:
            from safetensors.torch import load_file

            lat = load_file(a.latents)["latents"].to(torch.float32)
            img = run(latents=lat)
            if a.out_image:
                img.save(a.out_image)
    res = {
        "peer": "diffusers",
        "torch": torch.__version__,
        "threads": a.threads,
        "model": a.model,
        "size": size,
        "steps": a.steps,
        "dtype": a.dtype,
        "load_s": load_s,
        "generate_s_median": statistics.median(times),
        "generate_s_all": times,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
