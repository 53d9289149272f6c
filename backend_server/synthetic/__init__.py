"""Synthetic faces with a known truth, for any `MorphableModel`: random heads (identity,
expression), several views of one moment (poses up to a yaw of 90 degrees, cameras), lights
(`render.shade.Light`), and procedural albedo textures in the model's own UV layout.

- `sampling`: `sample_head(model, seed)` -> `HeadSample` (coefficients, views, light, albedo recipe);
- `albedo`: skin albedo as a function on the head surface, baked into a model's UVs;
- `scene`: a model and a head sample -> what a renderer needs (`RenderMesh`, vertex colours);
- `cycles`: the reference renderer (Cycles through bpy; needs the test extra's `bpy`);
- `dataset`: a folder of rendered heads with their truth: writing, reading, and a command line.

Everything is deterministic from the seed.
"""
