"""Installs two import packages: `dama_kernels` (from the folder `kernels/`) and `dama`.

Dependencies are the ranges the project supports, so that it installs into an existing environment (a CUDA image's
own torch stays). The exact versions `make test`, `make demo` and CI install are in constraints.txt, which the
Makefile passes to pip with `-c`: without it, pip would pick the newest torch in the range, a CUDA build of several GB
on a CPU machine, and liger-kernel would pull a newer triton.
"""

from setuptools import setup

CORE = [
    "torch>=2.11,<2.14",
    "triton>=3.6,<3.9",
    "numpy>=1.26,<3",
    "transformers>=5.17,<6",
    "tokenizers>=0.23.1,<0.24",
    "datasets>=4.7,<6",
    "accelerate>=1.10.1,<2",
    "pillow>=11,<14",
    "pyyaml>=6.0.1,<7",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
]

EXTRAS = {
    # liger-kernel is a peer in the benchmarks; it imports `packaging` without declaring it. TRL is the DPO trainer
    # the end-to-end benchmark runs beside ours.
    "test": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "liger-kernel>=0.8.5,<0.9", "packaging", "psutil>=5.9.4,<8",
             "peft>=0.17,<1", "trl>=1.16,<2"],
    # DeepSpeed compiles nothing at install time when DS_BUILD_OPS=0 (the Makefile sets it).
    "deepspeed": ["deepspeed>=0.18,<0.20"],
    "lora": ["peft>=0.17,<1"],
    # flash-attn builds only against CUDA; it is imported lazily and only on a GPU, and only when asked for: PyTorch's
    # own varlen kernel serves packed attention on CUDA without it.
    "gpu": ["flash-attn"],
    "lint": ["ruff>=0.17,<0.18"],
}

setup(
    name="dama",
    version="0.1.0",
    description="DAMA (data- and model-aware DPO) for LLaVA-1.5 with fused sequence log-prob kernels",
    python_requires=">=3.10",
    packages=["dama_kernels", "dama"],
    package_dir={"dama_kernels": "kernels", "dama": "dama"},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["dama = dama.cli:main"]},
)
