"""Model ids: a checkpoint directory, a Hugging Face hub id, or a ModelScope id.

    resolve_model("/data/GLM-5")                 # a directory: used as is
    resolve_model("zai-org/GLM-5-FP8")           # the Hugging Face hub cache (HF_HOME / --download-dir),
                                                 # downloaded when online; HF_HUB_OFFLINE=1: cache only
    HWLAYER_USE_MODELSCOPE=1 resolve_model("ZhipuAI/GLM-5")   # ModelScope (vLLM: VLLM_USE_MODELSCOPE)

As vLLM / SGLang / transformers resolve ``MODEL``: ``huggingface_hub.snapshot_download`` (revision,
cache dir), ``modelscope.snapshot_download`` when :data:`MODELSCOPE_ENV` is set. Both libraries are
imported only for an id, never for a directory. A failure is one line naming the id and how to
fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODELSCOPE_ENV = "HWLAYER_USE_MODELSCOPE"
# Checkpoint files a serving process needs (weights, configs, tokenizer, chat template, msmodelslim
# description); not the repository's README, images or pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model"]
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model argument that is neither a checkpoint directory nor a resolvable hub id (one line)."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not an existing path (vLLM's rule: a local directory wins)."""
    return bool(_ID.match(model)) and not Path(model).expanduser().exists()


def resolve_model(model: str | os.PathLike, revision: str | None = None, download_dir: str | None = None) -> Path:
    """The local checkpoint directory for ``model`` (see the module docstring)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists() or not is_hub_id(text):
        if revision is not None:
            raise ModelNotFoundError(f"--revision {revision}: only for a hub id, and {text} is a local path")
        if not path.is_dir():
            raise ModelNotFoundError(f"{text}: no such directory, and not a hub id (expected a checkpoint directory "
                                     f"with config.json, or a Hugging Face / ModelScope id like zai-org/GLM-5)")
        return path
    if _truthy(MODELSCOPE_ENV):
        return _modelscope(text, revision, download_dir)
    return _huggingface(text, revision, download_dir)


def _huggingface(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    offline = _truthy("HF_HUB_OFFLINE")
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(f"{repo_id}: a Hugging Face id, but huggingface_hub is not installed "
                                 f"(pip install huggingface_hub), or pass a local directory") from None
    try:
        local = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                                  allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors, ...
        cache = download_dir or huggingface_hub.constants.HF_HUB_CACHE
        rev = f" --revision {revision}" if revision else ""
        how = (f"fetch it with `huggingface-cli download {repo_id}{rev}"
               + (f" --cache-dir {download_dir}`" if download_dir else "`"))
        if offline:
            raise ModelNotFoundError(f"{repo_id}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1; "
                                     f"{how} (online), or unset HF_HUB_OFFLINE") from None
        raise ModelNotFoundError(f"{repo_id}: cannot download from the Hugging Face hub into {cache} "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                 f"{how}, or set {MODELSCOPE_ENV}=1 for a ModelScope id") from None
    return Path(local)


def _modelscope(model_id: str, revision: str | None, download_dir: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"{model_id}: {MODELSCOPE_ENV}=1 but the modelscope package is not installed "
                                 f"(pip install modelscope), or unset {MODELSCOPE_ENV} for a Hugging Face id") from None
    try:
        local = snapshot_download(model_id, revision=revision, cache_dir=download_dir,
                                  allow_patterns=ALLOW_PATTERNS)
    except Exception as exc:
        raise ModelNotFoundError(f"{model_id}: cannot fetch from ModelScope ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); fetch it with `modelscope "
                                 f"download --model {model_id}` or pass a local directory") from None
    return Path(local)


def resolve_serving_model(model: str, revision: str | None, download_dir: str | None,
                          served_model_name: str | None) -> tuple[Path, str]:
    """serve.py's MODEL: (checkpoint directory, served model name: ``served_model_name``, else the
    hub id as given, else the directory's name)."""
    path = resolve_model(model, revision, download_dir)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{model}: no config.json in {path}; expected a Hugging Face checkpoint directory")
    return path, served_model_name or (model if is_hub_id(model) else path.resolve().name)
