"""tests/fixtures/minilm.safetensors: sentence-transformers' embeddings of SENTENCES with the shipped
weights/minilm (f16 weights, computed in f32), the per-token states of the first sentence, and the
same embeddings from the original f32 weights (to measure what f16 storage costs).

    python3 scripts/make_minilm_fixture.py weights/minilm ORIGINAL_MODEL_DIR tests/fixtures/minilm.safetensors
"""
import json
import sys

import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "a person walks forward",
    "someone strolls ahead",
    "a person jumps backward",
    "a man waves his right hand twice",
    "the person raises both arms above the head and claps",
    "A woman runs in a circle, then stops.",
    "a figure turns around to the left and walks back",
    "someone kicks with the left leg",
    "a person crawls on the floor",
    "the person does a cartwheel",
    "walking slowly while looking around",
    "he punches forward with his right fist, then steps back",
]

shipped, original, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = SentenceTransformer(shipped, device="cpu", model_kwargs={"dtype": torch.float32})
emb = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False).float()
states = model.encode(SENTENCES[:1], output_value="token_embeddings")[0].float()
ref = SentenceTransformer(original, device="cpu")
emb32 = ref.encode(SENTENCES, convert_to_tensor=True).float()
save_file(
    {
        "embeddings": emb.contiguous(),
        "token_states_0": states.contiguous(),
        "embeddings_f32_weights": emb32.contiguous(),
    },
    out,
    metadata={"sentences": json.dumps(SENTENCES)},
)
print("max |f16 - f32 weights| =", (emb - emb32).abs().max().item())
print("min cosine f16 vs f32 =", torch.nn.functional.cosine_similarity(emb, emb32).min().item())
