"""What was built and what this machine offers: `affectkit info`."""

from __future__ import annotations

import importlib.util
from typing import Any

from . import _C


def info() -> dict[str, Any]:
    """Version, CUDA build (architectures), usable GPUs, OpenMP threads, SIMD level, torch."""
    build = _C.build_info()
    archs = build["cuda_architectures"]
    result: dict[str, Any] = {
        "version": build["version"],
        "cuda_compiled": build["cuda_compiled"],
        "cuda_architectures": archs.split(";") if archs else [],
        "cuda_runtime_version": _format_cuda_version(build["cuda_runtime_version"]),
        "cuda_devices": _C.cuda_device_count(),
        "openmp_threads": _C.num_threads(),
        "simd": _C.cpu_simd_level(),
        # the copy of the CPU kernels in use (AFFECTKIT_SIMD_LEVEL caps it)
        "simd_kernels": ("baseline", "avx2+fma", "avx512")[_C.simd_level()],
        "compiler": build["compiler"],
        "torch": None,
        "torch_cuda_available": False,
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        result["torch"] = torch.__version__
        result["torch_cuda_available"] = bool(torch.cuda.is_available())
    result["gpu_usable"] = bool(build["cuda_compiled"] and result["cuda_devices"] > 0)
    return result


def _format_cuda_version(code: int) -> str | None:
    if not code:
        return None
    return f"{code // 1000}.{(code % 1000) // 10}"
