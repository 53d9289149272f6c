"""How much memory a job needs: the server refuses what would not fit a worker's budget.

Measured on the CPU path (peak RSS of one `facerecon reconstruct` process, 2026-11-24, after the
bake's memory work): the built-in model peaks at 0.70 GB at 2048², 1.37 GB at 4096² and 3.2 GB
at 8192²; ICT-FaceKit at 0.97 and 4.3 GB. A worker process with its models loaded holds about
WORKER_BASE_BYTES; a job adds about JOB_BYTES_PER_TEXEL a texel of its texture (the float colour
buffer and its fill, the texel map, the PNG) plus JOB_FIXED_BYTES (the photo, the fit, the
meshes). The estimate is meant to be a little above the measurements. Imports nothing heavy: the
server's main process uses it.
"""
from __future__ import annotations

from shared_protocol import ReconstructOptions

GIB = 1024 ** 3
WORKER_BASE_BYTES = 1 * GIB
JOB_FIXED_BYTES = 300 * 1024 ** 2
JOB_BYTES_PER_TEXEL = 56
PHOTO_BYTES_PER_TEXEL = 20          # each further photo of one person: its Observation (observed colours
                                    # and weight, 16 B) and its blend weight; measured after the merge of
                                    # issue 17 (ICT-FaceKit, 2048², peak RSS of `facerecon reconstruct`):
                                    # 1.00 GB for one photo, 1.09 GB for three (--person)


def worker_peak_bytes(options: ReconstructOptions, photos: int = 1) -> int:
    """The estimated peak of a worker process running one job with these options (and `photos`
    photos of one person)."""
    texels = options.texture_size ** 2
    return (WORKER_BASE_BYTES + JOB_FIXED_BYTES + JOB_BYTES_PER_TEXEL * texels
            + PHOTO_BYTES_PER_TEXEL * texels * (photos - 1))


def largest_texture_within(budget_bytes: int) -> int:
    """The largest power-of-two texture size whose job fits `budget_bytes` (0 if none does)."""
    size = 0
    candidate = 256
    while worker_peak_bytes(ReconstructOptions(texture_size=candidate)) <= budget_bytes and candidate <= 1 << 15:
        size, candidate = candidate, candidate * 2
    return size
