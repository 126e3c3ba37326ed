"""hwlayer backend plugin for Moore Threads GPUs: torch_musa (device ``musa``, collectives ``mccl``)
and the mate kernel library. Written against the mate API, not run on hardware."""
