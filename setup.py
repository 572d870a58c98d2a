"""Build for `compressor`.

The C++ CPU kernels reach every install path one of two ways:

* at build time, as `compressor._C`, when torch is importable while building
  (``pip install --no-build-isolation``; `_extensions()`);
* on first use, compiled from the sources shipped inside the package and cached
  (`compressor.kernels.build`). A plain ``pip install .`` builds in an isolated environment that
  has no torch, and installing torch there is no option: pip would fetch a multi-GB CUDA build
  whose ABI need not match the runtime torch. So `build_py` copies ``csrc/`` and ``cuda/`` into
  ``compressor/_sources/`` of every wheel.

The CUDA kernels (``cuda/``) are built as `compressor._C_cuda` only when torch has CUDA and ``nvcc`` is found
(`_cuda_extension`); the CPU install never needs CUDA. Without them a GPU runs the Triton kernels (the
``triton`` extra) or the PyTorch reference; see ``cuda/README.md``.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CPU_SOURCES = os.path.join("csrc", "cpu")
# Source trees shipped as package data, and the file types copied from them.
SHIPPED_SOURCES = ("csrc", "cuda")
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh", ".md")


class BuildPyWithSources(build_py):
    """build_py that also copies the kernel sources into ``compressor/_sources/`` of the build, so
    an installed wheel can compile them on first use (`compressor.kernels.build` the torch extension,
    `compressor.runtime.build` the torch-free engine of ``csrc/engine``). An editable install skips the
    copy: both find ``<repo>/csrc`` themselves."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for top in SHIPPED_SOURCES:
            dest = os.path.join(self.build_lib, "compressor", "_sources", top)
            # build/ survives between builds: start afresh so a moved or deleted source is not shipped.
            shutil.rmtree(dest, ignore_errors=True)
            for path in self._shipped(top):
                out = os.path.join(self.build_lib, "compressor", "_sources", path)
                self.mkpath(os.path.dirname(out))
                self.copy_file(path, out)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [os.path.join(self.build_lib, "compressor", "_sources", p)
                          for top in SHIPPED_SOURCES for p in self._shipped(top)]

    @staticmethod
    def _shipped(top):
        """Relative paths of the source files under `top`, sorted."""
        return sorted(os.path.join(d, f) for d, _, files in os.walk(top) for f in files
                      if f.endswith(SOURCE_SUFFIXES))


def _extensions():
    """(ext_modules, build_ext cmdclass) for the optional `compressor._C` CPU kernels, or ([], {}).

    The ISA-specific sources enable AVX2 / AVX-512 themselves with `#pragma GCC target`, so every
    file is compiled with the same baseline flags and the CPU is checked at run time. Without torch
    at build time, or when the compile fails, this only prints a line: the package still installs
    and compiles the kernels on first use instead (`compressor.kernels.build`, same flags).
    Set COMPRESSOR_NO_BUILD_EXT=1 to skip the build.
    """
    if os.environ.get("COMPRESSOR_NO_BUILD_EXT") == "1" or not os.path.isdir(CPU_SOURCES):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (pip's isolated build environment) or broken
        print(f"compressor: not building the C++ kernels now ({e.__class__.__name__}: {e}); "
              "they compile on first use")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing: install without the prebuilt kernels
                print(f"compressor: WARNING: building {ext.name} failed ({e.__class__.__name__}: {e}); "
                      "the kernels will be compiled on first use, or the PyTorch references used")

    sources = sorted(os.path.join(CPU_SOURCES, f) for f in os.listdir(CPU_SOURCES) if f.endswith(".cpp"))
    cuda = _cuda_extension()
    headers = sorted(os.path.join(CPU_SOURCES, f) for f in os.listdir(CPU_SOURCES) if f.endswith(".h"))
    ext = CppExtension(
        "compressor._C", sources, depends=headers,  # an edited header rebuilds the sources
        # Keep in step with compressor/kernels/build.py (CFLAGS, LDFLAGS). -fopenmp makes
        # at::parallel_for parallel; the libgomp torch ships satisfies the link.
        extra_compile_args=["-O3", "-fopenmp", "-std=c++20"],
        extra_link_args=["-fopenmp"],
    )
    return [ext] + ([cuda] if cuda else []), {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


def _cuda_extension():
    """The `compressor._C_cuda` extension (cuda/ops.cu, cuda/dq_gemm.cu) when torch has CUDA and nvcc is found,
    else None. The kernels need sm_80 or newer (bf16 tensor cores); TORCH_CUDA_ARCH_LIST, when unset, is
    A100, A10/RTX 30, L4/RTX 40 and H100, plus PTX for newer GPUs."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        print(f"compressor: not building the CUDA kernels (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, nvcc {nvcc or 'not found'})")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
    return CUDAExtension(
        "compressor._C_cuda", [os.path.join("cuda", "ops.cu"), os.path.join("cuda", "dq_gemm.cu")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20"]})


ext_modules, cmdclass = _extensions()

setup(
    name="compressor",
    version="0.1.0",
    description="Make language models smaller, faster and cheaper to run, and prove it.",
    packages=find_packages(include=["compressor", "compressor.*"]),
    package_data={"compressor": ["recipes/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "ninja",                     # torch.utils.cpp_extension.load: the first-use kernel compile
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
        # engines that read the exports (compressor.export.engines); GPTQModel pins a CUDA torch, so it
        # has a script of its own (scripts/install-gptqmodel.sh), and on Xeons with AMX llama.cpp must be
        # built by scripts/install-llama-cpp.sh (its AMX path crashes): a plain [llama] is for other CPUs
        "engines": ["compressed-tensors==0.20.1"],
        "llama": ["llama-cpp-python==0.3.36"],
        # compress export onnx and the ort engine (CPU); onnx-ir is what ONNX Runtime's own quantizer imports
        # (benchmarks/ort_peer.py). onnx-gpu instead of onnx on a CUDA machine: the two runtimes are one module.
        "onnx": ["onnx>=1.18", "onnxruntime>=1.32", "onnx-ir"],
        "onnx-gpu": ["onnx>=1.18", "onnxruntime-gpu>=1.31", "onnx-ir"],
        # the Triton dequant-matmul (compressor/kernels/triton_gptq.py): run under TRITON_INTERPRET=1 and compiled
        # ahead of time for sm_80/sm_90 in the tests, on a CPU-only machine too
        "triton": ["triton>=3.4"],
    },
    entry_points={"console_scripts": [
        "compress=compressor.cli:main",
        "compress-bench=compressor.bench.cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
)
