"""Reconstruction stages, one module each: decode, detect, landmarks, fit, bake, export, evaluate.

Each stage is a plain function over arrays; `reconstruct.py` chains them.
Frames: photo pixels (x right, y down, origin top-left, pixel centres at +0.5); camera frame
(metres, +X right, +Y up, +Z toward the viewer, so visible points have z < 0); head frame
(metres, same axes as the camera for a frontal face, origin between the eyes).
"""
