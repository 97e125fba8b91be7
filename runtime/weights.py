"""Loading an artifact's safetensors weights onto a device.

Each weight file the manifest lists is mapped into memory once (its hash checked by the pass that
pages it in, see Artifact.map_all) and its tensors are views of the mapping, parsed here from the
safetensors layout (nothing is unpickled):

    | u64 N (little-endian) | N bytes of JSON header | data ... |
    header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
"""

from __future__ import annotations

import json
import mmap
import struct

import torch

from kiln.errors import ArtifactError
from kiln.runtime.artifact import WEIGHTS_DIR, Artifact

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def load_weights(artifact: Artifact, names: set[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors from exactly the weight files the manifest lists; ArtifactError for a
    corrupt file, a weight two files hold, or a weight the plan needs that no file holds."""
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    files = artifact.listed(WEIGHTS_DIR)
    for rel in files:
        if not rel.endswith(".safetensors"):
            raise ArtifactError(f"'{artifact.root / rel}' is not a safetensors file; recompile the artifact")
    maps = artifact.map_all(files)  # hashed on every core, chunk by chunk
    for rel, data in zip(files, maps, strict=True):
        for k, t in parse_safetensors(data, str(artifact.root / rel)).items():
            if k in where:
                raise ArtifactError(
                    f"weight '{k}' is in both '{artifact.root / where[k]}' and '{artifact.root / rel}'; recompile the artifact"
                )
            where[k] = rel
            if k in names:
                out[k] = t.to(device)
    missing = names - out.keys()
    if missing:
        raise ArtifactError(f"weights {sorted(missing)[:5]} are in no weight file of '{artifact.root}'; recompile the artifact")
    return out


def parse_safetensors(data: bytearray | mmap.mmap, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, as views of them (copied only when a tensor's
    offset is not aligned to its element size); ArtifactError naming the file when malformed."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"weight file '{name}' is corrupt ({why}); recompile the artifact")

    if len(data) < 8:
        raise bad("shorter than its header")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise bad(f"header of {n} bytes in a {len(data)}-byte file")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start = 8 + n
    raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor '{k}' has a malformed entry ({e!r})") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise bad(f"tensor '{k}' has shape {shape}")
            numel *= d
        if not 0 <= begin <= end <= len(data) - start or end - begin != numel * dtype.itemsize:
            raise bad(f"tensor '{k}' ({info['dtype']}{shape}) has data offsets [{begin}, {end}] in {len(data) - start} data bytes")
        chunk = raw[start + begin : start + end]
        if (start + begin) % dtype.itemsize:
            chunk = chunk.clone()
        out[k] = chunk.view(dtype).view(shape)
    return out
