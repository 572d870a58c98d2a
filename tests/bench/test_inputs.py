"""compressor/bench/inputs.py: model arguments and their labels. The refusals of a whole run (paths,
positions, eval text, tokenizers) are tested through the command line in test_bench_cli.py."""
import pytest

from compressor.bench.config import BenchInputError
from compressor.bench.inputs import parse_model_arg, resolve_models


@pytest.mark.parametrize("arg, parsed", [("w4=out/rtn", ("w4", "out/rtn")), ("out/rtn", ("rtn", "out/rtn")),
                                         ("smollm2-135m", ("smollm2-135m", "smollm2-135m")), ("a=b=c", ("a", "b=c"))])
def test_parse_model_arg(arg, parsed):
    assert parse_model_arg(arg) == parsed


def test_parse_model_arg_keeps_an_existing_path_whole(tmp_path):
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_model_arg(str(odd)) == ("a=b", str(odd))


@pytest.mark.parametrize("arg", ["=out/rtn", "w4="])
def test_parse_model_arg_needs_both_parts(arg):
    with pytest.raises(BenchInputError, match="expected NAME=PATH"):
        parse_model_arg(arg)


def test_resolve_models_reads_size_and_refuses_duplicates(tiny_llama, tiny_w8):
    base, w8 = resolve_models([str(tiny_llama), f"w8={tiny_w8}"])
    assert (base.label, w8.label) == ("llama", "w8") and 0 < w8.disk_bytes < base.disk_bytes
    with pytest.raises(BenchInputError, match="two models are labelled 'a'"):
        resolve_models([f"a={tiny_llama}", f"a={tiny_w8}"])
