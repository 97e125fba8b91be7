"""The artifact directory: layout, manifest, and validation on load.

    OUT/
      manifest.json      format and kiln versions, target, dtype, source hashes, pipeline, and
                         every other file with its size and content hash (see HASH_ALGORITHM)
      graph.json         the lowered IR
      plan.json          the execution plan (runtime/plan.py)
      kernels/           compiled kernels of the target (none on reference)
      tuning.json        kernel configs chosen for the target (optional)
      weights/*.safetensors
      tokenizer/         the checkpoint's tokenizer files
      config.json, generation_config.json   copied from the checkpoint

The manifest is the only index: the runtime reads exactly the files it lists, every listed path
must stay inside the directory (no `..`, absolute paths or symlinks out), and a file under
weights/ that it does not list is an error. Loading checks each file's hash in the same pass
that reads it (`Artifact.read_bytes`; weight files are mapped and the hash is what pages them in,
`Artifact.map_all`); `verify=False` skips the hashing, not the checks above.

A file's hash is an xxh3-128 of the xxh3-128 digests of its 64 MiB chunks, so the chunks of all
weight files are hashed on every core at once, evenly: a whole-file hash would leave a core idle
while the largest file finishes (measured on 1.35 GB over 2 cores: 90 ms -> 66 ms).

    file:    | chunk 0 (64 MiB) | chunk 1 | ... | chunk k (the rest) |
    hash  =  xxh3_128(d0 + d1 + ... + dk),   di = xxh3_128(chunk i)   (16 bytes each)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from kiln.errors import ArtifactError

FORMAT_VERSION = 4
"""4: content hashes over 64 MiB chunks (`hash_algorithm`); 3 hashed whole files, 2 had sha256:
both are refused."""
HASH_ALGORITHM = "xxh3_128-of-64MiB-chunks"
HASH_CHUNK = 1 << 26
"""Bytes per hashed chunk (the unit of parallel verification)."""
MANIFEST = "manifest.json"
GRAPH = "graph.json"
PLAN = "plan.json"
TUNING = "tuning.json"
KERNELS_DIR = "kernels"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
CHUNK = 1 << 24
"""Bytes read (and hashed) at a time: small enough to hash while still in cache."""


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (the checkpoint's source hashes in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ChunkedHash:
    """The manifest's content hash, fed in order: xxh3-128 over each HASH_CHUNK's xxh3-128."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self._chunk = xxhash.xxh3_128()
        self._filled = 0

    def update(self, data: memoryview | bytes) -> None:
        data = memoryview(data)
        while len(data):
            n = min(len(data), HASH_CHUNK - self._filled)
            self._chunk.update(data[:n])
            self._filled += n
            data = data[n:]
            if self._filled == HASH_CHUNK:
                self.digests.append(self._chunk.digest())
                self._chunk, self._filled = xxhash.xxh3_128(), 0

    def hexdigest(self) -> str:
        tail = [self._chunk.digest()] if self._filled or not self.digests else []
        return combine_digests(self.digests + tail)


def chunk_digest(view: memoryview) -> bytes:
    """xxh3-128 of one chunk, fed in CHUNK pieces (update releases the GIL on each)."""
    h = xxhash.xxh3_128()
    for pos in range(0, len(view), CHUNK):
        h.update(view[pos : pos + CHUNK])
    return h.digest()


def combine_digests(digests: list[bytes]) -> str:
    return xxhash.xxh3_128(b"".join(digests)).hexdigest()


def hash_file(path: str | Path) -> str:
    """The hash the manifest records for a file's content (HASH_ALGORITHM)."""
    h = ChunkedHash()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_manifest(path: str | Path, target: str | None = None) -> dict[str, Any]:
    """The validated manifest of an artifact (structure, confined paths, sizes, and the content
    hashes of the small files graph.json, plan.json, tuning.json): ArtifactError names the file
    that is wrong."""
    art = Artifact(path, target)
    for rel in (GRAPH, PLAN, TUNING):
        if art.has(rel):
            art.read_bytes(rel)
    return art.manifest


class Artifact:
    """An artifact directory opened for reading: its manifest validated, its files read through
    `read_bytes` / `read_json`, each checked against its manifest hash as it is read."""

    def __init__(self, path: str | Path, target: str | None = None, verify: bool = True):
        self.root = Path(path)
        self.verify = verify
        self.manifest = _load_manifest(self.root, target)
        self.files: dict[str, dict[str, Any]] = self.manifest["files"]
        self.verified: set[str] = set()
        """Files whose content hash was checked so far."""
        _check_files(self.root, self.files)

    def path(self, rel: str) -> Path:
        """The file `rel` of the artifact; ArtifactError when the manifest does not list it."""
        if rel not in self.files:
            raise ArtifactError(f"'{self.root / rel}' is not listed in '{self.root / MANIFEST}'; recompile the artifact")
        return self.root / rel

    def has(self, rel: str) -> bool:
        return rel in self.files

    def listed(self, prefix: str) -> list[str]:
        """The listed files under the folder `prefix`, sorted."""
        return sorted(r for r in self.files if r.startswith(prefix.rstrip("/") + "/"))

    def read_bytes(self, rel: str) -> bytearray:
        """The content of a listed file in memory, its hash checked in the same read (when
        verifying)."""
        f = self.path(rel)
        size = self.files[rel]["size"]
        buf = bytearray(size)
        view = memoryview(buf)
        h = ChunkedHash() if self.verify else None
        try:
            with open(f, "rb", buffering=0) as fh:
                pos = 0
                while pos < size and (n := fh.readinto(view[pos : pos + CHUNK])):
                    if h is not None:
                        h.update(view[pos : pos + n])
                    pos += n
                extra = fh.read(1)
        except OSError as e:
            raise ArtifactError(f"cannot read artifact file '{f}': {e}") from None
        if pos != size or extra:
            raise ArtifactError(f"artifact file '{f}' changed size while it was read; recompile the artifact")
        self._check(rel, h)
        return buf

    def map_all(self, rels: list[str]) -> list[mmap.mmap | bytearray]:
        """Listed files mapped into memory (copy-on-write, so tensors may view them and writes
        never reach the files); when verifying, hashing them is what pages them in, so the
        check is the read: the 64 MiB chunks of all of them are hashed on every core at once
        (xxhash releases the GIL). Big weight files go this way: their pages stay shared with
        the page cache."""
        maps = [self._map(rel) for rel in rels]
        if not self.verify:
            return maps
        chunks = [(i, pos) for i, m in enumerate(maps) if isinstance(m, mmap.mmap)
                  for pos in range(0, len(m), HASH_CHUNK)]
        views = [memoryview(m) for m in maps]
        for m in maps:
            if isinstance(m, mmap.mmap):
                m.madvise(mmap.MADV_SEQUENTIAL)  # large readahead while the hash pages it in
        try:
            with ThreadPoolExecutor(max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
                digests = list(pool.map(lambda c: chunk_digest(views[c[0]][c[1] : c[1] + HASH_CHUNK]), chunks))
        finally:
            for v in views:
                v.release()
        per_file: dict[int, list[bytes]] = {}
        for (i, _), d in zip(chunks, digests, strict=True):
            per_file.setdefault(i, []).append(d)
        for i, (rel, m) in enumerate(zip(rels, maps, strict=True)):
            if isinstance(m, mmap.mmap):
                m.madvise(mmap.MADV_NORMAL)  # then ordinary access: keep what was read
                self._check(rel, combine_digests(per_file[i]))
        return maps

    def _map(self, rel: str) -> mmap.mmap | bytearray:
        """A listed file mapped (not hashed here); an empty one read (and hashed) instead."""
        f = self.path(rel)
        size = self.files[rel]["size"]
        if size == 0:
            return self.read_bytes(rel)
        try:
            with open(f, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot map artifact file '{f}': {e}") from None
        if len(mm) != size:
            raise ArtifactError(f"artifact file '{f}' changed size while it was read; recompile the artifact")
        return mm

    def _check(self, rel: str, h: ChunkedHash | str | None) -> None:
        if h is None:
            return
        if (h if isinstance(h, str) else h.hexdigest()) != self.files[rel]["hash"]:
            raise ArtifactError(
                f"artifact file '{self.root / rel}' does not match its {HASH_ALGORITHM} hash in the manifest: it is "
                "corrupt or was modified; recompile the artifact (or load with verify=False / --no-verify to skip)"
            )
        self.verified.add(rel)

    def read_text(self, rel: str) -> str:
        """A listed text file; ArtifactError naming it when it is not UTF-8."""
        try:
            return self.read_bytes(rel).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"artifact file '{self.root / rel}' is not UTF-8 text ({e})") from None

    def read_json(self, rel: str, default: Any = None) -> Any:
        """A listed JSON file (`default` when the manifest does not list it and one is given);
        ArtifactError naming the file when it is not JSON."""
        if default is not None and rel not in self.files:
            return default
        try:
            return json.loads(self.read_text(rel))
        except json.JSONDecodeError as e:
            raise ArtifactError(f"artifact file '{self.root / rel}' is not valid JSON ({e}); recompile the artifact") from None

    def verify_rest(self, skip_prefix: tuple[str, ...] = ()) -> None:
        """Check the hash of every listed file not read yet (except those under skip_prefix)."""
        if not self.verify:
            return
        for rel in self.files:
            if rel not in self.verified and not rel.startswith(skip_prefix):
                self.read_bytes(rel)


def verify_hashes(path: str | Path) -> list[str]:
    """Every listed file whose content hash differs from the manifest (reads all of them)."""
    art = Artifact(path)
    return [rel for rel, info in art.files.items() if hash_file(art.root / rel) != info["hash"]]


def read_json(root: Path, rel: str) -> Any:
    """A JSON file of the artifact, unchecked (prefer Artifact.read_json); ArtifactError when
    unreadable."""
    try:
        return json.loads((root / rel).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read artifact file '{root / rel}': {e}") from None


def _load_manifest(root: Path, target: str | None) -> dict[str, Any]:
    if not root.is_dir():
        raise ArtifactError(f"artifact directory '{root}' does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{mpath}' is missing: '{root}' is not a kiln artifact (run compile-model)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"'{mpath}' is not valid JSON ({e}); recompile the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"'{mpath}' is not a JSON object; recompile the artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"'{mpath}' has format version {version!r}; this kiln reads version {FORMAT_VERSION}: "
            "recompile the model with this kiln"
        )
    if manifest.get("hash_algorithm") != HASH_ALGORITHM:
        raise ArtifactError(
            f"'{mpath}' records hash algorithm {manifest.get('hash_algorithm')!r}; this kiln checks "
            f"{HASH_ALGORITHM}: recompile the model with this kiln"
        )
    if target is not None and manifest.get("target") != target:
        raise ArtifactError(
            f"'{root}' was compiled for target '{manifest.get('target')}', not '{target}'; "
            f"recompile with --target {target}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"'{mpath}' lists no files: it is invalid; recompile the artifact")
    for rel, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and info["size"] >= 0
                and isinstance(info.get("hash"), str)):
            raise ArtifactError(f"'{mpath}' has a malformed entry for '{rel}' (needs size and hash); recompile the artifact")
    if not any(r.startswith(WEIGHTS_DIR + "/") for r in files):
        raise ArtifactError(f"'{mpath}' lists no weight files; recompile the artifact")
    return manifest


def _check_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every listed path inside the artifact, present with its size; no unlisted weight file."""
    base = root.resolve()
    for rel, info in files.items():
        p = Path(rel)
        f = root / rel
        if not rel or p.is_absolute() or ".." in p.parts or not f.resolve().is_relative_to(base):
            raise ArtifactError(
                f"the manifest of '{root}' lists '{rel}', which lies outside the artifact directory: refusing it"
            )
        if not f.is_file():
            raise ArtifactError(f"artifact file '{f}' is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise ArtifactError(
                f"artifact file '{f}' has {size} bytes, the manifest says {info['size']}: it is "
                "truncated or was modified; recompile the artifact"
            )
    wdir = root / WEIGHTS_DIR
    if wdir.is_dir():
        for f in sorted(wdir.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if (f.is_file() or f.is_symlink()) and rel not in files:
                raise ArtifactError(
                    f"'{f}' is not listed in the manifest: an artifact's weights/ holds only the files it "
                    "lists; remove it or recompile the artifact"
                )
