#!/usr/bin/env python3
"""PyTorch timings of the operations in benches/ops.rs, same shapes, 2 threads, f32 CPU."""
import time
import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def t(name, f, reps=3):
    f()
    s = time.perf_counter()
    for _ in range(reps):
        f()
    print(f"{name:<40} {(time.perf_counter() - s) * 1e3 / reps:>9.2f} ms")


with torch.no_grad():
    x = torch.randn(1, 320, 64, 64)
    w3 = torch.randn(320, 320, 3, 3) * 0.02
    w1 = torch.randn(320, 320, 1, 1) * 0.02
    t("conv3x3 320->320 @64x64", lambda: F.conv2d(x, w3, padding=1))
    xv = torch.randn(1, 128, 512, 512)
    wv = torch.randn(128, 128, 3, 3) * 0.02
    t("conv3x3 128->128 @512x512", lambda: F.conv2d(xv, wv, padding=1))
    t("conv1x1 320->320 @64x64", lambda: F.conv2d(x, w1))
    t("group_norm 32 @320x64x64", lambda: F.group_norm(x, 32))
    t("silu @320x64x64", lambda: F.silu(x))
    tok = torch.randn(1, 4096, 320)
    wl = torch.randn(320, 320) * 0.02
    t("linear 4096x320 -> 320", lambda: F.linear(tok, wl))
    wg = torch.randn(2560, 320) * 0.02
    t("linear 4096x320 -> 2560 (geglu proj)", lambda: F.linear(tok, wg))
    big = torch.randn(1, 4096, 1280)
    t("gelu_erf 4096x1280", lambda: F.gelu(big))
    t("layer_norm 4096x320", lambda: F.layer_norm(tok, (320,)))
    q = torch.randn(8, 4096, 40)
    t("attn scores q@k^T 8x4096x4096", lambda: q @ q.transpose(1, 2))
    s = q @ q.transpose(1, 2)
    t("softmax_last_dim 8x4096x4096", lambda: s.softmax(-1))
    t("probs@v", lambda: s @ q)
    t("sdpa 8x4096x40 (fused)", lambda: F.scaled_dot_product_attention(q[None], q[None], q[None]))
