"""Triton kernels of the `cuda` target, one module per op family; each module exposes
`LAUNCHERS: dict[str, Launcher]`, keyed by the IR op it computes (same inputs, attributes and
results as the op's torch reference). `kiln.kernels.triton_provider` serves them as
`triton:<op>`.

Rules every kernel here keeps (so a decode step can be captured in a CUDA graph and an
artifact's compiled binaries cover every call):
- no host synchronization: no `.item()`, `.tolist()`, `.cpu()` or data-dependent grid sizes;
  grids come from tensor shapes alone;
- integer arguments that vary per step (token and sequence counts) are `do_not_specialize`,
  so one binary serves every batch size;
- inputs may be strided views (a slice of a merged QKV projection); strides are passed;
  outputs are the destination buffers the launcher is given.
"""
