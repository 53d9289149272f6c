"""Rasterizers with one contract: `rasterize` on the CPU (numpy) and on CUDA (nvdiffrast)."""
