#!/usr/bin/env python3
"""PyTorch timings of the operations in benches/ops.rs, same shapes, 2 threads, f32 CPU."""
import time
import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def t(name, f):
    f()
    # At least 3 calls and 0.3 s, as benches/ops.rs.
    s = time.perf_counter()
    reps = 0
    while reps < 3 or time.perf_counter() - s < 0.3:
        f()
        reps += 1
    print(f"{name:<40} {(time.perf_counter() - s) * 1e3 / reps:>9.3f} ms")


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

    # CLIP-L at batch 1 (77 tokens, width 768, 12 heads of 64).
    h = torch.randn(1, 77, 768)
    w768 = torch.randn(768, 768) * 0.02
    w3072 = torch.randn(3072, 768) * 0.02
    w3072t = torch.randn(768, 3072) * 0.02
    h3072 = torch.randn(1, 77, 3072)
    t("linear 77x768 -> 768", lambda: F.linear(h, w768))
    t("linear 77x768 -> 3072", lambda: F.linear(h, w3072))
    t("linear 77x3072 -> 768", lambda: F.linear(h3072, w3072t))
    t("layer_norm 77x768", lambda: F.layer_norm(h, (768,)))
    t("quick_gelu 77x3072", lambda: h3072 * torch.sigmoid(1.702 * h3072))
    t("add 77x768", lambda: h + h)
    qh = torch.randn(1, 12, 77, 64)
    t("causal attention 12x77x64 (sdpa)", lambda: F.scaled_dot_product_attention(qh, qh, qh, is_causal=True))
    t("attention 12x77x64 (sdpa)", lambda: F.scaled_dot_product_attention(qh, qh, qh))
