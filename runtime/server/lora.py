"""LoRA adapters over HTTP, as vLLM serves them: the request's `model` names an adapter, and
`POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` change the set at run time.

Each adapter gets a lora_int_id when it is added (`--lora-modules` in order from 1, then each
load the next) and keeps it; ids are never reused, so an adapter loaded again under the same
name never meets the old one's slot or prefix-cache blocks. Unloading takes the name away at
once (a request naming it is a 404); requests already queued or running with the adapter finish
with it, and its slot is freed after the last one (`AsyncLLMEngine.remove_lora`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from kiln.runtime.engine import LLMEngine
from kiln.runtime.lora import LoRARequest
from kiln.runtime.lora_slots import register
from kiln.runtime.server.errors import APIError, invalid
from kiln.runtime.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

router = APIRouter()


@dataclass(frozen=True)
class LoRAModule:
    """An adapter given to `kiln serve --lora-modules` (vLLM's LoRAModulePath)."""

    name: str
    path: str
    base_model_name: str | None = None
    """The model it was trained from, listed as its `parent` (default: the served model)."""


def parse_lora_module(value: str) -> LoRAModule:
    """`name=path`, or vLLM's JSON form `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if value.lstrip().startswith("{"):
        try:
            d = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {value!r} is not valid JSON ({e})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k] for k in ("name", "path")):
            raise ValueError(f"--lora-modules {value!r}: the JSON form needs string fields 'name' and 'path'")
        return LoRAModule(d["name"], d["path"], d.get("base_model_name"))
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {value!r}: give name=path or a JSON object with 'name' and 'path'")
    return LoRAModule(name, path)


class LoRAModules:
    """The adapters a server serves, by name (read and changed on the event loop only)."""

    def __init__(self, engine: LLMEngine, base_model_name: str, modules: Sequence[LoRAModule] = ()):
        self.enabled = engine.lora is not None
        self.base_model_name = base_model_name
        self.by_name: dict[str, LoRARequest] = {}
        self.parents: dict[str, str] = {}
        self.loading: set[str] = set()
        """Names whose load is under way (a second load of one is refused)."""
        self._ids = itertools.count(1)
        for m in modules:  # checked now, before the engine thread starts: a bad one stops the server
            if m.name == base_model_name or m.name in self.by_name:
                raise ValueError(f"--lora-modules: the name '{m.name}' is given twice (or is the served model's)")
            lora = self.new(m.name, m.path, "--lora-modules")
            register(engine.lora, lora)
            self.add(lora, m.base_model_name)

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.base_model_name:
            return None
        lora = self.by_name.get(model)
        if lora is None:
            adapters = f" or one of its {len(self.by_name)} LoRA adapters (GET /v1/models)" if self.by_name else ""
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.base_model_name}'{adapters}.", param="model", code="model_not_found")
        return lora

    def new(self, name: str, path: str, param: str) -> LoRARequest:
        """A request for a new adapter under a free name, with the next id; 400 when the name is
        taken or the server serves no adapters."""
        if not self.enabled:
            raise invalid("this server serves no LoRA adapters: start it with --enable-lora (and --max-loras, "
                          "--max-lora-rank) on an artifact compiled with --max-lora-rank", param)
        if name == self.base_model_name:
            raise invalid(f"'{name}' is the served model's name; give the adapter another", "lora_name")
        if name in self.by_name or name in self.loading:
            raise invalid(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        return LoRARequest(name, next(self._ids), path)

    def add(self, lora: LoRARequest, parent: str | None = None) -> None:
        """Serve a registered adapter under its name."""
        self.by_name[lora.lora_name] = lora
        self.parents[lora.lora_name] = parent or self.base_model_name


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Check a PEFT adapter directory on the server against the artifact and serve it under
    `lora_name`; 400 when the name is taken or the adapter does not fit."""
    state = request.app.state.kiln
    loras: LoRAModules = state.loras
    lora = loras.new(body.lora_name, body.lora_path, "lora_path")
    loras.loading.add(lora.lora_name)
    try:
        await state.async_engine.add_lora(lora)
    except ValueError as e:
        raise invalid(str(e), "lora_path") from None
    finally:
        loras.loading.discard(lora.lora_name)
    loras.add(lora)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Stop serving an adapter (by `lora_name` or `lora_int_id`): a request naming it is a 404
    from now on, while those already running with it finish."""
    state = request.app.state.kiln
    loras: LoRAModules = state.loras
    if not loras.enabled:
        raise invalid("this server serves no LoRA adapters (start it with --enable-lora)", "lora_name")
    if body.lora_name is None and body.lora_int_id is None:
        raise invalid("give lora_name or lora_int_id", "lora_name")
    name = body.lora_name
    if name is None:
        name = next((n for n, r in loras.by_name.items() if r.lora_int_id == body.lora_int_id), None)
    lora = loras.by_name.get(name) if name is not None else None
    if lora is None or (body.lora_int_id is not None and lora.lora_int_id != body.lora_int_id):
        which = f"'{body.lora_name}'" if body.lora_name is not None else f"with lora_int_id {body.lora_int_id}"
        raise APIError(404, f"The lora adapter {which} cannot be found.", param="lora_name", code="model_not_found")
    del loras.by_name[lora.lora_name], loras.parents[lora.lora_name]
    await state.async_engine.remove_lora(lora.lora_int_id)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")
