import json

import pytest
import torch
from safetensors import safe_open

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.artifact import HessianArtifact


def _artifact(m=9, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HessianArtifact(
        A=torch.randn(m, n, generator=g),
        block_names=[f"model.layers.{i}" for i in range(n)],
        block_kinds=["attention"] * n,
        block_num_parameters=[100] * n,
        metadata={"model": "tiny", "seq_len": "16", "gate": "branch"},
        losses=torch.rand(m, generator=g),
    )


def test_h_is_a_transpose_a_over_m():
    art = _artifact()
    expected = art.A.double().T @ art.A.double() / art.num_samples
    torch.testing.assert_close(art.H, expected)
    assert art.H.dtype == torch.float64
    q = art.energy_matrix(beta=0.5)
    torch.testing.assert_close(q - art.H, torch.diag(-art.g))


def test_round_trip_without_pickle(tmp_path):
    art = _artifact()
    path = tmp_path / "h.safetensors"
    art.save(path)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {"A", "H", "g", "losses"}
        meta = handle.metadata()
        assert handle.get_tensor("A").dtype == torch.float32 and handle.get_tensor("H").dtype == torch.float64
    assert json.loads(meta["block_names"])[2] == "model.layers.2"
    assert meta["num_samples"] == "9" and meta["model"] == "tiny"
    back = HessianArtifact.load(path)
    assert torch.equal(back.A, art.A) and back.block_names == art.block_names
    assert back.metadata["gate"] == "branch" and back.block_num_parameters == [100] * 5
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_refuses_other_files_and_models(tmp_path):
    with pytest.raises(BlockCBOError, match="calibrate"):
        HessianArtifact.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(BlockCBOError, match="safetensors"):
        HessianArtifact.load(junk)
    with pytest.raises(BlockCBOError, match="do not match"):
        _artifact().check_model("other", ["model.layers.0"])


def test_refuses_non_finite_gradients():
    A = torch.ones(3, 2)
    A[1, 1] = float("inf")
    with pytest.raises(BlockCBOError, match="NaN or inf"):
        HessianArtifact(A=A, block_names=["a", "b"], block_kinds=["x", "x"])
