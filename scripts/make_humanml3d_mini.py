"""Write tests/fixtures/humanml3d-mini: a miniature HumanML3D folder in exactly the dataset's layout,
written by NumPy (an independent .npy writer), with values the loader test can predict.

    python3 scripts/make_humanml3d_mini.py tests/fixtures/humanml3d-mini
"""
import os
import sys

import numpy as np

root = sys.argv[1]
F = 263
os.makedirs(os.path.join(root, "new_joint_vecs"), exist_ok=True)
os.makedirs(os.path.join(root, "texts"), exist_ok=True)

np.save(os.path.join(root, "Mean.npy"), (0.01 * np.arange(F)).astype(np.float32))
np.save(os.path.join(root, "Std.npy"), (1.0 + 0.001 * np.arange(F)).astype(np.float32))


def clip(frames, dtype):
    # value(t, k) = t + k / 1000
    return (np.arange(frames)[:, None] + np.arange(F)[None, :] / 1000.0).astype(dtype)


np.save(os.path.join(root, "new_joint_vecs", "000001.npy"), clip(60, np.float32))
np.save(os.path.join(root, "new_joint_vecs", "000002.npy"), clip(30, np.float32))
np.save(os.path.join(root, "new_joint_vecs", "000003.npy"), clip(80, np.float64))

texts = {
    "000001": [
        "a person walks forward.#a/DET person/NOUN walk/VERB forward/ADV#0.0#0.0",
        "someone strolls ahead#someone/PRON stroll/VERB ahead/ADV#nan#nan",
    ],
    "000002": ["a person jumps#a/DET person/NOUN jump/VERB#0.5#1.4"],
    "000003": [
        "a person waves#a/DET person/NOUN wave/VERB#0.0#0.0",
        "a person raises the left hand#a/DET person/NOUN raise/VERB the/DET left/ADJ hand/NOUN#1.0#3.5",
        "the left hand goes up#the/DET left/ADJ hand/NOUN go/VERB up/ADV#1.0#3.5",
    ],
}
for k, lines in texts.items():
    with open(os.path.join(root, "texts", k + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

with open(os.path.join(root, "train.txt"), "w") as f:
    f.write("000001\n000002\n000003\n000004\n")
with open(os.path.join(root, "test.txt"), "w") as f:
    f.write("000003\n")
