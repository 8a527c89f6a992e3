"""fitting.npz.read_npz: the arrays np.savez wrote, and nothing a lying file asks for."""
from __future__ import annotations

import numpy as np
import pytest

from fitting.errors import BadInput
from fitting.npz import read_npy, read_npz
from tests.test_upfront_checks import npy_declaring, npz_with, undecodable_member


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_reads_what_numpy_wrote(tmp_path, save):
    arrays = {"a": np.arange(12.0).reshape(3, 4), "f": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
              "s": np.array(["x", "yz"]), "scalar": np.array(3.5), "empty": np.zeros((0, 2), np.float32),
              "b": np.array([True, False])}
    save(tmp_path / "x.npz", **arrays)
    read = read_npz(tmp_path / "x.npz")
    assert set(read) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(read[key], value)
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
    assert set(read_npz(tmp_path / "x.npz", keys=["a", "missing"])) == {"a"}


def test_refuses_a_declared_size_it_cannot_hold(tmp_path):
    path = npz_with(tmp_path / "huge.npz", {"a.npy": npy_declaring((10**12,), "<U64")})
    with pytest.raises(BadInput, match="'a' declares"):
        read_npz(path)
    path = npz_with(tmp_path / "short.npz", {"a.npy": npy_declaring((4,), "<f8", np.zeros(3).tobytes())})
    with pytest.raises(BadInput, match="holds 24 bytes"):
        read_npz(path)


def test_refuses_more_than_the_limit(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(1000))
    with pytest.raises(BadInput, match="more than the 4000 allowed"):
        read_npz(tmp_path / "x.npz", max_bytes=4000)
    assert read_npz(tmp_path / "x.npz", max_bytes=8000)["a"].shape == (1000,)


def test_refuses_objects_and_garbage(tmp_path):
    np.savez(tmp_path / "o.npz", a=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(BadInput, match="Python objects"):
        read_npz(tmp_path / "o.npz")
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(BadInput, match="not a readable"):
        read_npz(tmp_path / "g.npz", what="body model")
    with pytest.raises(BadInput, match="body model not found"):
        read_npz(tmp_path / "nothing.npz", what="body model")


def test_members_not_asked_for_are_never_decompressed(tmp_path):
    path = npz_with(tmp_path / "x.npz", {"a.npy": npy_declaring((2,), "<f8", np.ones(2).tobytes()),
                                         "junk.npy": npy_declaring((512,), "<f8", np.zeros(512).tobytes())})
    undecodable_member(path, "junk.npy")
    np.testing.assert_array_equal(read_npz(path, keys=["a"])["a"], np.ones(2))
    with pytest.raises(BadInput, match="not a readable"):
        read_npz(path)


def test_a_single_npy_is_read_with_the_same_checks(tmp_path):
    np.save(tmp_path / "r.npy", np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(read_npy(tmp_path / "r.npy"), np.arange(6.0).reshape(2, 3))
    (tmp_path / "huge.npy").write_bytes(npy_declaring((10**12,), "<f8"))
    with pytest.raises(BadInput, match="huge.npy declares"):
        read_npy(tmp_path / "huge.npy")
    np.save(tmp_path / "o.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInput, match="Python objects"):
        read_npy(tmp_path / "o.npy")
    with pytest.raises(BadInput, match="J_regressor_h36m not found"):
        read_npy(tmp_path / "nothing.npy", what="J_regressor_h36m")
