"""teskd_fast: fast, faithful TESKD (Teacher Evolution via Self-Knowledge Distillation).

The hand-written kernels (Triton, and the C kernel for the CPU) live in the top-level ``kernels/`` folder of the
source tree and install as the subpackage ``teskd_fast.kernels`` (never as a global module named ``kernels``).
"""

from setuptools import setup

setup(
    name="teskd_fast",
    version="0.1.0",
    description="Fast, faithful TESKD: fused Triton losses, cheaper exact networks, fast data and training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "teskd_fast", "teskd_fast.kernels", "teskd_fast.loss", "teskd_fast.models", "teskd_fast.data",
        "teskd_fast.train", "teskd_fast.train.compare",
    ],  # fmt: skip
    package_dir={"teskd_fast": "teskd_fast", "teskd_fast.kernels": "kernels"},
    # The fused CPU loss kernel ships as C source, built at first use (kernels/teskd_loss_cpu.py).
    package_data={"teskd_fast.kernels": ["csrc/*.c", "csrc/*.h"]},
    # torch 2.11 (with Triton 3.6) is the oldest release the code is tested on; 2.14.1 is pinned for CI.
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "pillow>=9.0",
        "einops>=0.8",
        "safetensors>=0.4",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.50"],
        "timm": ["timm>=1.0"],
        "tensorboard": ["tensorboard>=2.10"],
        "dev": [
            "pytest>=8", "pytest-benchmark>=4", "pytest-timeout>=2.2", "ruff==0.17.6", "scikit-learn>=1.3", "timm>=1.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "teskd-train=teskd_fast.train.cli:main",
            "teskd-scan=teskd_fast.data.scan:main",
            "teskd-plot=teskd_fast.train.plot:main",
            "teskd-compare=teskd_fast.train.compare:main",
        ]
    },
)
