"""The Cambricon and Moore Threads plugins: argument conversions (pure torch, checked against
hwlayer's generic ops), honest status when installed without the vendor stack, and the hook-spec
version check on a real installed plugin.

No vendor package exists here: the adapters' vendor calls are not exercised (they are "written
against the API, not run on hardware"); what is tested is every conversion around them, by
re-stating the vendor kernel's documented semantics in torch and comparing with hwlayer's contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwlayer import ops as generic
from hwlayer.hookspecs import HOOKSPEC_VERSION

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
for _p in ("hwlayer-cambricon", "hwlayer-musa"):
    if str(PLUGINS / _p) not in sys.path:
        sys.path.insert(0, str(PLUGINS / _p))

from hwlayer_cambricon import adapters as mlu_adapters  # noqa: E402
from hwlayer_cambricon import convert as mlu  # noqa: E402
from hwlayer_musa import adapters as musa_adapters  # noqa: E402
from hwlayer_musa import convert as musa  # noqa: E402


def _rope_cache(max_pos: int, D: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), dim=-1).float()


def _paged_batch(gen: torch.Generator, seq_lens: list[int], q_lens: list[int], dim: int, block_size: int = 4):
    """A paged cache holding every position of each sequence, with a shuffled block table."""
    blocks_per_seq = [(L + block_size - 1) // block_size for L in seq_lens]
    n_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(n_blocks, generator=gen)
    table = torch.full((len(seq_lens), max(blocks_per_seq)), 0, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    cache = torch.randn(n_blocks, block_size, dim, generator=gen)
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    return cache, table, cu, torch.tensor(seq_lens, dtype=torch.int32)


# ---- Cambricon conversions


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (7, 3, 64)])
def test_cambricon_full_rope_tables_reproduce_the_contract(interleaved, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    positions = torch.randint(0, 50, (shape[0],), generator=gen)
    cache = _rope_cache(64, shape[-1])
    cos, sin = mlu.rope_full_tables(cache, interleaved)
    assert cos.shape == sin.shape == cache.shape
    got = mlu.rotate_with_full_tables(x, cos[positions], sin[positions], interleaved)
    torch.testing.assert_close(got, generic.rope(x, positions, cache, interleaved))
    # the layouts really differ: the wrong one gives a different rotation
    wrong = mlu.rotate_with_full_tables(x, *[t[positions] for t in mlu.rope_full_tables(cache, not interleaved)],
                                        interleaved)
    assert not torch.allclose(wrong, got, atol=1e-3)


def test_cambricon_small_helpers():
    position_ids, cu, max_len = mlu.packed_rope_args(torch.tensor([5, 6, 9]))
    assert position_ids.dtype == torch.int32 and cu.tolist() == [0, 3] and max_len == 3
    assert mlu.routing_group_args(1, 1) == (-1, 0)
    assert mlu.routing_group_args(8, 8) == (-1, 0)
    assert mlu.routing_group_args(8, 4) == (8, 4)
    counts = mlu.group_counts(torch.tensor([3, 0, 2]))
    assert counts.dtype == torch.int32 and counts.tolist() == [3, 0, 2]
    x = torch.randn(2, 3, 8)
    assert mlu.rms_norm_rows(x).shape == (6, 8)


# ---- Moore Threads conversions


def test_musa_contiguous_layout_reproduces_grouped_gemm():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(sizes.sum()), 16, generator=gen)
    w = torch.randn(4, 8, 16, generator=gen)
    source_rows, m_indices = musa.contiguous_layout(sizes, alignment=4, num_rows=9)
    # padded group lengths 4, 0, 8, 4; padding rows carry -1, and so does the unused tail up to the
    # host bound (9 rows + 4 groups * 3 padding rows, rounded up to 4: 24 rows, nothing read back)
    assert m_indices.tolist() == [0, 0, 0, -1, 2, 2, 2, 2, 2, -1, -1, -1, 3, -1, -1, -1] + [-1] * 8
    assert source_rows.tolist()[:13] == [0, 1, 2, -1, 3, 4, 5, 6, 7, -1, -1, -1, 8]
    a = musa.pad_rows(x, source_rows)
    assert a.shape == (24, 16) and not a[source_rows < 0].any()
    # DeepGEMM contiguous semantics: d[r] = a[r] @ b[m_indices[r]]^T for rows with a group id
    d = torch.full((a.shape[0], w.shape[1]), float("nan"))
    for r, g in enumerate(m_indices.tolist()):
        if g >= 0:
            d[r] = a[r] @ w[g].t()
    positions = musa.padded_positions(sizes, 4, 9)
    assert positions.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]
    torch.testing.assert_close(musa.unpad_rows(d, positions), generic.grouped_gemm(x, w, sizes))


def test_musa_grouped_gemm_layout_reads_nothing_on_the_host():
    """The old layout sized tensors by the counts (repeat_interleave without a size, mask indexing): a
    host read per MoE layer, which a captured decode graph cannot hold."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        sizes = torch.tensor([3, 0, 5, 1])
        x = torch.randn(9, 16)
        source_rows, m_indices = musa.contiguous_layout(sizes, 4, 9)
        d = musa.pad_rows(x, source_rows)
        out = musa.unpad_rows(d, musa.padded_positions(sizes, 4, 9))
    assert out.shape == (9, 16) and m_indices.shape == (24,)


def test_musa_sparse_indices_reproduce_sparse_mla_attention():
    gen = torch.Generator().manual_seed(2)
    seq_lens, q_lens, H, Dk, v_dim, K = [9, 5], [3, 2], 2, 24, 16, 6
    cache, table, cu, lens = _paged_batch(gen, seq_lens, q_lens, Dk)
    T = sum(q_lens)
    q = torch.randn(T, H, Dk, generator=gen)
    indices = torch.full((T, K), -1, dtype=torch.int32)
    seq_idx, pos = generic.token_positions(cu, lens)
    for t in range(T - 1):  # the last token keeps no valid index at all
        n = min(K, int(pos[t]) + 1)
        indices[t, :n] = torch.randperm(int(pos[t]) + 1, generator=gen)[:n].to(torch.int32)
    kv_indices = musa.sparse_kv_indices(indices, table, cu, lens, cache.shape[1])
    assert kv_indices.shape == (T, 1, K) and kv_indices.dtype == torch.int32
    # FlashMLA sparse semantics on the flattened cache: softmax over the rows named by kv_indices
    kv = musa.flat_kv(cache)[:, 0]
    idx = kv_indices[:, 0]
    rows = kv[idx.clamp(min=0).long()]  # [T, K, Dk]
    s = torch.einsum("thd,tkd->thk", q, rows) * 0.3
    s = s.masked_fill((idx < 0)[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("thk,tkd->thd", torch.softmax(s, -1).nan_to_num(0.0), rows[..., :v_dim])
    out, lse = musa.empty_rows_to_contract(out, lse.masked_fill(torch.isinf(lse), float("inf")), kv_indices)
    ref_out, ref_lse = generic.sparse_mla_attention(q, cache, indices, table, cu, lens, 0.3, v_dim, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isneginf(lse[-1]).all()


def test_musa_paged_token_rows_reproduce_lightning_indexer():
    gen = torch.Generator().manual_seed(3)
    seq_lens, q_lens, Hi, Di, topk = [11, 6], [4, 6], 3, 8, 5
    k_cache, table, cu, lens = _paged_batch(gen, seq_lens, q_lens, Di)
    T, bs = sum(q_lens), k_cache.shape[1]
    q = torch.randn(T, Hi, Di, generator=gen)
    weights = torch.rand(T, Hi, generator=gen)
    scale = Di**-0.5
    context, rows = musa.paged_token_rows(table, cu, lens, T)
    assert context.shape == (T, 1) and context.dtype == rows.dtype == torch.int32 and rows.shape == (T, table.shape[1])
    # paged MQA logits semantics (mate's ref_fp8_paged_mqa_logits): row t scores positions 0 .. context[t] - 1
    # through its own block-table row; sum_h relu(q.k) * w_h, with the scale folded into w
    slots = (rows.long()[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [T, max_blocks * bs]
    keys = k_cache.reshape(-1, Di)[slots]
    logits = torch.einsum("thd,tld->thl", q, keys).relu().mul((weights * scale)[..., None]).sum(1)
    got = musa.topk_positions_from_logits(logits, torch.zeros(T, dtype=torch.int32), context.view(T), topk)
    ref = generic.lightning_indexer(q, weights, k_cache, table, cu, lens, topk, scale)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]
    assert (got == -1).any()  # early tokens of the short sequence pad with -1


def test_musa_fp8_rows_and_version_parsing():
    x = torch.randn(5, 32) * torch.tensor([0.01, 1.0, 10.0, 100.0, 0.5])[:, None]
    q8, scale = musa.fp8_quantize_rows(x)
    assert q8.dtype == torch.float8_e4m3fn and scale.shape == (5,)
    back = q8.float() * scale[:, None]
    assert ((back - x).abs() <= 0.07 * x.abs().amax(-1, keepdim=True)).all()
    assert musa.parse_version("2.7.0+git1234") == (2, 7, 0)
    assert musa.parse_version("2.10") >= (2, 7) and musa.parse_version("2.6.1") < (2, 7)


def test_adapters_decline_without_the_vendor_package():
    x = torch.randn(4, 8)
    why = mlu_adapters.supports_rms_norm(x, torch.ones(8), 1e-6)
    assert isinstance(why, str) and "torch_mlu_ops" in why
    why = musa_adapters.supports_grouped_gemm(x.bfloat16(), torch.randn(2, 3, 8).bfloat16(), torch.tensor([2, 2]))
    assert isinstance(why, str) and "mate" in why


# ---- installed plugins: real pip install into a temporary target, real entry points


def _write_incompatible_plugin(root: Path) -> Path:
    pkg = root / "hwlayer-future"
    (pkg / "hwlayer_future").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "hwlayer-future"\nversion = "0.1.0"\n'
        '[project.entry-points.hwlayer]\nfuture = "hwlayer_future"\n'
        '[tool.setuptools]\npackages = ["hwlayer_future"]\n'
    )
    (pkg / "hwlayer_future" / "__init__.py").write_text(
        'HWLAYER_HOOKSPEC_VERSION = "3.0"\n\nfrom hwlayer import Backend, hookimpl\n\n\n'
        "@hookimpl\ndef hwlayer_register_backends(register):\n"
        '    register(Backend(name="future", vendor="x", device_type="cpu", dist_backend="gloo"))\n'
    )
    return pkg


@pytest.mark.slow
def test_installed_plugins_report_honest_status(tmp_path):
    site = tmp_path / "site"
    future = _write_incompatible_plugin(tmp_path)
    # Build from copies: pip builds in-tree and would leave build/ and *.egg-info in plugins/.
    sources = [shutil.copytree(PLUGINS / name, tmp_path / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
               for name in ("hwlayer-cambricon", "hwlayer-musa", "hwlayer-kunlun")]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), *map(str, sources), str(future)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    env.pop("HWLAYER_PLUGINS", None)
    env.pop("HWLAYER_STRICT", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "hwlayer", "info", "--json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    backends = {b["name"]: b for b in info["backends"]}

    mlu_b = backends["cambricon"]
    assert (mlu_b["device_type"], mlu_b["dist_backend"], mlu_b["visible_devices_env"]) == (
        "mlu", "cncl", "MLU_VISIBLE_DEVICES")
    assert mlu_b["available"] is False
    assert mlu_b["reason"].startswith("torch_mlu is not importable (ModuleNotFoundError")
    assert "torch_mlu_ops" in mlu_b["install_hint"]
    assert "torch_mlu_ops 1.12.1" in mlu_b["verified"] and mlu_b["verified"].endswith("not run on hardware")
    assert "EMULATED" not in mlu_b["reason"]  # the test-only emulation switch is absent in a plain process

    musa_b = backends["musa"]
    assert (musa_b["device_type"], musa_b["dist_backend"], musa_b["visible_devices_env"]) == (
        "musa", "mccl", "MUSA_VISIBLE_DEVICES")
    assert musa_b["available"] is False
    assert musa_b["reason"].startswith("torch_musa is not importable (ModuleNotFoundError")
    assert "2.7" in musa_b["install_hint"]
    assert "not run on hardware" in musa_b["verified"]

    kunlun_b = backends["kunlunxin"]  # registered by its plugin only (moved out of the cuda family module)
    assert (kunlun_b["device_type"], kunlun_b["dist_backend"], kunlun_b["visible_devices_env"]) == (
        "cuda", "nccl", "XPU_VISIBLE_DEVICES")
    assert kunlun_b["available"] is False and "vLLM-Kunlun@09869ee" in kunlun_b["verified"]
    assert "not run on Kunlunxin hardware" in kunlun_b["verified"]

    # the hook-spec check: a plugin built for specs 3.0 is refused with a message, not loaded
    assert "future" not in backends
    why = info["skipped_plugins"]["future"]
    assert "built for hook specs 3.0" in why and f"2.0 to {HOOKSPEC_VERSION}" in why
    assert info["chosen_backend"] == "cpu"  # neither plugin is auto-selected without its hardware
