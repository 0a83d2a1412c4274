"""The vendored oracle is exactly what its provenance note says (tests/data/oracle/README.md)."""

from __future__ import annotations

import hashlib

from .conftest import VENDORED_ORACLE_DIR


def test_vendored_oracle_checksums():
    listed = {}
    for line in (VENDORED_ORACLE_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = sorted(
        p.relative_to(VENDORED_ORACLE_DIR).as_posix()
        for p in VENDORED_ORACLE_DIR.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS"
    )
    assert on_disk == sorted(listed), "files added to or removed from the vendored oracle"
    for name, digest in listed.items():
        assert hashlib.sha256((VENDORED_ORACLE_DIR / name).read_bytes()).hexdigest() == digest, name
