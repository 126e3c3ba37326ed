"""Hub ids (issue 21): ``load_model``, ``python -m model`` and ``serve.py`` take a Hugging Face id
resolved through a locally populated hub cache (no network: HF_HUB_OFFLINE=1), a revision, a
ModelScope id when HWLAYER_USE_MODELSCOPE says so, and fail in one line naming the id and how to
fetch it when nothing is cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from model import load_model
from model.hub import MODELSCOPE_ENV, ModelNotFoundError, resolve_model, resolve_serving_model
from model.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "zai-org/GLM-5-tiny"


def _populate_hub_cache(cache: Path, repo_id: str, src: Path, ref: str, commit: str) -> Path:
    """The Hugging Face hub cache layout huggingface_hub itself writes: blobs, refs/<ref> -> commit,
    snapshots/<commit>/<file> (symlinks to the blobs)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    src = make_tiny_checkpoint(root / "src")
    other = make_tiny_checkpoint(root / "src-v1", seed=1)
    cache = root / "cache"
    _populate_hub_cache(cache, REPO_ID, src, "main", "a" * 40)
    _populate_hub_cache(cache, REPO_ID, other, "v1", "b" * 40)
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(MODELSCOPE_ENV, raising=False)


def test_hf_id_resolves_from_the_cache(hub, offline):
    assert resolve_model(REPO_ID, download_dir=str(hub)).name == "a" * 40
    assert resolve_model(REPO_ID, revision="v1", download_dir=str(hub)).name == "b" * 40
    m = load_model(REPO_ID, backend="cpu", download_dir=str(hub))
    v1 = load_model(REPO_ID, backend="cpu", download_dir=str(hub), revision="v1")
    assert m.path.name == "a" * 40 and v1.path.name == "b" * 40
    assert not bool((m.layers[0].attn.q_a_proj == v1.layers[0].attn.q_a_proj).all())  # another seed: other weights
    path, name = resolve_serving_model(REPO_ID, None, str(hub), None)
    assert name == REPO_ID and path.name == "a" * 40  # served model name defaults to the id


def test_local_directory_wins_and_keeps_its_name(tmp_path, offline, monkeypatch):
    ck = make_tiny_checkpoint(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == Path("org/name")  # an existing path is never a hub id
    assert resolve_serving_model(str(ck), None, None, None)[1] == "name"
    with pytest.raises(ModelNotFoundError, match=r"--revision v1: only for a hub id"):
        resolve_model(str(ck), revision="v1")


def test_offline_without_a_cached_copy_is_one_line(hub, offline):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("zai-org/GLM-5-FP8", download_dir=str(hub))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("zai-org/GLM-5-FP8: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in msg and f"huggingface-cli download zai-org/GLM-5-FP8 --cache-dir {hub}" in msg
    with pytest.raises(ModelNotFoundError, match=r"^/no/such/dir: no such directory, and not a hub id"):
        resolve_model("/no/such/dir")


def test_modelscope_id_when_the_env_says_so(tmp_path, monkeypatch):
    ck = make_tiny_checkpoint(tmp_path / "ms")
    calls = []

    def snapshot_download(model_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((model_id, revision, cache_dir))
        return str(ck)

    monkeypatch.setenv(MODELSCOPE_ENV, "1")
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert resolve_model("ZhipuAI/GLM-5", revision="master", download_dir="/c") == ck
    assert calls == [("ZhipuAI/GLM-5", "master", "/c")]
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed
    with pytest.raises(ModelNotFoundError, match=rf"^ZhipuAI/GLM-5: {MODELSCOPE_ENV}=1 but the modelscope package "
                                                 r"is not installed"):
        resolve_model("ZhipuAI/GLM-5")


def _run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLM_", "HWLAYER_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_clis_take_hub_ids(hub):
    r = _run(["-m", "model", "--model", REPO_ID, "--download-dir", str(hub), "--prompt", "Hello",
              "--max-new-tokens", "2", "--backend", "cpu"], hub)
    assert r.returncode == 0, r.stderr
    r = _run(["-m", "model", "--model", "zai-org/missing", "--download-dir", str(hub), "--prompt", "hi"], hub)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "zai-org/missing" in r.stderr
    r = _run(["serve.py", "zai-org/missing", "--download-dir", str(hub), "--port", "0"], hub)
    assert r.returncode == 2 and "zai-org/missing: not in the Hugging Face cache" in r.stderr
