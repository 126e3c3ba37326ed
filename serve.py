"""Serve a GLM-5 checkpoint over an OpenAI-compatible HTTP API.

    python serve.py                                  # the embedded glm5-tiny-random model, auto backend
    GLM_BACKEND=cuda python serve.py /path/to/GLM-5 --port 8000
    torchrun --nproc-per-node 2 serve.py --ep 2      # expert parallel: rank 0 serves HTTP

Run ``python serve.py --help`` for the flags; the implementation is in :mod:`serving.server`.
"""

import sys

from serving.server import main

if __name__ == "__main__":
    sys.exit(main())
