"""Multi-process helpers for expert parallelism: start-up, configuration checks, failure naming.

torch.distributed does the work (process groups, collectives, the rendezvous store); this module
only adds what a serving process needs around it:

* :func:`init_distributed` reads the torchrun environment, checks that the collective backend is
  the one the chosen hwlayer backend runs on (``Backend.dist_backend``: gloo for cpu, nccl for
  cuda, hccl for ascend, ...), binds the local device and creates the process group with a finite
  timeout, so no collective can wait forever.
* :func:`check_ep_config` turns a bad ``--ep`` / world size / expert count into one clear line,
  and is meant to run before any weight is read.
* :func:`rank_failure_guard` wraps a unit of collective work (a forward step). When a collective
  fails (a peer died: gloo reports "connection closed") or times out (a peer hangs), every
  surviving rank asks the other ranks through the rendezvous store which of them are still there
  and raises :class:`RankFailure`, whose one-line message names the rank(s) that exited or hung.

Environment (set by torchrun): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``. Ours:

* ``HWLAYER_DIST_TIMEOUT`` seconds a collective may wait for its peers (default 300).
* ``HWLAYER_DIST_PROBE_TIMEOUT`` seconds the survivors of a failure wait for each other before
  naming the ranks that did not answer (default: the collective timeout). Ranks on this host
  whose process is gone are named at once, without waiting.
* ``HWLAYER_DIST_START_TIMEOUT`` seconds every rank may take to arrive at start-up, before the
  process group exists (default: the larger of 600 and the collective timeout).
* ``HWLAYER_DIST_BACKEND`` a collective backend to insist on (checked, never silently changed).

See docs/distributed.md for launch commands and what happens on failure.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .backend import Backend
from .dispatch import DispatchPlan, select_backend

TIMEOUT_ENV = "HWLAYER_DIST_TIMEOUT"
PROBE_TIMEOUT_ENV = "HWLAYER_DIST_PROBE_TIMEOUT"
START_TIMEOUT_ENV = "HWLAYER_DIST_START_TIMEOUT"
DIST_BACKEND_ENV = "HWLAYER_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_START_TIMEOUT_S = 600.0
_HEALTH_PREFIX = "hwlayer-health/"


class DistConfigError(ValueError):
    """The distributed / expert-parallel configuration cannot work; raised before any weight loads."""


class RankFailure(RuntimeError):
    """A collective failed because one or more ranks exited or hung.

    ``ranks``: the ranks that did not answer the failure probe (empty when it could not be
    determined); ``what``: the unit of work that failed. ``str(err)`` is one line.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = (), what: str = "") -> None:
        super().__init__(message)
        self.ranks = ranks
        self.what = what


@dataclass
class DistContext:
    """What :func:`init_distributed` set up. ``device`` is the tensor device of this rank."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Backend
    dist_backend: str
    timeout_s: float
    probe_timeout_s: float
    store: Any = field(default=None, repr=False)  # client of the rendezvous store, for failure probes
    peers: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (hostname, pid)


_CONTEXT: DistContext | None = None


def current() -> DistContext | None:
    """The context of :func:`init_distributed` in this process, or None before it ran."""
    return _CONTEXT


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DistConfigError(f"{name}={raw!r}: expected a number of seconds > 0") from None
    if value <= 0:
        raise DistConfigError(f"{name}={raw!r}: expected a number of seconds > 0")
    return value


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise DistConfigError(
            f"environment variable {name} is not set: launch the processes with torchrun "
            "(torchrun --nproc-per-node N ...), which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    try:
        return int(raw)
    except ValueError:
        raise DistConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def default_timeout_s() -> float:
    """``HWLAYER_DIST_TIMEOUT`` in seconds, default 300."""
    return _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def check_dist_backend(backend: Backend, dist_backend: str | None) -> str:
    """The collective backend to use with ``backend``: its own ``dist_backend``. A different
    request (argument or ``HWLAYER_DIST_BACKEND``) is a :class:`DistConfigError`, as is one this
    torch build lacks."""
    # Tensors on the CPU travel on gloo whatever the vendor's library: an emulated backend (its
    # device type turned to cpu by the test-only emulators) runs its EP collectives there.
    own = "gloo" if backend.device_type == "cpu" else backend.dist_backend
    wanted = (dist_backend or os.environ.get(DIST_BACKEND_ENV) or own).strip().lower()
    if wanted != own:
        raise DistConfigError(
            f"collective backend {wanted!r} is not supported by hwlayer backend {backend.name!r} "
            f"(device {backend.device_type!r}); it runs its collectives on {own!r}"
        )
    if not dist.is_available() or not dist.is_backend_available(wanted):
        raise DistConfigError(
            f"collective backend {wanted!r} (needed by hwlayer backend {backend.name!r}) is not available "
            f"in this torch build ({torch.__version__}); install the vendor's torch / collective library"
        )
    return wanted


def check_ep_config(ep: int, num_experts: int, world_size: int) -> None:
    """Raise :class:`DistConfigError` (one line) unless ``ep`` ranks can shard ``num_experts``
    routed experts evenly and the job has exactly ``ep`` processes. Call it before loading weights.
    """
    if not isinstance(ep, int) or ep < 1:
        raise DistConfigError(f"--ep must be a positive integer (number of expert-parallel ranks), got {ep!r}")
    if num_experts < 1:
        raise DistConfigError(f"expert parallelism needs a MoE model, but the expert count is {num_experts}")
    if num_experts % ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise DistConfigError(
            f"--ep {ep} does not divide the {num_experts} routed experts (n_routed_experts); "
            f"choose one of {', '.join(map(str, divisors))}"
        )
    if world_size != ep:
        launch = f"torchrun --nproc-per-node {ep} ..." if ep > 1 else "a single process (no torchrun)"
        raise DistConfigError(
            f"--ep {ep} needs exactly {ep} processes but the job has {world_size} (WORLD_SIZE); launch with {launch}"
        )


def local_expert_range(rank: int, ep: int, num_experts: int) -> range:
    """Global ids of the routed experts rank ``rank`` owns: ``[rank*E/ep, (rank+1)*E/ep)``
    (the sharding ``ep_dispatch`` assumes)."""
    per_rank = num_experts // ep
    return range(rank * per_rank, (rank + 1) * per_rank)


def init_distributed(
    backend: str | Backend | DispatchPlan | None = None,
    timeout_s: float | None = None,
    dist_backend: str | None = None,
) -> DistContext:
    """Join the torchrun job: validate, bind the device, create the default process group.

    ``backend``: the hwlayer backend (a name, a :class:`Backend`, a plan, or None for
    ``GLM_BACKEND`` / auto-detection). ``timeout_s``: collective timeout (default
    ``HWLAYER_DIST_TIMEOUT`` or 300 s). ``dist_backend``: a collective backend to insist on;
    it must equal the hwlayer backend's own. Every problem is a :class:`DistConfigError` raised
    before the process group (and before any weight) is touched. Idempotent within a process; a
    default group created earlier by the caller is kept as it is (with its own timeout).
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if isinstance(backend, DispatchPlan):
        chosen = backend.backend
    elif isinstance(backend, Backend):
        chosen = backend
    else:
        chosen = select_backend(backend)
    collective = check_dist_backend(chosen, dist_backend)
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not os.environ.get("MASTER_ADDR"):
        raise DistConfigError("environment variable MASTER_ADDR is not set: launch the processes with torchrun")
    _env_int("MASTER_PORT")
    if not 0 <= rank < world:
        raise DistConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    timeout = float(timeout_s) if timeout_s is not None else default_timeout_s()
    probe_timeout = _env_seconds(PROBE_TIMEOUT_ENV, timeout)
    start_timeout = _env_seconds(START_TIMEOUT_ENV, max(timeout, DEFAULT_START_TIMEOUT_S))

    if chosen.device_type == "cpu":
        device = torch.device("cpu")
    else:
        count = _device_count(chosen.device_type)
        if local_rank >= count:
            raise DistConfigError(
                f"LOCAL_RANK={local_rank} but only {count} {chosen.device_type} device(s) are visible; "
                f"run at most {count} processes per node"
            )
        device = torch.device(chosen.device_type, local_rank)
        _set_device(chosen.device_type, local_rank)

    # Arrive first, under the generous start-up timeout: ranks start seconds apart (imports,
    # device init), which must not count against the collective timeout, possibly a short one.
    if dist.is_initialized():  # someone made the group already: share its store (rank 0 may host it)
        store = dist.distributed_c10d._get_default_store()
    else:
        store = _rendezvous_store(rank, start_timeout)
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    health = dist.PrefixStore(_HEALTH_PREFIX + attempt, store)
    peers = _exchange_peers(health, rank, world, start_timeout)
    if not dist.is_initialized():
        dist.init_process_group(
            collective, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
    _CONTEXT = DistContext(rank, world, local_rank, device, chosen, collective, timeout, probe_timeout, health, peers)
    # torch 2.13 + gloo can abort at interpreter exit ("terminate called without an active
    # exception") when the process group is still alive: always tear it down on the way out.
    atexit.register(shutdown)
    return _CONTEXT


def _device_count(device_type: str) -> int:
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if callable(count) else 0


def _set_device(device_type: str, index: int) -> None:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available() and accel.current_accelerator().type == device_type:
        accel.set_device_index(index)
    else:  # torch.cuda / torch.npu / torch.mlu ... all expose set_device
        getattr(torch, device_type).set_device(index)


def _rendezvous_store(rank: int, timeout: float) -> Any:
    """The job's key-value store at MASTER_ADDR:MASTER_PORT. Under torchrun the launcher's agent
    hosts it (so it outlives any worker); otherwise rank 0 hosts it, as init_process_group would."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    is_master = rank == 0 and not agent_hosts_it
    return dist.TCPStore(host, port, is_master=is_master, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)


def _exchange_peers(store: Any, rank: int, world: int, timeout: float) -> dict[int, tuple[str, int]]:
    """Every rank's (hostname, pid), so a failure probe can tell 'exited' from 'hung' on this host."""
    store.set(f"peer/{rank}", f"{socket.gethostname()} {os.getpid()}")
    keys = [f"peer/{r}" for r in range(world)]
    store.wait(keys, datetime.timedelta(seconds=timeout))
    peers = {}
    for r, key in enumerate(keys):
        host, pid = store.get(key).decode().rsplit(" ", 1)
        peers[r] = (host, int(pid))
    return peers


def shutdown() -> None:
    """Destroy the process group (if any) and forget the context. Safe to call twice."""
    global _CONTEXT
    _CONTEXT = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Failure naming

# Fragments of the messages gloo / NCCL / HCCL / the store raise when a peer dies or hangs.
_COLLECTIVE_MARKERS = (
    "connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout",
    "pair closure", "gloo", "nccl", "hccl", "processgroup", "monitoredbarrier", "socket",
)


def is_collective_failure(exc: BaseException) -> bool:
    """True for errors raised by a failed or timed-out collective (not for model bugs)."""
    if isinstance(exc, RankFailure):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _COLLECTIVE_MARKERS)


def _process_state(pid: int) -> str:
    """'running', 'exited' or 'unknown' for a pid on this host (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return "exited" if state in ("Z", "X") else "running"
    except FileNotFoundError:
        return "exited"
    except OSError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__  # gloo puts the cause on the last line
    return text if len(text) <= 200 else text[:197] + "..."


def diagnose_failure(what: str, exc: BaseException, ctx: DistContext | None = None) -> RankFailure:
    """Find out which ranks are gone after ``exc`` broke a collective, and say so in one line.

    Each survivor writes ``failed/<rank>`` to the rendezvous store, then waits (at most the probe
    timeout) until every other rank has either written too or is seen to have exited on this host.
    Ranks that never answer exited (on another host) or hung.
    """
    ctx = ctx or _CONTEXT
    cause = f"{type(exc).__name__}: {_first_line(exc)}"
    if ctx is None or ctx.store is None:
        return RankFailure(f"collective failed during {what} (no distributed context to probe): {cause}", (), what)
    me = ctx.rank
    hostname = socket.gethostname()
    try:
        ctx.store.set(f"failed/{me}", what)
    except Exception as store_exc:
        host = os.environ.get("MASTER_ADDR", "?")
        return RankFailure(
            f"rank {me}: collective failed during {what} and the rendezvous store at {host}:"
            f"{os.environ.get('MASTER_PORT', '?')} is unreachable ({type(store_exc).__name__}); rank 0 hosts it "
            f"unless torchrun does, so rank 0 most likely exited [{cause}]",
            (0,),
            what,
        )
    deadline = time.monotonic() + ctx.probe_timeout_s
    pending = {r for r in range(ctx.world_size) if r != me}
    exited: set[int] = set()
    while pending and time.monotonic() < deadline:
        for r in sorted(pending):
            try:
                answered = ctx.store.check([f"failed/{r}"])
            except Exception:
                answered = False
            host, pid = ctx.peers.get(r, ("", -1))
            if answered:
                pending.discard(r)
            elif host == hostname and _process_state(pid) == "exited":
                pending.discard(r)
                exited.add(r)
        if pending:
            time.sleep(0.05)
    parts = []
    for r in sorted(exited):
        parts.append(f"rank {r} exited (pid {ctx.peers[r][1]})")
    for r in sorted(pending):
        host, pid = ctx.peers.get(r, ("?", -1))
        if host == hostname and _process_state(pid) == "running":
            parts.append(f"rank {r} hung (pid {pid} alive, no answer within {ctx.probe_timeout_s:g} s)")
        else:
            parts.append(f"rank {r} on {host} exited or hung (no answer within {ctx.probe_timeout_s:g} s)")
    failed = tuple(sorted(exited | pending))
    if parts:
        summary = "; ".join(parts)
    else:
        summary = "every rank answered the probe, so no rank is known to have died"
    return RankFailure(f"rank {me}: {what} failed: {summary} [{cause}]", failed, what)


@contextlib.contextmanager
def rank_failure_guard(what: str = "collective step") -> Iterator[None]:
    """Run a block of collective work; turn a collective failure into :class:`RankFailure`.

    Other exceptions (model bugs, bad input) pass through unchanged. Wrap whole steps, not single
    collectives: the probe only runs on the failure path, so the guard costs nothing otherwise::

        with rank_failure_guard(f"decode step {i}"):
            logits = model.forward_batch(batch, cache)
    """
    try:
        yield
    except Exception as exc:
        if not is_collective_failure(exc):
            raise
        raise diagnose_failure(what, exc) from exc


def barrier(what: str = "barrier", timeout_s: float | None = None) -> None:
    """A barrier that names missing ranks: ``monitored_barrier`` on gloo (rank 0 learns which ranks
    did not arrive within ``timeout_s``), then the usual probe so every rank raises the same
    :class:`RankFailure`. Falls back to ``dist.barrier`` on other collective backends."""
    ctx = _CONTEXT
    timeout = timeout_s if timeout_s is not None else (ctx.timeout_s if ctx else default_timeout_s())
    with rank_failure_guard(what):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
        else:
            dist.barrier()
