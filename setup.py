"""Pure-Python install: CUDA kernels in csrc/ are compiled at first use, never here."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fp8train",
    version="0.1.0",
    description="DeepSeek-V3-style fine-grained FP8 training for PyTorch on Hopper GPUs",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fp8train", "fp8train.*"]) + ["fp8train.csrc"],
    # The CUDA sources ship as data inside the wheel (fp8train/csrc); the JIT compiles them at
    # first use (fp8train.ops.jit.csrc_dir finds them there or in the source tree).
    package_dir={"fp8train.csrc": "csrc"},
    package_data={"fp8train.csrc": ["*.cuh", "*.cu", "*.h", "*.hpp", "**/*.cuh", "**/*.cu",
                                    "**/*.h", "**/*.hpp"]},
    install_requires=[
        "torch>=2.9,<3",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        # The native kernels' launcher and TMA descriptors (imported at first kernel use);
        # CUDA exists on Linux and Windows only, so other machines install without it.
        "cuda-bindings>=12.9; platform_system != 'Darwin'",
    ],
    extras_require={
        # recipes/compare.py's loss-curve PNG (the tests run it, so "test" has it too).
        "recipes": ["matplotlib>=3.5"],
        # Hugging Face models (fp8train.nn.hf): the ExpertsInterface / use_experts_implementation
        # API and revert_weight_conversion arrived with transformers 5.
        "hf": ["transformers>=5.0,<6"],
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.5", "transformers>=5.0,<6",
                 # SASS inspection in the kernel compile tests (skipped without them).
                 "nvidia-cuda-cuobjdump; platform_system == 'Linux'",
                 "nvidia-cuda-nvdisasm; platform_system == 'Linux'"],
    },
)
