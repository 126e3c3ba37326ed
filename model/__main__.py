"""Command line.

    python -m model --model PATH --prompt TEXT [--max-new-tokens N] [--backend X] [--speculative]
    python -m model --model PATH --prompt TEXT --weight-format int8
    python -m model plan --config PATH [--ep N] [--tp N] [--weight-format F] [--device h200 | --device-memory 141GiB]
        [--dp-attention [--contexts C] [--context-len L]]
    python -m model plan --config PATH --node a3      # which formats fit one node, at which EP

``plan`` prints the weights each rank holds (in the chosen weight format, by the loader's rules)
and the KV-cache bytes per token for a config.json, without loading any weights, and with
``--device`` / ``--device-memory`` whether they fit. ``--node`` tabulates every format at the
node's expert parallelism, in hwlayer's layout (attention replicated on every EP rank) and in
vLLM / vllm-ascend's (attention, dense MLP, embeddings and lm_head tensor-parallel over the same
devices: ``--tensor-parallel-size N --enable-expert-parallel``). ``--model`` and ``--config``
take a checkpoint directory or a hub id (model/hub.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hwlayer.ops.quant import WEIGHT_FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def parse_memory(text: str) -> int:
    """``141GiB`` / ``64GB`` / ``80G`` / ``1024MiB`` / plain bytes -> bytes."""
    units = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a size like 141GiB, 64GB or 80G")
    return int(float(m.group(1)) * units[m.group(2).lower()])


# Device memory as the vendor tools report it, and devices per node.
GIB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes per device (rank)
    per_node: int
    fp8: bool  # FP8 tensor units (fp8_block runs natively)
    source: str


DEVICES: dict[str, Device] = {
    "h200": Device("NVIDIA H200", 143771 * 2**20, 8, True, "nvidia-smi: 143771 MiB = 140.4 GiB (141 GB marketed)"),
    "h20": Device("NVIDIA H20", 96 * GIB, 8, True, "96 GB HBM3"),
    "910b": Device("Ascend 910B", 64 * GIB, 8, False, "npu-smi: 65536 MB HBM per 910B die"),
    "a2": Device("Atlas 800 A2 (8 x Ascend 910B, 64 GB)", 64 * GIB, 8, False, "vllm-ascend GLM5.md: 64GB x 8"),
    "a3": Device("Atlas 800 A3 (16 x 64 GB dies)", 64 * GIB, 16, False, "vllm-ascend GLM5.md: 64GB x 16"),
}
H200_BYTES = DEVICES["h200"].memory
MEMORY_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default: the share weights + KV may take
NODE_FORMATS = ("bf16", "fp8_block", "int8", "w8a8_static", "w4a8")


def node_report(config_path: str | Path, node: str) -> str:
    """For one node of ``DEVICES[node]``: each weight format's bytes per rank at EP = the node's device
    count, in hwlayer's layout (attention replicated) and with vLLM-style tensor parallelism of the
    non-expert weights over the same devices; FITS when the weights take at most
    ``MEMORY_UTILIZATION`` of a device (the rest is KV cache and activations)."""
    from .loader import planned_weight_bytes

    dev = DEVICES[node]
    cfg = _config(config_path)
    n = dev.per_node
    if cfg.n_routed_experts % n:
        raise ValueError(f"--node {node}: {n} devices do not divide n_routed_experts ({cfg.n_routed_experts})")
    budget = dev.memory * MEMORY_UTILIZATION
    lines = [f"node: {dev.name}, {n} x {dev.memory / GIB:.1f} GiB ({dev.source}); fits = weights <= "
             f"{MEMORY_UTILIZATION:.0%} of a device",
             f"{'format':<12} {'EP=' + str(n) + ' (hwlayer)':>26} {'TP=EP=' + str(n) + ' (vLLM)':>26}  note"]
    for fmt in NODE_FORMATS:
        cells = []
        for tp in (1, n):
            p = planned_weight_bytes(cfg, fmt, torch.bfloat16, n, tp=tp)
            b = p["replicated"] + p["experts"]
            cells.append(f"{b / GIB:7.2f} GiB {'FITS' if b <= budget else 'no':>4}")
        note = ""
        if fmt == "fp8_block" and not dev.fp8:
            note = "no FP8 units: loads as int8 (requantized, logged)"
        elif fmt in ("w8a8_static", "w4a8"):
            note = "msmodelslim GLM-5 recipe" + ("" if not dev.fp8 else "; generic ops on this device")
        lines.append(f"{fmt:<12} {cells[0]:>26} {cells[1]:>26}  {note}")
    return "\n".join(lines)


def _config(config_path: str | Path):
    from .config import ModelConfig
    from .hub import resolve_model

    path = Path(config_path)
    if not path.exists() and not str(config_path).endswith(".json"):
        path = resolve_model(str(config_path))  # a hub id: its config.json from the cache
    return ModelConfig.from_json(path)


def plan_report(config_path: str | Path, ep: int = 1, dtype: str = "bf16", weight_format: str | None = None,
                device_memory: int | None = None, tp: int = 1) -> str:
    """Weights per rank and paged-cache bytes per token for a glm_moe_dsa config.json.

    ``weight_format`` (default: ``bf16``, or ``fp8_block`` for the legacy ``dtype="fp8"``): the
    bytes come from :func:`model.loader.planned_weight_bytes`, the same rules the loader follows
    (a test checks planned == resident on a tiny checkpoint). ``device_memory``: say whether the
    rank's weights fit and how many tokens of KV cache the rest holds.
    """
    from hwlayer.ops.quant import UNQUANTIZED_FORMATS, check_format

    from .loader import expected_tensors, planned_weight_bytes

    cfg = _config(config_path)
    if ep < 1 or cfg.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} must be >= 1 and divide n_routed_experts ({cfg.n_routed_experts})")
    if tp < 1:
        raise ValueError(f"--tp {tp} must be >= 1")
    fmt = check_format(weight_format or {"bf16": "bf16", "fp8": "fp8_block"}[dtype], "--weight-format")
    float_dtype = UNQUANTIZED_FORMATS[fmt] if fmt in UNQUANTIZED_FORMATS else torch.bfloat16
    planned = planned_weight_bytes(cfg, fmt, float_dtype, ep, tp=tp)
    weight_bytes = planned["replicated"] + planned["experts"]
    cache_bytes = 2  # the latent and indexer caches are kept in bf16 in every format
    expert = replicated = 0
    for name, shape in expected_tensors(cfg, with_mtp=True).items():
        n = int(torch.Size(shape).numel())
        if ".mlp.experts." in name:
            expert += n
        else:
            replicated += n
    per_rank = replicated // tp + expert // ep
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_layer = [latent + (cfg.index_head_dim if cfg.layer_has_indexer(i) else 0) for i in range(L + n_mtp)]
    gib = 1024**3
    scale_note = f" (incl. {fmt.removesuffix('_block')} scales {planned['scales'] / gib:.3f} GiB)" \
        if planned["scales"] else ""
    lines = [
        f"config: {config_path} ({L} layers + {n_mtp} MTP, {cfg.n_routed_experts} routed experts, "
        f"top-{cfg.num_experts_per_tok}, index_topk {cfg.index_topk})",
        f"parameters: {replicated + expert:,} total ({expert:,} in routed experts, {replicated:,} replicated)",
        f"weights per rank (ep={ep}{f', tp={tp} (vLLM-style, plan only)' if tp > 1 else ''}, {fmt}): "
        f"{per_rank:,} parameters = {weight_bytes / gib:.2f} GiB "
        f"(replicated {planned['replicated'] / gib:.2f} GiB + experts {planned['experts'] / gib:.2f} GiB)"
        + scale_note,
        f"kv cache per token per full layer: {cfg.kv_lora_rank} latent + {cfg.qk_rope_head_dim} rope + "
        f"{cfg.index_head_dim} indexer key = {latent + cfg.index_head_dim} values "
        f"= {(latent + cfg.index_head_dim) * cache_bytes} bytes (bf16)",
        f"kv cache per token, all {L} layers: {sum(per_layer[:L])} values = "
        f"{sum(per_layer[:L]) * cache_bytes:,} bytes; "
        f"with MTP: {sum(per_layer) * cache_bytes:,} bytes",
        f"kv cache for one {cfg.max_position_embeddings}-token context: "
        f"{sum(per_layer) * cache_bytes * cfg.max_position_embeddings / gib:.2f} GiB (replicated on every EP rank)",
    ]
    if device_memory is not None:
        left = device_memory - weight_bytes
        if left > 0:
            tokens = left // (sum(per_layer) * cache_bytes)
            lines.append(f"device memory {device_memory / gib:.1f} GiB: weights FIT, {left / gib:.2f} GiB left for "
                         f"KV cache and activations (at most {tokens:,} tokens of KV cache)")
        else:
            lines.append(f"device memory {device_memory / gib:.1f} GiB: weights DO NOT FIT "
                         f"({weight_bytes / gib:.2f} GiB per rank; raise --ep or use a smaller --weight-format)")
    return "\n".join(lines)


def dp_attention_report(config_path: str | Path, ep: int, weight_format: str = "bf16", contexts: int | None = None,
                        context_len: int = 200_000, device_memory: int = H200_BYTES) -> str:
    """KV cache per rank with and without data-parallel attention, and how many ``context_len``-token
    contexts fit per node of ``ep`` devices with ``device_memory`` bytes each (weights as
    :func:`plan_report` counts them: the loader's own rules; activations and workspace not counted)."""
    from hwlayer.ops.quant import UNQUANTIZED_FORMATS, check_format

    from .loader import planned_weight_bytes

    cfg = _config(config_path)
    if ep < 2 or cfg.n_routed_experts % ep:
        raise ValueError(f"--dp-attention needs --ep N >= 2 dividing n_routed_experts ({cfg.n_routed_experts}), "
                         f"got --ep {ep}")
    contexts = ep if contexts is None else contexts
    if contexts < 1 or context_len < 1:
        raise ValueError(f"--contexts and --context-len must be positive, got {contexts}, {context_len}")
    fmt = check_format(weight_format, "--weight-format")
    planned = planned_weight_bytes(cfg, fmt, UNQUANTIZED_FORMATS.get(fmt, torch.bfloat16), ep)
    weights = planned["replicated"] + planned["experts"]
    L = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_token = 2 * sum(latent + (cfg.index_head_dim if cfg.layer_has_indexer(i) else 0) for i in range(L))
    gib = 1024**3
    per_context = per_token * context_len
    own = -(-contexts // ep)
    free = device_memory - weights
    fit = max(0, int(free // per_context))
    return "\n".join([
        f"data-parallel attention, ep={ep}: {contexts} concurrent {context_len}-token contexts "
        f"({per_context / gib:.2f} GiB of bf16 KV each)",
        f"  kv cache per rank with --dp-attention: {own} own context(s) = {own * per_context / gib:.2f} GiB "
        f"({own * per_context:,} bytes)",
        f"  kv cache per rank without (replicated): {contexts} contexts = {contexts * per_context / gib:.2f} GiB "
        f"({contexts * per_context:,} bytes)",
        f"  per device of {device_memory / gib:.1f} GiB: weights ({fmt}) {weights / gib:.2f} GiB, "
        f"{max(free, 0) / gib:.2f} GiB left for KV (activations and workspace not counted)",
        f"  {context_len}-token contexts per node of {ep} devices: {fit * ep} with --dp-attention "
        f"({fit} per rank), {fit} without",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        p = _Parser(prog="python -m model plan", description="weights per rank and KV bytes per token")
        p.add_argument("--config", required=True, help="config.json or checkpoint directory")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel world size")
        p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                       help="legacy: fp8 = --weight-format fp8_block")
        p.add_argument("--weight-format", choices=list(WEIGHT_FORMATS), default=None,
                       help="weight format the ranks hold (default: bf16, or fp8_block with --dtype fp8)")
        p.add_argument("--device-memory", default=None,
                       help="device memory per rank, e.g. 140.4GiB: say what fits (--dp-attention: default H200)")
        p.add_argument("--device", choices=list(DEVICES), default=None,
                       help="a known device: its memory per rank (" + ", ".join(
                           f"{k} {d.memory / GIB:.1f} GiB" for k, d in DEVICES.items()) + ")")
        p.add_argument("--tp", type=int, default=1,
                       help="plan only: non-expert weights tensor-parallel over N ranks, as vLLM shards them")
        p.add_argument("--node", choices=list(DEVICES), default=None,
                       help="tabulate every format at this node's EP: which fit one node")
        p.add_argument("--dp-attention", action="store_true", help="also: KV per rank with data-parallel attention")
        p.add_argument("--contexts", type=int, help="concurrent contexts for --dp-attention (default: --ep)")
        p.add_argument("--context-len", type=int, default=200_000, help="tokens per context (default 200000)")
        args = p.parse_args(argv[1:])
        from .config import ConfigError
        from .hub import ModelNotFoundError

        try:
            if args.node is not None:
                print(node_report(args.config, args.node))
                return 0
            memory = parse_memory(args.device_memory) if args.device_memory is not None else None
            if memory is None and args.device is not None:
                memory = DEVICES[args.device].memory
            fmt = args.weight_format or {"bf16": "bf16", "fp8": "fp8_block"}[args.dtype]
            dp = dp_attention_report(args.config, args.ep, fmt, args.contexts, args.context_len,
                                     memory or H200_BYTES) if args.dp_attention else None
            print(plan_report(args.config, args.ep, args.dtype, args.weight_format, memory, args.tp))
            if dp:
                print(dp)
        except (ConfigError, ValueError, ModelNotFoundError) as exc:
            return _fail(str(exc))
        return 0

    p = _Parser(prog="python -m model", description="greedy generation with a glm_moe_dsa checkpoint")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, or a Hugging Face id (a ModelScope id with HWLAYER_USE_MODELSCOPE=1)")
    p.add_argument("--revision", help="hub revision of a --model id (branch, tag or commit)")
    p.add_argument("--download-dir", help="hub cache directory for a --model id (default: the hub's)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default=None, help="hwlayer backend (default: GLM_BACKEND or auto)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on cpu)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP layer")
    p.add_argument("--weight-format", choices=list(WEIGHT_FORMATS), default=None,
                   help="weights kept as " + " | ".join(WEIGHT_FORMATS) + " (default: the checkpoint's format "
                        "when the backend runs it, else the best it runs)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        return _fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    import hwlayer

    from . import load_model
    from .config import ConfigError
    from .generate import generate, generate_speculative
    from .hub import resolve_model
    from .loader import CheckpointError
    from .tokenizer import load_tokenizer

    try:
        path = resolve_model(args.model, args.revision, args.download_dir)
        model = load_model(path, backend=args.backend, dtype=args.dtype, weight_format=args.weight_format)
        tok = load_tokenizer(path)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError, hwlayer.BackendError) as exc:
        return _fail(str(exc))
    ids = tok.encode(args.prompt).ids
    if not ids:
        return _fail("--prompt encodes to no tokens")
    try:
        if args.speculative:
            result = generate_speculative(model, [ids], max_new_tokens=args.max_new_tokens)
            out = result.tokens[0]
        else:
            out = generate(model, [ids], max_new_tokens=args.max_new_tokens)[0]
    except ValueError as exc:  # e.g. --speculative on a checkpoint without its MTP layer
        return _fail(str(exc))
    print(tok.decode(out[len(ids):].tolist(), skip_special_tokens=False))
    if args.speculative:
        print(f"[MTP acceptance rate: {result.acceptance_rate:.2f}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
