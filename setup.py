"""Build for `compressor`.

The optional C++ CPU kernels (`compressor._C`) are added by `_extensions()`; when torch's
cpp_extension or a compiler is missing, the package installs without them and every op falls back
to its pure-PyTorch reference.
"""
import os

from setuptools import find_packages, setup


def _extensions():
    """(ext_modules, cmdclass) for the optional `compressor._C` CPU kernels, or ([], {}).

    The ISA-specific sources enable AVX2 / AVX-512 themselves with `#pragma GCC target`, so every
    file is compiled with the same baseline flags and the CPU is checked at run time. A failed
    compile only warns: the package still installs and the ops use their PyTorch references.
    Set COMPRESSOR_NO_BUILD_EXT=1 to skip the build.
    """
    if os.environ.get("COMPRESSOR_NO_BUILD_EXT") == "1" or not os.path.isdir("csrc"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing or broken at build time
        print(f"compressor: not building the C++ kernels ({e.__class__.__name__}: {e})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing: install without kernels
                print(f"compressor: WARNING: building {ext.name} failed ({e.__class__.__name__}: {e}); "
                      "the pure-PyTorch reference kernels will be used")

    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    ext = CppExtension(
        "compressor._C", sources,
        # -fopenmp makes at::parallel_for parallel; the libgomp torch ships satisfies the link.
        extra_compile_args=["-O3", "-fopenmp", "-std=c++20"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


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
        "accelerate>=0.30",          # meta-device skeletons in compressor.load
        "peft>=0.13",                # lora pass, adapter directories
        "bitsandbytes>=0.45",        # nf4 pass (QLoRA base), NF4 peer rows
        "matplotlib>=3.7",           # compress-bench --plot
    ],
    extras_require={
        "test": ["pytest>=7"],
        "peers": ["hqq"],
    },
    entry_points={"console_scripts": [
        "compress=compressor.cli:main",
        "compress-bench=compressor.bench.cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
