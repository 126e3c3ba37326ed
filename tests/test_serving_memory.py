"""KV cache sizing (serving/memory.py): byte sizes, the precedence of the flags, the CPU default."""

import pytest

from serving.memory import CPU_DEFAULT_CONTEXTS, blocks_for_bytes, capacity, parse_bytes, size_cache


@pytest.mark.parametrize("text, value", [("1000", 1000), ("8K", 8000), ("8k", 8000), ("2M", 2 * 10**6),
                                         ("30G", 30 * 10**9), ("1Ki", 1024), ("512Mi", 512 * 2**20),
                                         ("7.5Gi", int(7.5 * 2**30)), ("4GiB", 4 * 2**30), ("1T", 10**12)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5G", "5X", "1.2.3", "0", "0.1"])
def test_parse_bytes_rejects_in_one_line(text):
    with pytest.raises(ValueError) as exc:
        parse_bytes(text)
    assert "\n" not in str(exc.value) and "expected" in str(exc.value)


class CPUModel:
    device = "cpu"

    def kv_bytes_per_token(self):
        return 1000


def sized(**overrides):
    kwargs = dict(num_kv_blocks=None, kv_cache_memory_bytes=None, gpu_memory_utilization=0.9, model=CPUModel(),
                  block_size=16, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256)
    kwargs.update(overrides)
    return size_cache(**kwargs)


def test_flags_precedence_and_the_cpu_default():
    assert sized(num_kv_blocks=7, kv_cache_memory_bytes=10**9) == (7, "--num-kv-blocks")
    blocks, how = sized(kv_cache_memory_bytes=16 * 1000 * 100 + 999)  # 100 blocks of 16 tokens x 1000 B, a rest
    assert blocks == 100 and how == "--kv-cache-memory-bytes"
    blocks, how = sized()
    assert blocks == CPU_DEFAULT_CONTEXTS * 1024 // 16 and "cpu default" in how
    assert blocks_for_bytes(15999, 1000, 16) == 0
    assert capacity(256, 16, 1024) == (4096, 4.0)
