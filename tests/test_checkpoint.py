import json

import pytest
import torch

from onestep.checkpoint import CheckpointError, load_model, read_metadata, save_model


def test_round_trip_and_provenance(tmp_path, tiny_denoiser):
    path = tmp_path / "m.safetensors"
    side = save_model(path, tiny_denoiser, tiny_denoiser.spec, extra={"note": "x"})
    assert side["sha256"] and side["versions"]["torch"] and side["model"]["kind"] == "edm-denoiser"
    model, meta = load_model(path)
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([0, 9])
    torch.testing.assert_close(model(x, 1.0, y), tiny_denoiser(x, 1.0, y))
    assert meta["note"] == "x"
    # header metadata alone is enough to rebuild when the sidecar is lost
    (tmp_path / "m.json").unlink()
    assert read_metadata(path)["model"]["kind"] == "edm-denoiser"


def test_fp16_shipping(tmp_path, tiny_denoiser):
    path = tmp_path / "h.safetensors"
    save_model(path, tiny_denoiser, tiny_denoiser.spec, dtype=torch.float16)
    model, _ = load_model(path)
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([0, 9])
    assert (model(x, 1.0, y) - tiny_denoiser(x, 1.0, y)).abs().max() < 5e-2


def test_corrupt_truncated_missing(tmp_path, tiny_denoiser):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_denoiser, tiny_denoiser.spec)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "p.safetensors")


def test_unknown_kind(tmp_path, tiny_denoiser):
    path = tmp_path / "m.safetensors"
    spec = dict(tiny_denoiser.spec, kind="mystery")
    save_model(path, tiny_denoiser, spec)
    with pytest.raises(CheckpointError, match="unknown model kind"):
        load_model(path)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["model"]["kind"] == "mystery"
