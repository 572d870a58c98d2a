"""compressor/machine.py: the machine header's keys, and versions as compression.json records them."""
import importlib.metadata as md
import platform

import torch

from compressor import checkpoint, kernels
from compressor.machine import machine_info, versions

CHECKPOINT_PACKAGES = ("compressor", "torch", "transformers", "safetensors", "peft", "bitsandbytes")


def test_machine_info_keys():
    info = machine_info(threads=3)
    assert set(info) == {"cpu", "l3", "physical_cores", "logical_cpus", "threads", "torch", "torch_cpu_capability",
                         "kernels", "versions", "date"}
    assert info["threads"] == 3 and info["cpu"] and info["logical_cpus"] >= 1
    assert info["torch"] == torch.__version__ and info["kernels"] == kernels.backend()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["versions"]) == {"python", "compressor", "torch", "transformers"}
    assert machine_info()["threads"] == torch.get_num_threads()


def test_versions_skips_a_missing_package():
    v = versions(("torch", "no-such-distribution-xyz"))
    assert v == {"python": platform.python_version(), "torch": md.version("torch")}


def test_versions_match_what_checkpoints_record():
    # Reference: every installed distribution, found another way; the same keys in the same order
    # as compression.json has always written them.
    installed = {d.metadata["Name"].lower(): d.version for d in md.distributions()}
    ref = {"python": platform.python_version()} | {p: installed[p] for p in CHECKPOINT_PACKAGES if p in installed}
    got = versions(CHECKPOINT_PACKAGES)
    assert list(got.items()) == list(ref.items()) == list(checkpoint.versions().items())
