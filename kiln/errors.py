"""kiln's exception hierarchy: every diagnostic a user can act on is one of these."""


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class UnsupportedOpError(KilnError):
    """The model uses an operation kiln cannot represent or run (raised at compile time)."""

    def __init__(self, op: str, model_type: str | None = None, hint: str | None = None):
        self.op = op
        self.model_type = model_type
        where = f" in model type '{model_type}'" if model_type else ""
        what = hint or (
            "kiln has no IR op for it yet. Add a converter under kiln/frontend/aten/ and an op "
            "in kiln/ir/ops/, or open an issue with the model's config.json."
        )
        super().__init__(f"unsupported operation '{op}'{where}: {what}")


class VerifyError(KilnError):
    """A graph is malformed, or a pass changed what the graph computes."""


class ArtifactError(KilnError):
    """An artifact directory is missing, corrupt, or was built for something else."""


class CheckpointError(KilnError):
    """A Hugging Face checkpoint directory cannot be read."""
