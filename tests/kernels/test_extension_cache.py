"""A cached C++ extension library is verified against the size and SHA-256 recorded at its
build before it is loaded (a truncated one killed the process with Bus error)."""

from __future__ import annotations

import warnings

import pytest

# ---- the cached C++ extension ----------------------------------------------------------------

def test_a_truncated_cached_extension_is_removed_before_loading(tmp_path):
    from mabn_d2.kernels.cpp import _write_fingerprint, verify_cached_build

    library = tmp_path / "mabn_d2_cpp_x.so"
    library.write_bytes(b"\x7fELF" + bytes(4096))
    _write_fingerprint(library)
    assert verify_cached_build(library)
    library.write_bytes(library.read_bytes()[:100])  # a copy cut short
    with pytest.warns(RuntimeWarning, match="truncated or damaged"):
        assert not verify_cached_build(library)
    assert not library.exists()
    library.write_bytes(b"\x7fELF")  # no record: not trusted either
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert not verify_cached_build(library)
