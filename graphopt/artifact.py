"""The artifact directory: manifest schema, checksums, atomic writes.

An artifact is written into a temporary sibling directory and renamed into place only once every
file and the manifest are complete, so a failure or Ctrl-C never leaves a half-written artifact
(and never destroys the previous one). ``manifest.json`` records the sha256 and size of every
other file; loading checks all of them before anything is deserialized.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from graphopt.errors import ArtifactError, ChecksumError

MANIFEST = "manifest.json"
FORMAT = "graphopt-artifact"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("format", "schema_version", "graphopt_version", "target", "payload", "inputs", "outputs",
                 "out_structure", "files")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ArtifactWriter:
    """``with ArtifactWriter(out) as w:`` write files under ``w.dir``, then ``w.commit(manifest)``.

    Leaving the block without ``commit`` (an exception, Ctrl-C) removes the temporary directory
    and leaves ``out`` as it was.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ArtifactError(f"--out {self.out} exists and is not a directory; choose another path")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST).is_file():
            raise ArtifactError(f"--out {self.out} is a non-empty directory that is not a graphopt artifact; "
                                "refusing to replace it: choose an empty or new directory")
        self.dir = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.committed = False

    def __enter__(self) -> ArtifactWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def file_entries(self) -> dict[str, dict[str, Any]]:
        entries = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.dir).as_posix()
                entries[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        return entries

    def commit(self, manifest: dict[str, Any]) -> Path:
        manifest = dict(manifest)
        manifest["files"] = self.file_entries()
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, self.dir / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.out, old)
        try:
            os.rename(self.dir, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (structure and schema version; not checksums)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"artifact directory {p} does not exist; build one with `graphopt compile`")
    if not p.is_dir():
        raise ArtifactError(f"{p} is not a directory; pass the artifact directory that `graphopt compile --out` wrote")
    mf = p / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{p} has no {MANIFEST}: not a graphopt artifact (or an interrupted build); "
                            "rebuild it with `graphopt compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf} is not valid JSON ({e}); the artifact is corrupted, rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf} is not a graphopt manifest (format != {FORMAT!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArtifactError(f"{mf} has schema version {version!r}, newer than this graphopt supports "
                            f"({SCHEMA_VERSION}); upgrade graphopt or rebuild the artifact")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{mf} lacks {', '.join(missing)}; the artifact is corrupted, rebuild it")
    return manifest


def verify_checksums(path: str | Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with the recorded size and sha256."""
    p = Path(path)
    for rel, entry in manifest["files"].items():
        f = (p / rel).resolve()
        if p.resolve() not in f.parents:
            raise ArtifactError(f"manifest of {p} lists {rel!r}, outside the artifact directory; refusing to load")
        if not f.is_file():
            raise ChecksumError(f"payload file {rel} listed in {p / MANIFEST} is missing; rebuild the artifact")
        size = f.stat().st_size
        if size != entry.get("size"):
            raise ChecksumError(f"payload file {p / rel} has {size} bytes, the manifest says {entry.get('size')}: "
                                "it was modified or truncated; rebuild the artifact with `graphopt compile`")
        digest = sha256_file(f)
        if digest != entry.get("sha256"):
            raise ChecksumError(f"checksum mismatch for payload file {p / rel}: sha256 {digest[:16]}… but the manifest "
                                f"says {str(entry.get('sha256'))[:16]}…: it was modified or corrupted; rebuild the "
                                "artifact with `graphopt compile`")
