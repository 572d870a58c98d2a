"""compressor/bench/config.py: BenchConfig refuses bad values with a message naming them."""
import pytest

from compressor.bench.config import BenchConfig, BenchInputError


@pytest.mark.parametrize("kw, msg", [({"batches": ()}, "batches=()"), ({"batches": (1, 1)}, "repeated"),
                                     ({"gen_len": 1}, "gen_len=1"), ({"runs": 0}, "runs=0"), ({"prefill_reps": 0}, "prefill_reps=0"),
                                     ({"warmup": -1}, "warmup=-1"), ({"eval_windows": 0}, "eval_windows=0"),
                                     ({"price_per_hour": -1.0}, "price_per_hour=-1.0"),
                                     ({"min_speedup": 0}, "min_speedup=0")])
def test_config_refuses(kw, msg):
    with pytest.raises(BenchInputError, match=msg):
        BenchConfig(**kw)


def test_config_batches_become_a_tuple():
    assert BenchConfig(batches=[1, 8]).batches == (1, 8)
