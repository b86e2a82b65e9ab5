"""Installs two import packages: `dama_kernels` (from the folder `kernels/`) and `dama`.

Every dependency is pinned: an unpinned torch pulls a multi-GB CUDA build onto a CPU machine, and an unpinned triton
is replaced by a newer release that liger-kernel would otherwise drag in.
"""

from setuptools import setup

CORE = [
    "torch==2.13.0",
    "triton==3.8.0",
    "numpy==2.4.6",
    "transformers>=5.17,<6",
    "tokenizers==0.23.3",
    "datasets==5.2.0",
    "accelerate==1.15.0",
    "pillow==13.0.0",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

EXTRAS = {
    # liger-kernel is a peer in the benchmarks; it imports `packaging` without declaring it.
    "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "liger-kernel==0.8.5", "packaging", "psutil==7.2.2",
             "peft==0.21.2"],
    # DeepSpeed compiles nothing at install time when DS_BUILD_OPS=0 (the Makefile sets it).
    "deepspeed": ["deepspeed==0.19.8"],
    "lora": ["peft==0.21.2"],
    # flash-attn builds only against CUDA; it is imported lazily and only on a GPU.
    "gpu": ["flash-attn"],
    "lint": ["ruff==0.17.5"],
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
