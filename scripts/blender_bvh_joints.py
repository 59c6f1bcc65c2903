"""Import a BVH with Blender's own importer and write every joint's world position per frame.

    blender -b --factory-startup --python scripts/blender_bvh_joints.py -- IN.bvh OUT.json

OUT.json: {"joints": [names], "frames": [[[x, y, z] per joint] per frame]} in the BVH's axes
(Y up): the importer is asked for forward -Z, up Y, under which a BVH point (x, y, z) lands at
Blender's (x, -z, y); it is mapped back here. Blender 3.4's importer opens files with mode 'rU',
which Python 3.11 rejects, so `open` drops the U while it runs.
"""
import builtins
import json
import sys

import bpy

src, out = sys.argv[sys.argv.index("--") + 1:][:2]
real_open = builtins.open


def open_without_u(file, mode="r", *args, **kwargs):
    return real_open(file, mode.replace("U", ""), *args, **kwargs)


builtins.open = open_without_u
try:
    bpy.ops.import_anim.bvh(
        filepath=src,
        axis_forward="-Z",
        axis_up="Y",
        global_scale=1.0,
        frame_start=1,
        use_fps_scale=False,
        update_scene_fps=False,
        update_scene_duration=True,
        rotate_mode="NATIVE",
    )
finally:
    builtins.open = real_open

scene = bpy.context.scene
arm = next(o for o in scene.objects if o.type == "ARMATURE")
names = [b.name for b in arm.pose.bones]
# The action's own range: the scene's end may stay at its default.
first, last = (int(round(x)) for x in arm.animation_data.action.frame_range)
frames = []
for f in range(first, last + 1):
    scene.frame_set(f)
    row = []
    for b in arm.pose.bones:
        p = arm.matrix_world @ b.head
        row.append([p.x, p.z, -p.y])
    frames.append(row)
with real_open(out, "w") as fh:
    json.dump({"joints": names, "frames": frames}, fh)
