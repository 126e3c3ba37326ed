"""``make test-clients``: start serve.py (this venv) on the tiny model and run tests/clients/check_clients.py with
``--python`` (a venv holding langchain-openai and litellm) against it; exit status is the checks'."""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server_process import ServerProcess

MODEL = "glm5-tiny-clients"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", required=True, help="the clients venv's python")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        serve_args = ["--max-model-len", "2048", "--num-kv-blocks", "256", "--served-model-name", MODEL]
        with ServerProcess(serve_args, env={"HWLAYER_CACHE": cache, "GLM_BACKEND": "cpu"}) as server:
            check = Path(__file__).with_name("check_clients.py")
            return subprocess.call([args.python, str(check), server.url, MODEL])


if __name__ == "__main__":
    sys.exit(main())
