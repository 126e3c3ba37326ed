"""Command line of ``serve.py``: check flags and backend, load the model, run uvicorn.

Order matters for clear failures: flags are checked first, then the hwlayer backend is resolved
(``GLM_BACKEND=ascend`` without torch_npu fails here, before any weight is read), then the
expert-parallel configuration, then the checkpoint is loaded. Every such failure is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_MODEL_NAME = "glm5-tiny-random"
PROG = "serve.py"
# --dtype values (vLLM's spellings) -> load_model's dtype (None: its default)
DTYPES = {"auto": None, "float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "half": "float16"}
# The parsers serving/parsers.py implements, by vLLM's names: GLM-4.5 / 4.7 / 5 share one format.
GLM_PARSERS = ("glm45", "glm47")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {PROG} --help)")


def report(message: str) -> None:
    """One error line on stderr, the way every failure of the server is reported."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def fail(message: str, status: int = 2) -> NoReturn:
    report(message)
    sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description="OpenAI-compatible GLM-5 server on any hwlayer backend "
                       "(GLM_BACKEND=name selects one; default: auto-detect).")
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="checkpoint directory, as vLLM's `vllm serve MODEL` (same as --model)")
    p.add_argument("--model", help="checkpoint directory (HF layout); default: the embedded glm5-tiny-random model")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a Hugging Face / ModelScope MODEL id")
    p.add_argument("--download-dir", help="hub cache directory for a MODEL id (default: the hub's, e.g. HF_HOME)")
    p.add_argument("--tokenizer", help="directory holding tokenizer.json (or the file itself); default: the model's")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="weight and activation dtype (default auto: float32 on cpu, the config's on accelerators)")
    p.add_argument("--seed", type=int,
                   help="seed of the default sampling generator: requests without a seed become reproducible "
                        "across server runs of the same request sequence (default: random)")
    p.add_argument("--allowed-origins", default="",
                   help="CORS: comma-separated origins (or a JSON list) browsers may call from, '*' for any; "
                        "default none (no cross-origin access)")
    p.add_argument("--strict-request-fields", action="store_true",
                   help="answer 400 to request fields no API here knows (default: log them once and ignore, as vLLM)")
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (vLLM's flag; lm-eval reads it): exposes the chat template")
    p.add_argument("--tool-call-parser", default="glm47", choices=sorted(GLM_PARSERS),
                   help="tool-call format (vLLM names; default glm47; both are GLM's <tool_call> format)")
    p.add_argument("--reasoning-parser", default="glm45", choices=sorted(GLM_PARSERS),
                   help="reasoning format (vLLM names; default glm45: <think>...</think>)")
    p.add_argument("--served-model-name", help="model name clients send (default: glm5-tiny-random or the dir name)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template file (default: the checkpoint's own; the built-in GLM-5 renderer when "
                   "the checkpoint ships none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--max-model-len", type=int, help="context limit (default: min(max_position_embeddings, 4096))")
    p.add_argument("--kv-block-size", type=int, default=64, help="tokens per KV cache block (default 64)")
    p.add_argument("--num-kv-blocks", type=int,
                   help="KV cache size in blocks: overrides --kv-cache-memory-bytes and --gpu-memory-utilization")
    p.add_argument("--kv-cache-memory-bytes", metavar="BYTES",
                   help="KV cache size in bytes (K/M/G: powers of 1000, Ki/Mi/Gi: powers of 1024, e.g. 30Gi); "
                        "overrides --gpu-memory-utilization (per rank with --dp-attention)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the device's memory for weights, activations and the KV cache; the cache "
                        "gets what a profiling step leaves (default 0.9). On the CPU (no device memory to "
                        "profile) the cache defaults to 4 full contexts of --max-model-len")
    p.add_argument("--speculative-config", metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON: \'{"method": "mtp", "num_speculative_tokens": N}\' '
                        "(drafts with the checkpoint's MTP layer)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step (decodes + prefill chunks): the chunked-prefill budget (default 2048)")
    p.add_argument("--api-key", default=os.environ.get("HWLAYER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env HWLAYER_API_KEY)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks; launch with torchrun --nproc-per-node N serve.py --ep N (default 1)")
    p.add_argument("--dp-attention", action="store_true",
                   help="with --ep N: each rank runs attention and the KV cache of its own sequences, only the MoE "
                   "layers exchange tokens; --num-kv-blocks, --max-num-seqs and --max-num-batched-tokens are per rank")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="request body size limit, larger bodies get 413 (default 4 MiB)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: no device-graph capture of decode steps (default: capture where "
                   "the backend declares device graphs; `hwlayer info` shows which do)")
    p.add_argument("--weight-format", choices=["fp8_block", "int8", "bf16", "fp16", "fp32"], default=None,
                   help="weight format kept in memory (default: the checkpoint's when the backend runs it, else the "
                        "best it runs; an fp8_block checkpoint becomes int8 on a backend without FP8)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of full blocks whose tokens (and all tokens before them) were computed before: "
                        "shared prompt prefixes and multi-turn history are not recomputed (default on; "
                        "--no-enable-prefix-caching turns it off)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: stop admitting (503), let in-flight requests finish for at most this "
                        "many seconds, end the rest with finish_reason 'abort', exit 0 (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def check_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        fail(f"--port {args.port}: expected 0..65535")
    for flag in ("kv_block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "ep", "max_body_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.dp_attention and args.ep < 2:
        fail(f"--dp-attention needs --ep N with N >= 2 ranks (got --ep {args.ep}); launch with torchrun "
             "--nproc-per-node N serve.py --ep N --dp-attention")
    if args.chat_template is not None and not Path(args.chat_template).expanduser().is_file():
        fail(f"--chat-template {args.chat_template}: no such file; expected a Jinja chat template file")
    if not 0 <= args.shutdown_timeout <= 24 * 3600:
        fail(f"--shutdown-timeout {args.shutdown_timeout}: expected seconds in [0, 86400]")
    if args.api_key is not None and not args.api_key.strip():
        fail("--api-key (or HWLAYER_API_KEY) is empty; give a key or leave it unset")
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            fail(f"MODEL {args.model_tag} and --model {args.model} disagree; give one of them")
        args.model = args.model_tag
    if args.seed is not None and not 0 <= args.seed < 2**63:
        fail(f"--seed {args.seed}: expected an integer in [0, 2**63)")
    args.allowed_origins = parse_origins(args.allowed_origins)
    if not 0 < args.gpu_memory_utilization <= 1:
        fail(f"--gpu-memory-utilization {args.gpu_memory_utilization}: expected a fraction in (0, 1]")
    if args.kv_cache_memory_bytes is not None:
        from .memory import parse_bytes

        try:
            args.kv_cache_memory_bytes = parse_bytes(args.kv_cache_memory_bytes)
        except ValueError as exc:
            fail(f"--kv-cache-memory-bytes {exc}")
    if args.speculative_config is not None:
        from .speculative import parse_speculative_config

        try:
            args.speculative_config = parse_speculative_config(args.speculative_config)
        except ValueError as exc:
            fail(f"--speculative-config {exc}")
        if args.dp_attention:
            fail("--speculative-config with --dp-attention is not supported yet (each rank would have to verify "
                 "and draft its own sequences); use --ep N without --dp-attention, or one process")


def parse_origins(value: str) -> list[str]:
    """``--allowed-origins``: ``a,b``, ``*`` or a JSON list (vLLM's form) -> a list of origins."""
    value = value.strip()
    if value.startswith("["):
        try:
            origins = json.loads(value)
        except json.JSONDecodeError as exc:
            fail(f"--allowed-origins {value}: not a JSON list ({exc.msg})")
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            fail(f"--allowed-origins {value}: expected a JSON list of strings")
    else:
        origins = [o.strip() for o in value.split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            fail(f"--allowed-origins: {origin!r} is not an origin; expected e.g. http://localhost:3000 or *")
    return origins


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    if args.model is None:
        from model.tiny import ensure_default_model

        return Path(ensure_default_model()), args.served_model_name or DEFAULT_MODEL_NAME
    from model.hub import ModelNotFoundError, resolve_serving_model  # a directory, or a hub id (model/hub.py)

    try:
        return resolve_serving_model(args.model, args.revision, args.download_dir, args.served_model_name)
    except ModelNotFoundError as exc:
        fail(f"--model {exc}")


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"{path / 'config.json'}: cannot read it ({exc})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)

    import hwlayer

    try:  # the backend first: an unavailable one must fail before any weight is read
        plan = hwlayer.plan()
    except hwlayer.BackendError as exc:
        fail(str(exc))

    path, model_name = resolve_checkpoint(args)
    config = read_config(path)
    from .chat import load_chat_template

    try:
        chat_template = load_chat_template(path, args.chat_template)
    except ValueError as exc:
        fail(str(exc))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist_ctx = None
    if args.ep > 1 or world > 1:
        from hwlayer.distributed import DistConfigError

        from . import ep as ep_mod

        try:
            dist_ctx = ep_mod.start(args.ep, plan, config)
        except DistConfigError as exc:
            fail(str(exc))

    from model import load_model
    from model.tokenizer import load_tokenizer

    tokenizer_path = Path(args.tokenizer).expanduser() if args.tokenizer else path
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as exc:
        fail(f"cannot load the tokenizer from {tokenizer_path}: {exc}")
    try:  # ep=1: every expert in this process
        model = load_model(path, backend=plan.backend.name, ep=args.ep, dtype=DTYPES[args.dtype],
                           weight_format=args.weight_format)
    except (OSError, ValueError, KeyError) as exc:
        fail(f"cannot load the model from {path}: {type(exc).__name__}: {exc}")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)  # the generator of requests that bring no seed

    max_pos = int(config.get("max_position_embeddings", 4096))
    max_model_len = args.max_model_len or min(max_pos, 4096)
    if max_model_len > max_pos:
        fail(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings ({max_pos})")
    block_size = args.kv_block_size
    blocks_per_context = -(-max_model_len // block_size)
    from .memory import capacity, size_cache

    try:
        num_blocks, sized_by = size_cache(
            num_kv_blocks=args.num_kv_blocks, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, model=model, block_size=block_size,
            max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens)
    except ValueError as exc:
        fail(str(exc))
    if dist_ctx is not None:  # every rank's cache has rank 0's geometry: the smallest any rank can hold
        from .memory import agree_on_blocks

        num_blocks = agree_on_blocks(num_blocks)
    if num_blocks < blocks_per_context:
        fail(f"the KV cache ({sized_by}) holds {num_blocks} blocks x --kv-block-size {block_size} = "
             f"{num_blocks * block_size} tokens, less than one {max_model_len}-token context; give it at least "
             f"{blocks_per_context} blocks ({blocks_per_context * block_size * model.kv_bytes_per_token()} bytes) "
             "or a smaller --max-model-len")
    cache_tokens, max_concurrency = capacity(num_blocks, block_size, max_model_len)

    from .api import ServerConfig, create_app, read_tokenizer_config
    from .engine import Engine
    from .metrics import ServingMetrics

    num_spec = args.speculative_config.num_speculative_tokens if args.speculative_config else 0
    if num_spec and model.mtp is None:
        fail(f"--speculative-config method mtp: {path} has no MTP layer (num_nextn_predict_layers = 0 or its "
             "weights missing); serve without --speculative-config")
    eos_ids = set(getattr(model.config, "eos_token_ids", None) or [])
    for token in ("<|endoftext|>", "<|user|>", "<|observation|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            eos_ids.add(token_id)

    from model.runner import ModelRunner

    # Every rank's runner is built alike: with expert parallelism rank 0 picks each decode step's graph
    # for all ranks, which replay it at one size (the MoE all-to-alls in their fixed-capacity form).
    # Speculative verify steps under expert parallelism stay eager (serving/ep.py's spec_* steps).
    runner = None
    if dist_ctx is None or not num_spec:
        runner = ModelRunner(model, max_num_seqs=args.max_num_seqs, max_model_len=max_model_len,
                             graphs=None if args.enforce_eager else "auto", num_speculative_tokens=num_spec)
    if dist_ctx is not None and dist_ctx.rank != 0:
        from hwlayer.distributed import RankFailure

        try:
            if args.dp_attention:
                from . import dp

                dp.follower_loop(model, num_blocks, block_size, runner)
            else:
                ep_mod.follower_loop(model, num_blocks, block_size, runner)
        except RankFailure as exc:
            fail(str(exc), status=1)
        return 0
    leader = dist_ctx is not None

    metrics = ServingMetrics()
    if args.dp_attention:  # data-parallel attention: serving/dp.py (rank 0 schedules every rank's sequences)
        from . import dp

        engine = dp.DPEngine(model, tokenizer, world=args.ep, num_blocks=num_blocks, block_size=block_size,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             max_model_len=max_model_len, eos_token_ids=sorted(eos_ids), metrics=metrics,
                             runner=runner)
        dp.register_rank_metrics(metrics, engine)
    else:
        engine = Engine(model, tokenizer, num_blocks=num_blocks, block_size=block_size,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=max_model_len, eos_token_ids=sorted(eos_ids), metrics=metrics,
                        forward=ep_mod.leader_forward(model, runner) if leader else runner,
                        on_idle=ep_mod.keepalive if leader else None,
                        enable_prefix_caching=args.enable_prefix_caching, num_speculative_tokens=num_spec)
    if runner is not None and runner.uses_graphs:
        # At startup, so the first requests do not wait for it; under expert parallelism every rank
        # captures at once (rank 0 tells the followers: each capture runs the all-to-alls).
        (engine.forward if dist_ctx is not None else runner).capture(engine.cache)
    graph_mode = _graph_mode(runner, plan, args.enforce_eager, args.ep)
    backend = plan.backend.name
    metrics.bind(engine, backend=backend, device=str(getattr(model, "device", plan.device)), model_name=model_name,
                 block_size=block_size)
    ranks = args.ep if args.dp_attention else 1
    metrics.bind_capacity(cache_tokens * ranks, max_concurrency * ranks)
    server_config = ServerConfig(model_name=model_name, max_model_len=max_model_len, backend=backend,
                                 device=str(plan.device), api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                                 chat_template=chat_template, allowed_origins=args.allowed_origins,
                                 strict_request_fields=args.strict_request_fields,
                                 enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                                 tokenizer_config=read_tokenizer_config(path))
    app = DrainGate(create_app(engine, tokenizer, server_config, metrics))
    return run_uvicorn(app, engine, args, dist_ctx, (
        f"serving {model_name} ({path}) on backend {backend}, weights {model.weight_format}, "
        f"KV cache {num_blocks} blocks x {block_size} tokens = {cache_tokens} tokens"
        f"{f' per rank, data-parallel attention over {args.ep} ranks' if args.dp_attention else ''} "
        f"({num_blocks * block_size * model.kv_bytes_per_token() / 2**20:.1f} MiB, {sized_by}), "
        f"max concurrency {max_concurrency:.2f}x at max-model-len {max_model_len}"
        f"{' per rank' if args.dp_attention else ''}, "
        f"chat template: {chat_template.source}, decode graphs {graph_mode}, "
        f"{f'speculative decoding mtp x{num_spec}, ' if num_spec else ''}"
        f"at http://{args.host}:{args.port}"))


def _graph_mode(runner: Any, plan: Any, enforce_eager: bool, ep: int = 1) -> str:
    """How decode steps run, for the banner."""
    if runner is not None and runner.uses_graphs:
        sizes = runner.capture_sizes
        ep_note = ", expert parallelism: fixed-capacity all-to-all, prefill exact" if ep > 1 else ""
        return f"on ({plan.backend.device_graph.api}, batch sizes {sizes[0]}..{sizes[-1]}{ep_note})"
    if enforce_eager:
        return "off (--enforce-eager)"
    if runner is None:
        return "off (speculative decoding under expert parallelism)"
    if plan.backend.device_graph is not None:
        return "off (the capture failed: see the warning above)"
    return f"off (backend {plan.backend.name} declares none)"


class DrainGate:
    """ASGI wrapper that counts HTTP requests in flight (a stream counts until its last byte) and, once
    ``draining`` is set (on SIGTERM), answers every new request 503 in the OpenAI error shape."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0  # touched on the event loop only; other threads just read it

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            body = json.dumps({"error": {"message": "the server is shutting down; retry on another instance",
                                         "type": "server_error", "param": None, "code": "shutting_down"}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def wait_idle(self, engine: Any, timeout: float) -> bool:
        """Wait (on a non-event-loop thread) until no request is in flight and the engine has no work."""
        deadline = time.monotonic() + timeout
        while self.in_flight or engine.has_work():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def run_uvicorn(app: Any, engine: Any, args: argparse.Namespace, dist_ctx: Any, banner: str) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # the banner only once the port is bound (a failed bind exits inside startup)
                print(f"{PROG}: {banner}", file=sys.stderr, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # The first SIGTERM/SIGINT drains (uvicorn's own handling would close the listener and cut
            # streams after its grace period, then re-raise the signal: no exit status 0); a second one
            # while draining exits at once, as uvicorn does.
            if not app.draining and not self.should_exit:
                app.draining = True
                threading.Thread(target=drain, name="drain", daemon=True).start()
            elif self.should_exit or app.draining:
                self.should_exit = self.force_exit = True

    def drain() -> None:
        log = logging.getLogger("serving.server")
        log.info("draining: new requests get 503; %d in flight get up to %.0f s (--shutdown-timeout)",
                 app.in_flight, args.shutdown_timeout)
        if not app.wait_idle(engine, args.shutdown_timeout):
            log.warning("--shutdown-timeout %.0f s passed: ending %d requests with finish_reason 'abort'",
                        args.shutdown_timeout, app.in_flight)
            engine.abort_all(f"server shutting down: the request was ended after --shutdown-timeout "
                             f"{args.shutdown_timeout:g} s")
            app.wait_idle(engine, 5.0)  # the final events reach their clients
        server.should_exit = True

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=5))
    exit_status = {"code": 0}

    def on_fatal(message: str) -> None:
        # A rank died: answer 503 for a moment (health and new requests), then exit non-zero.
        report(message)
        exit_status["code"] = 1
        threading.Timer(2.0, lambda: setattr(server, "should_exit", True)).start()

    engine.on_fatal = on_fatal
    server.run()
    if dist_ctx is not None:
        from hwlayer.distributed import RankFailure

        from . import ep as ep_mod

        try:
            ep_mod.shutdown_followers(exit_status["code"] != 0)
        except RankFailure as exc:
            report(str(exc))  # serving ended cleanly; a follower that cannot be told to stop is only noted
    if not server.started and exit_status["code"] == 0:
        return 1  # uvicorn could not bind (it printed why)
    return exit_status["code"]
