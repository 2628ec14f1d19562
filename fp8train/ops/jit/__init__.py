"""The JIT: compile CUDA sources to sm_90a cubins (cached), inspect their SASS, load and
launch them on torch's streams.

- compiler: `compile_cubin`, `CompiledKernel`, `csrc_dir`, `nvcc_path` (no GPU needed)
- sass: `check_sass`, `disassemble` (no GPU needed; cuobjdump + nvdisasm)
- runtime: `load_kernel`, `Kernel.launch`, `encode_tma_2d/3d` (GPU; cuda-bindings)
- device: `set_num_sms`, `get_num_sms`
"""
from .compiler import CompiledKernel, compile_cubin, csrc_dir, nvcc_path
from .device import get_num_sms, set_num_sms
from .runtime import Kernel, encode_tma_2d, encode_tma_3d, load_kernel
from .sass import SassReport, check_sass, disassemble

__all__ = [
    "CompiledKernel",
    "compile_cubin",
    "csrc_dir",
    "nvcc_path",
    "SassReport",
    "check_sass",
    "disassemble",
    "Kernel",
    "load_kernel",
    "encode_tma_2d",
    "encode_tma_3d",
    "set_num_sms",
    "get_num_sms",
]
