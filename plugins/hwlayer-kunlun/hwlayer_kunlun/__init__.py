"""hwlayer backend plugin for Kunlunxin XPUs (torch device ``cuda``, collectives ``nccl`` as vLLM-Kunlun
declares them) and the ``kunlun_ops`` kernel library. Written against baidu/vLLM-Kunlun 09869ee, emulated
in CI, not run on Kunlunxin hardware."""
