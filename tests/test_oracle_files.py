"""The vendored oracle is exactly what its provenance note says (tests/data/oracle/README.md)."""

from __future__ import annotations

import hashlib

import pytest

from .conftest import VENDORED_ORACLES


@pytest.mark.parametrize("name", sorted(VENDORED_ORACLES))
def test_vendored_oracle_checksums(name):
    folder = VENDORED_ORACLES[name]
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS"
    )
    assert on_disk == sorted(listed), "files added to or removed from the vendored oracle"
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
