"""Automatic prefix caching: the block manager's hash chain, reference counts and LRU reuse, and the engine
reusing cached KV blocks with greedy outputs identical to computing everything (incl. multi-turn chat where
turn 2 resends turn 1 and its answer), then the same through a real server and ``/metrics``."""

import httpx
import pytest

from serving.block_manager import BlockManager, chain_hash

BS = 4


def test_hash_chain_names_the_whole_prefix():
    m = BlockManager(8, BS)
    a = m.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], [])
    assert len(a) == 2  # full blocks only
    assert a[1] == chain_hash(a[0], [5, 6, 7, 8])
    b = m.hash_blocks([0, 2, 3, 4, 5, 6, 7, 8], [])
    assert b[1] != a[1]  # same tokens in block 1, another prefix: another hash
    assert m.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], list(a))[:2] == a  # extends, keeps


def test_register_match_share_and_lru_reuse():
    m = BlockManager(4, BS)
    hashes = m.hash_blocks(list(range(12)), [])
    blocks = m.allocate(3)
    for block, content in zip(blocks, hashes, strict=True):
        m.register(block, content)
    assert m.match(hashes, 3) == blocks and m.match(hashes, 2) == blocks[:2] and m.num_cached == 3
    other = m.hash_blocks([99] + list(range(1, 12)), [])
    assert m.match(other, 3) == []  # a different first block: nothing, even though later tokens agree
    m.acquire(blocks[:2])  # a second sequence shares the first two blocks
    m.free(blocks)  # the first sequence finishes: shared blocks stay held, its last block becomes free
    assert m.num_free == 2 and m.ref[blocks[0]] == 1 and m.ref[blocks[2]] == 0
    assert m.match(hashes, 3) == blocks  # free but cached: still found
    assert m.count_free(blocks) == 1
    m.free(blocks[:2])
    # free blocks are reused least recently freed first, a sequence's tail before its head
    fresh = m.allocate(2)
    assert fresh[0] not in blocks and fresh[1] == blocks[2]
    assert m.match(hashes, 3) == blocks[:2] and m.num_cached == 2  # the reused block lost its hash
    m.register(fresh[1], hashes[0])  # same content computed twice: the first block stays the cached one
    assert m.match(hashes, 1) == blocks[:1]


def test_disabled_prefix_cache_never_matches():
    m = BlockManager(4, BS, enable_prefix_caching=False)
    hashes = m.hash_blocks(list(range(8)), [])
    for block, content in zip(m.allocate(2), hashes, strict=True):
        m.register(block, content)
    assert m.match(hashes, 2) == [] and m.num_cached == 0


# ---- the engine on the tiny model ----------------------------------------------------------------

model_pkg = pytest.importorskip("model")


def make_engine(tiny, **overrides):
    from serving.engine import Engine

    model, tokenizer = tiny
    kwargs = dict(num_blocks=64, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                  eos_token_ids=[])
    kwargs.update(overrides)
    return Engine(model, tokenizer, **kwargs)


def generate(engine, prompts, max_tokens=8):
    """Greedy outputs of ``prompts`` submitted together."""
    from serving.engine import SamplingParams

    seqs = [engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0), lambda e: None) for p in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.slow
def test_multi_turn_reuses_turn_one_and_matches_no_cache(tiny):
    system = list(range(20, 43))  # 23 tokens shared by every conversation
    turn1 = [system + [7, 8, 9], system + [10, 11]]
    cached, plain = make_engine(tiny), make_engine(tiny, enable_prefix_caching=False)
    out1 = generate(cached, turn1)
    assert out1 == generate(plain, turn1)
    # turn 2 resends turn 1 + its answer + a new user message
    turn2 = [p + o + [300, 301, 302] for p, o in zip(turn1, out1, strict=True)]
    before = cached.num_computed_tokens
    out2 = generate(cached, turn2)
    assert out2 == generate(plain, turn2)
    computed = cached.num_computed_tokens - before
    # cached: every full block of turn 1 + answer (the answer's last token never ran) was reused
    reusable = sum((len(p) + len(o) - 1) // BS * BS for p, o in zip(turn1, out1, strict=True))
    assert computed == sum(len(p) + 8 - 1 for p in turn2) - reusable
    assert cached.allocator.hits >= reusable
    assert plain.allocator.hits == 0 and plain.num_computed_tokens == sum(
        len(p) + 8 - 1 for p in turn1 + turn2)
    assert cached.allocator.num_free == cached.allocator.num_blocks  # cached blocks are free (reusable)


def test_fully_cached_prompt_still_computes_its_last_token(tiny):
    prompt = list(range(50, 50 + 3 * BS))  # exactly three full blocks
    engine = make_engine(tiny)
    (first,) = generate(engine, [prompt])
    before = engine.num_computed_tokens
    (second,) = generate(engine, [prompt])
    assert second == first
    # two blocks reused; the third recomputed since its last token's logits are needed
    assert engine.num_computed_tokens - before == BS + 8 - 1


@pytest.mark.slow
def test_concurrent_sequences_share_cached_blocks(tiny):
    from serving.engine import SamplingParams

    prefix = list(range(60, 60 + 4 * BS))
    engine = make_engine(tiny)
    generate(engine, [prefix + [5]], max_tokens=2)
    seqs = [engine.submit(prefix + [6 + i], SamplingParams(max_tokens=6, temperature=0.0), lambda e: None)
            for i in range(3)]
    engine.step()
    shared = seqs[0].blocks[:4]
    assert all(s.blocks[:4] == shared for s in seqs) and all(engine.allocator.ref[b] == 3 for b in shared)
    while engine.has_work():
        engine.step()
    plain = generate(make_engine(tiny, enable_prefix_caching=False), [s.prompt_ids for s in seqs], max_tokens=6)
    assert [s.output_ids for s in seqs] == plain
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.slow
def test_eviction_under_a_small_cache_keeps_results_exact(tiny):
    prompts = [[100 + i] + list(range(30, 30 + 11 + 3 * i)) for i in range(5)]
    engine = make_engine(tiny, num_blocks=10)
    outs = [generate(engine, [p])[0] for p in prompts + prompts[:2]]  # cached blocks get reused for others
    plain = generate(make_engine(tiny, enable_prefix_caching=False), prompts + prompts[:2])
    assert outs == plain


# ---- a real server ------------------------------------------------------------------------------

def chat_twice(url):
    """Turn 1, then turn 2 resending turn 1 and its answer; returns the answers and /metrics."""
    from server_process import scrape_metrics

    messages = [{"role": "system", "content": "You are a careful assistant. " * 20},
                {"role": "user", "content": "Name three prime numbers."}]
    answers = []
    for turn in range(2):
        body = {"model": "glm5-tiny-random", "messages": messages, "max_tokens": 12, "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False}}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        answer = reply["choices"][0]["message"]["content"] or ""
        answers.append(answer)
        messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And {turn}?"}]
    return answers, scrape_metrics(url)


@pytest.mark.slow
def test_server_prefix_cache_metrics_and_flag():
    from server_process import ServerProcess

    with ServerProcess(["--kv-block-size", "16"]) as server:
        cached, metrics = chat_twice(server.url)
    with ServerProcess(["--kv-block-size", "16", "--no-enable-prefix-caching"]) as server:
        plain, off = chat_twice(server.url)
    assert cached == plain
    assert metrics["hwlayer_prefix_cache_hits_total"] >= 16 * 10  # turn 2 found turn 1's blocks
    assert 0 < metrics["hwlayer_prefix_cache_hit_rate"] < 1
    assert metrics["hwlayer_prefix_cache_queries_total"] > metrics["hwlayer_prefix_cache_hits_total"]
    assert off["hwlayer_prefix_cache_hits_total"] == 0 and off["hwlayer_kv_blocks_cached"] == 0
