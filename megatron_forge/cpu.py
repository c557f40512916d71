"""CPU emulation of megatron-core's CUDA assumptions, so the real stack runs over gloo.

megatron-core 0.16 is written for CUDA: it allocates buffers with ``device="cuda"``,
checks ``tensor.type() == "torch.cuda.FloatTensor"``, forks the CUDA RNG for
tensor-parallel dropout and uses CUDA streams in the MoE dispatcher. Its math runs on
CPU, so each assumption is redirected to the CPU equivalent here. ``install()`` is called
only when CUDA is absent (see :func:`megatron_forge.distributed.initialize`) and refuses
to run where CUDA is available: on a GPU nothing here is touched. This is a correctness
path for tests and laptops, not a performance path.

Every patch names the megatron-core behaviour it replaces. The patches were written
against the megatron-core versions in ``SUPPORTED_MCORE``, the range pyproject.toml pins
(tests/test_cpu.py checks that the two agree); on another version ``install()`` refuses to
run rather than silently mis-emulating (set ``FORGE_CPU_EMULATION_ANY_VERSION=1`` to try
anyway).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MCORE = ">=0.16.1,<0.17"
"""The megatron-core versions this emulation supports; pyproject.toml requires
``megatron-core`` with exactly this specifier."""

_installed = False


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, an index) to ``cpu``."""
    if device is None:
        return None
    if isinstance(device, int):  # torch treats a bare index as a CUDA ordinal
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)):
        dev = torch.device(device)
        return torch.device("cpu") if dev.type == "cuda" else dev
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made while active.

    Replaces: ``torch.empty(..., device="cuda")`` / ``torch.cuda.current_device()`` in
    schedules, DDP grad buffers and the optimizer; ``tensor.cuda()`` and
    ``tensor.to("cuda")``; and ``tensor.type()`` checks against ``torch.cuda.FloatTensor``
    in the distributed optimizer and clip_grads (answered with the CUDA type name).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            out = func(*args)
            if isinstance(out, str) and out.startswith("torch.") and ".cuda." not in out:
                return out.replace("torch.", "torch.cuda.", 1)
            return out
        if name == "to" and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            if not isinstance(args[1], bool):
                args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _InertEvent:
        return _InertEvent()

    def query(self) -> bool:
        return True


class _InertEvent:
    """Stand-in for ``torch.cuda.Event``; timings read as zero."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _no_compile(model: Any = None, **_: Any) -> Any:
    """``torch.compile`` as a no-op, both as ``@torch.compile`` and ``@torch.compile(...)``."""
    return model if model is not None else (lambda fn: fn)


def import_mcore_without_compile() -> None:
    """Import megatron-core with its ``jit_fuser`` (``torch.compile``) a no-op and without
    the optional wandb import of its inference and timer modules.

    Replaces: ``megatron.core.jit.jit_fuser = torch.compile``, applied at import to ~40
    fusion kernels (bias-GeLU, SwiGLU, RoPE, ...). As a decorator ``torch.compile`` loads
    torch._dynamo and inductor, 2-5 s of start-up per rank on CPU, for kernels the CPU path
    never calls (the fusions are off without CUDA); the decorated functions stay eager, the
    same math. megatron-core's dynamic inference context and timers ``try: import wandb``
    (2 s more) for features training does not use; they see it as absent, and our own W&B
    logger imports it normally later. A process that imported megatron-core already keeps
    it as it is.
    """
    import sys

    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    hide_wandb = "wandb" not in sys.modules
    torch.compile = _no_compile
    if hide_wandb:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import megatron.core.jit

        megatron.core.jit.disable_jit_fuser()  # modules imported later decorate with a no-op
    finally:
        torch.compile = real
        if hide_wandb:
            del sys.modules["wandb"]


def check_mcore_version() -> str:
    """Return megatron-core's version, raising if the emulation was not written for it."""
    import megatron.core
    from packaging.specifiers import SpecifierSet  # a megatron-core dependency

    version = megatron.core.__version__
    supported = SpecifierSet(SUPPORTED_MCORE).contains(version, prereleases=True)
    if not supported and not os.environ.get("FORGE_CPU_EMULATION_ANY_VERSION"):
        raise RuntimeError(
            f"megatron_forge.cpu emulates megatron-core {SUPPORTED_MCORE} on CPU, but "
            f"megatron-core {version} is installed. Install 'megatron-core{SUPPORTED_MCORE}' "
            "or review megatron_forge/cpu.py against the new version "
            "(FORGE_CPU_EMULATION_ANY_VERSION=1 skips this check)."
        )
    return version


def _patch_device_queries() -> None:
    # megatron-core passes torch.cuda.current_device() as a device and calls synchronize()
    # around timers and checkpoint saves.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


def _patch_rng() -> None:
    # CudaRNGStatesTracker.add/fork swap the CUDA generator's state so that TP ranks draw
    # different dropout masks inside `fork()` and the same ones outside. On CPU the default
    # generator plays the CUDA generator's role, which keeps those semantics.
    import megatron.core.tensor_parallel.random as mrandom

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    torch.cuda.get_rng_state = get_state
    torch.cuda.random.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.manual_seed = torch.manual_seed
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_streams() -> None:
    # The MoE alltoall dispatcher and the async checkpoint queue create side streams and
    # events; on CPU every op is synchronous, so inert stand-ins are exact.
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertEvent
    torch.cuda.current_stream = lambda *a, **k: _InertStream()
    torch.cuda.default_stream = lambda *a, **k: _InertStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_moe() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    # 0.16.1 reads `te_general_gemm` in the router's GEMM even when the TE import failed,
    # which raises NameError; None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher turns split sizes into numpy via maybe_move_tensor_to_cpu,
    # which only converts CUDA tensors; on CPU the sizes would stay tensors and
    # all_to_all_single would reject them.
    def move_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host


def install() -> None:
    """Install the CPU emulation once per process (later calls do nothing).

    Only for processes without CUDA: with a GPU visible it raises RuntimeError rather than
    send every CUDA allocation to the CPU. Callers check first, as
    :func:`megatron_forge.distributed.initialize` does; hide the GPUs
    (``CUDA_VISIBLE_DEVICES=``) to run on CPU on a GPU machine.
    """
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_forge.cpu.install() called in a process that sees CUDA: the CPU "
            "emulation is for machines without GPUs; set CUDA_VISIBLE_DEVICES= to run on CPU"
        )
    import_mcore_without_compile()
    check_mcore_version()
    _patch_device_queries()
    _patch_rng()
    _patch_streams()
    _patch_moe()
    # Entered for the life of the process: megatron-core allocates on "cuda" anywhere.
    CudaToCpuMode().__enter__()
    _installed = True


def is_installed() -> bool:
    """Whether the emulation is active in this process."""
    return _installed
