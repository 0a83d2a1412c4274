"""The vendored upstream outputs are exactly what their provenance notes say (tests/data/oracle/README.md,
tests/data/upstream/README.md)."""

from __future__ import annotations

import hashlib

import pytest

from .conftest import UNSEEN_ORACLES, VENDORED_ORACLES


@pytest.mark.parametrize("name", sorted(VENDORED_ORACLES) + sorted(UNSEEN_ORACLES))
def test_vendored_oracle_checksums(name):
    folder = {**VENDORED_ORACLES, **UNSEEN_ORACLES}[name]
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    )
    assert on_disk == sorted(listed), "files added to or removed from the vendored oracle"
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
