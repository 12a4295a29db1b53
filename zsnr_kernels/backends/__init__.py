"""The backends that run a step (docs/design.md §3): :mod:`.registry` lists them and picks one per call; each other
module is one backend (``eager``: the torch reference; ``cpu``, ``cuda``, ``triton``: the fused kernels) or what
they share (``call``: the step record handed to the compiled modules; ``layout``: tensors as kernels read them;
``device``: a device step checked on the host; ``table``: the float64 coefficient table; ``ext``: the compiled CPU
module; ``ops``: the ``torch.library`` op for ``torch.compile``; ``triton_kernels``: the Triton kernels)."""
