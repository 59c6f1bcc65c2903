"""Golden image-to-image outputs made by diffusers, for tests/img2img.rs.

    python scripts/make_img2img_golden.py            (writes tests/fixtures/img2img/)

Needs torch, diffusers, transformers, safetensors, pillow. Runs, in f32 on CPU, over the fixture
pipelines tests/fixtures/tiny-lcm and tiny-sd (f16 weights, loaded as f32):
  * LatentConsistencyModelImg2ImgPipeline on tiny-lcm: strength 0.5, 4 steps, guidance 8.5;
  * StableDiffusionImg2ImgPipeline with DDIMScheduler on tiny-sd: strength 0.75, 10 steps,
    CFG 7.5 with the negative prompt "blurry";
both from init.png (32×32, made here, already at the model size so no resizing happens), prompt
"a photo of a cat". Every normal draw (the VAE posterior sample, the noise added to it, LCM's
re-noising) is recorded in call order as noise_<run>_<k>, the latents after each step as
<run>_step_<i>, and the final image (float, [0, 1], NHWC) as <run>_image.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.models.autoencoders.vae as vae_mod
import diffusers.schedulers.scheduling_lcm as lcm_mod
import diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img as lcm_pipe_mod
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_pipe_mod
from diffusers import DDIMScheduler, LatentConsistencyModelImg2ImgPipeline, StableDiffusionImg2ImgPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "img2img")
os.makedirs(OUT, exist_ok=True)

# The init image: a smooth gradient with a disc, 32×32 RGB.
h = w = 32
yy, xx = np.mgrid[0:h, 0:w]
img = np.zeros((h, w, 3), np.uint8)
img[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
img[..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
img[..., 2] = 96
disc = (xx - 20) ** 2 + (yy - 12) ** 2 < 49
img[disc] = [250, 240, 40]
init = Image.fromarray(img)
init.save(os.path.join(OUT, "init.png"))

tensors = {}
records = []
original = vae_mod.randn_tensor if hasattr(vae_mod, "randn_tensor") else None


def recording(fn):
    def wrapped(*args, **kwargs):
        t = fn(*args, **kwargs)
        records.append(t.detach().clone().float())
        return t
    return wrapped


# Every module that draws normals through randn_tensor in these two pipelines.
for mod in [vae_mod, lcm_mod, lcm_pipe_mod, sd_pipe_mod]:
    if hasattr(mod, "randn_tensor"):
        mod.randn_tensor = recording(mod.randn_tensor)

prompt = "a photo of a cat"
meta = {"prompt": prompt}


def run(name, pipe, **kw):
    records.clear()
    steps = []

    def on_step(p, i, t, cb):
        steps.append(cb["latents"].detach().clone().float())
        return cb

    out = pipe(prompt=prompt, image=init, generator=torch.Generator().manual_seed(0), output_type="np",
               callback_on_step_end=on_step, **kw)
    for k, r in enumerate(records):
        tensors[f"noise_{name}_{k}"] = r.contiguous()
    for i, s in enumerate(steps):
        tensors[f"{name}_step_{i}"] = s.contiguous()
    tensors[f"{name}_image"] = torch.from_numpy(out.images).float().contiguous()
    meta[name] = {**{k: v for k, v in kw.items()}, "draws": len(records), "steps_run": len(steps),
                  "timesteps": [int(t) for t in pipe.scheduler.timesteps]}


lcm = LatentConsistencyModelImg2ImgPipeline.from_pretrained(os.path.join(FIX, "tiny-lcm"), torch_dtype=torch.float32,
                                                            safety_checker=None, requires_safety_checker=False)
lcm.set_progress_bar_config(disable=True)
run("lcm", lcm, strength=0.5, num_inference_steps=4, guidance_scale=8.5)

sd = StableDiffusionImg2ImgPipeline.from_pretrained(os.path.join(FIX, "tiny-sd"), torch_dtype=torch.float32,
                                                    safety_checker=None, requires_safety_checker=False)
sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
sd.set_progress_bar_config(disable=True)
run("sd", sd, strength=0.75, num_inference_steps=10, guidance_scale=7.5, negative_prompt="blurry")

import diffusers, transformers
meta["versions"] = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                    "torch": torch.__version__}
save_file(tensors, os.path.join(OUT, "golden.safetensors"))
with open(os.path.join(OUT, "golden.json"), "w") as f:
    json.dump(meta, f, indent=1)
print(json.dumps(meta, indent=1))
