"""The bundled model cache: built once, verified after, rebuilt when broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve import bundled_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A cache dir, with the slow GGUF conversion replaced by a small fake writer."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bundled_model, "gguf_path", lambda: tmp_path / "fake.gguf")
    builds: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        builds.append(out)
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (out / "model.safetensors").write_bytes(b"\0" * 4096)
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(bundled_model, "convert", fake_convert)
    return builds


def test_second_prepare_does_nothing(cache: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    first = bundled_model.prepare()
    second = bundled_model.prepare()
    assert first == second and len(cache) == 1
    assert "nothing to do" in capsys.readouterr().err
    assert bundled_model.verify(first) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_cache_is_detected_and_rebuilt(cache: list[Path], damage: str) -> None:
    directory = bundled_model.prepare()
    weights = directory / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(b"\0" * 100)
    elif damage == "flip":
        weights.write_bytes(b"\1" + b"\0" * 4095)
    elif damage == "delete":
        weights.unlink()
    else:
        (directory / bundled_model.MANIFEST).unlink()
    assert bundled_model.verify(directory) is not None
    assert bundled_model.prepare() == directory
    assert len(cache) == 2 and bundled_model.verify(directory) is None


def test_interrupted_build_leaves_no_half_directory(
    cache: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled_model, "convert", broken)
    with pytest.raises(KeyboardInterrupt):
        bundled_model.prepare()
    target = bundled_model.model_dir()
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_resolve_keeps_user_models(cache: list[Path]) -> None:
    assert bundled_model.resolve("/some/model") == ("/some/model", None)
    path, name = bundled_model.resolve(None)
    assert name == bundled_model.MODEL_NAME and Path(path).is_dir()
