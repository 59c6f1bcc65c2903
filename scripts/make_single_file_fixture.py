"""Make tests/fixtures/sd15-layout (a tiny diffusers folder with Stable Diffusion 1.5's block
structure, seeded random weights) and tests/fixtures/sd15-layout.safetensors (the same model as
one LDM-layout checkpoint, written by diffusers' own conversion script).

    python scripts/make_single_file_fixture.py \
        --convert PATH/TO/diffusers/scripts/convert_diffusers_to_original_stable_diffusion.py

Needs torch, diffusers, transformers, safetensors. The text encoder, tokenizer, scheduler and
model index are tests/fixtures/tiny-sd's (linked, not copied), so only the U-Net and VAE are new:
4 blocks of 2 layers, 32 channels each (GroupNorm 32), attention in the first three down blocks,
the last three up blocks and the middle, 8 heads — SD1.5's structure at a tiny width.
"""

import argparse
import os
import shutil
import subprocess
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

ap = argparse.ArgumentParser()
ap.add_argument("--convert", required=True, help="diffusers' convert_diffusers_to_original_stable_diffusion.py")
ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
args = ap.parse_args()

out = os.path.join(args.fixtures, "sd15-layout")
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=64,
)
unet.half().save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
vae.half().save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
tiny = os.path.join(args.fixtures, "tiny-sd")
for part in ["text_encoder", "tokenizer"]:
    os.symlink(os.path.join("..", "tiny-sd", part), os.path.join(out, part))
shutil.copytree(os.path.join(tiny, "scheduler"), os.path.join(out, "scheduler"))
shutil.copy(os.path.join(tiny, "model_index.json"), os.path.join(out, "model_index.json"))

target = os.path.join(args.fixtures, "sd15-layout.safetensors")
subprocess.run(
    [sys.executable, args.convert, "--model_path", out, "--checkpoint_path", target, "--half", "--use_safetensors"],
    check=True,
)
print("wrote", out, "and", target)
