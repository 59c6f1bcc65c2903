#!/usr/bin/env python3
"""diffusers/transformers timings at SD1.5 size, to set beside
`lcm bench --preset sd15 --only text,unet,vae --repeats 3 --warmup 1`.

The same three measurements as lcm's preset, from the same config files (benches/sd15/*.json) with
seeded random weights, f32 on the CPU:
- clip_text: CLIPTextModel, input_ids 1x77 -> last_hidden_state 1x77x768;
- unet: UNet2DConditionModel with time_cond_proj_dim 256, latent 1x4x64x64, t = 999, text 1x77x768,
  timestep_cond 1x256 (one LCM step, batch 1);
- vae_decoder: AutoencoderKL.decode, latent 1x4x64x64 -> image 1x3x512x512.
Each component runs in its own Python process, so its peak RSS is its own (as lcm bench does).
`--dtype bf16` runs the calls under torch.autocast("cpu", dtype=torch.bfloat16) with f32 weights, as
a PyTorch user would on an AMX CPU (oneDNN runs the bf16 products on AMX tiles).
Prints JSON: per component the median and minimum of the timed calls, every time, peak RSS.
Usage: python scripts/bench_sd15_diffusers.py [--threads 2] [--warmup 1] [--repeats 3]
                                              [--only clip_text,unet,vae_decoder] [--output FILE]
                                              [--dtype f32|bf16]
"""
import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

COMPONENTS = ["clip_text", "unet", "vae_decoder"]
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "benches" / "sd15"


def load_config(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build(component, torch):
    """The model and a zero-argument call that runs it once on fixed inputs."""
    if component == "clip_text":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = load_config("text_encoder")
        cfg.pop("architectures", None)
        model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
        ids = torch.arange(77)[None]
        return model, lambda: model(input_ids=ids).last_hidden_state
    if component == "unet":
        from diffusers import UNet2DConditionModel

        cfg = load_config("unet")
        model = UNet2DConditionModel(**cfg).eval()
        x = torch.randn(1, cfg["in_channels"], 64, 64)
        t = torch.tensor([999])
        ctx = torch.randn(1, 77, cfg["cross_attention_dim"])
        cond = torch.randn(1, cfg["time_cond_proj_dim"])
        return model, lambda: model(x, t, ctx, timestep_cond=cond).sample
    if component == "vae_decoder":
        from diffusers import AutoencoderKL

        cfg = load_config("vae")
        model = AutoencoderKL(**cfg).eval()
        z = torch.randn(1, cfg["latent_channels"], 64, 64)
        return model, lambda: model.decode(z).sample
    raise ValueError(f"unknown component {component}")


def run_one(args):
    """Child process: build one component, time it, print one JSON object."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, call = build(args.component, torch)
    build_s = time.perf_counter() - t0
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with torch.no_grad(), autocast:
        out = None
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            out = call()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    print(json.dumps({
        "component": args.component,
        "params": sum(p.numel() for p in model.parameters()),
        "output_shape": list(out.shape),
        "build_s": round(build_s, 3),
        "warmup": args.warmup,
        "times_s": [round(t, 4) for t in times],
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
        "threads": torch.get_num_threads(),
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(COMPONENTS))
    ap.add_argument("--output", help="also write the JSON here")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--component", help=argparse.SUPPRESS)  # set in the child process
    args = ap.parse_args()
    if args.component:
        run_one(args)
        return
    import diffusers
    import torch
    import transformers

    results = {}
    for component in args.only.split(","):
        if component not in COMPONENTS:
            sys.exit(f"--only: unknown component {component!r} (known: {', '.join(COMPONENTS)})")
        cmd = [sys.executable, __file__, "--component", component, "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--dtype", args.dtype]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[component] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{component}: median {results[component]['median_s']} s, "
              f"peak RSS {results[component]['peak_rss_mb']} MB", file=sys.stderr)
    report = {
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "dtype": "float32" if args.dtype == "f32" else "bfloat16 autocast",
        "threads": args.threads,
        "components": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
