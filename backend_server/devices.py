"""Device names: 'cpu', or CUDA GPUs given as '0,1' or 'cuda:0,cuda:1'; checked against this machine."""
from __future__ import annotations


def parse_devices(text: str) -> list[str]:
    """'cpu' -> ['cpu']; '0,1' or 'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'] after checking they exist.

    Raises ValueError naming the GPUs this machine has when one does not exist.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["cpu"]:
        return ["cpu"]
    devices = []
    for item in items:
        index = item[5:] if item.startswith("cuda:") else item
        if not index.isdigit():
            raise ValueError(f"unknown device {item!r}: use cpu, or GPU indices such as 0,1 or cuda:0,cuda:1")
        devices.append(f"cuda:{int(index)}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"a device is listed twice in {text!r}")
    available = cuda_devices()
    missing = [d for d in devices if d not in available]
    if missing:
        have = ", ".join(f"{d} ({name})" for d, name in available.items()) or "none (no CUDA GPU is visible)"
        raise ValueError(f"{', '.join(missing)} does not exist on this machine; GPUs here: {have}")
    return devices


def cuda_devices() -> dict[str, str]:
    """{'cuda:0': 'NVIDIA H100 80GB HBM3', ...}; empty without CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{k}": torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())}
