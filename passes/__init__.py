"""Graph -> graph transformations, one per file, registered by name; pipelines per target."""

from kiln.passes.base import Pass
from kiln.passes.manager import PassManager
from kiln.passes.registry import PASSES, PIPELINES, get_pass, pipeline, resolve_pipeline

__all__ = ["PASSES", "PIPELINES", "Pass", "PassManager", "get_pass", "pipeline", "resolve_pipeline"]
