"""hwlayer backend plugin for Cambricon MLU: torch_mlu (device ``mlu``, collectives ``cncl``) and
torch_mlu_ops (``tmo``) kernels. Written against the torch_mlu_ops API, not run on hardware."""
