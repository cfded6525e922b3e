"""Device plumbing: the process-wide torch flags a run sets on purpose, restores afterwards and records.

torch keeps a handful of global switches that change numbers or speed on CUDA and that nobody sets on
purpose unless made to. This module sets them explicitly, gives them back when a block ends, and reads them
for the run metadata (DESIGN §8: "TF32/cudnn/determinism flags").

- **TF32** (:func:`apply_matmul_settings`, :func:`matmul_settings`): on Ampere and newer GPUs float32 matrix
  products and convolutions may run in TF32 (10-bit mantissa): faster, and embeddings move from float32
  (issue 20 estimates ~1e-3; not measured here, no GPU). torch's defaults differ between the two switches
  (cuBLAS off, cuDNN on) and have changed between releases, so both are set explicitly, together with
  ``torch.set_float32_matmul_precision`` (``"highest"`` without TF32, ``"high"`` with it), and what was set is
  returned for the metadata. They are set the same way whatever the device, so that a record never depends on
  what an earlier import left behind.
- **Determinism** (:func:`deterministic`): ``torch.use_deterministic_algorithms(True, warn_only=True)``
  (a kernel with no deterministic version warns instead of raising), ``cudnn.deterministic = True``,
  ``cudnn.benchmark = False`` (autotuning picks kernels by timing, which differs run to run), and
  ``CUBLAS_WORKSPACE_CONFIG=":4096:8"`` when the environment has none. Every flag is restored on exit,
  ``cudnn.benchmark`` included: Lightning's ``deterministic="warn"`` switched benchmark off for the rest of
  the process, which slows every later convolution on CUDA.
- **cuBLAS workspace**: torch sizes its cuBLAS workspaces from ``CUBLAS_WORKSPACE_CONFIG`` once, the first time
  it makes one (the first matrix product on a GPU; the parsed size is cached for the process), while its
  determinism check reads the variable afresh at every GEMM. Set after CUDA started, the variable therefore
  silences the check without making the products deterministic. :func:`prepare_cuda_env` sets it at program
  start, before any CUDA work; :func:`deterministic` sets it only as a last resort and logs a warning when that
  was too late (:func:`cuda_initialized`). ``:4096:8`` (8 buffers of 4 MiB) is the larger of the two settings
  NVIDIA documents for reproducible cuBLAS results; it costs a few tens of MiB of GPU memory and nothing on the
  CPU.
- :func:`settings_record` reads all of the above, for ``metadata.collect``.
- :func:`takes_device`: whether a registry factory accepts ``device=`` (``ModelPool`` passes the suite's device
  to those, so ONNX and insightface recognizers build their sessions with the CUDA provider on a GPU).
- :func:`gpu_actor_cpus`: the CPU reservation of each GPU actor of the Ray executor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cloakbench.cuda_env import CUBLAS_DETERMINISTIC as CUBLAS_DETERMINISTIC  # re-exported
from cloakbench.cuda_env import CUBLAS_ENV as CUBLAS_ENV
from cloakbench.cuda_env import prepare_cuda_env as prepare_cuda_env

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MatmulSettings:
    """The three switches that decide float32 matrix-product and convolution precision on CUDA."""

    tf32_matmul: bool  # torch.backends.cuda.matmul.allow_tf32
    tf32_cudnn: bool  # torch.backends.cudnn.allow_tf32
    # torch.get_float32_matmul_precision(); None where torch cannot say (see _matmul_precision)
    float32_matmul_precision: str | None

    @classmethod
    def for_tf32(cls, tf32: bool) -> MatmulSettings:
        """TF32 on for both cuBLAS and cuDNN (precision "high"), or off for both ("highest")."""
        if not isinstance(tf32, bool):
            raise TypeError(f"tf32 must be True or False, got {tf32!r}")
        return cls(tf32_matmul=tf32, tf32_cudnn=tf32, float32_matmul_precision="high" if tf32 else "highest")

    @classmethod
    def current(cls) -> MatmulSettings:
        return cls(
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
            float32_matmul_precision=_matmul_precision(),
        )

    def apply(self) -> None:
        """Precision first (it also sets ``matmul.allow_tf32``: "highest" off, "high"/"medium" on), then the
        cuBLAS flag only where it differs from what the precision implied: since torch 2.9 writing a legacy flag
        that contradicts the precision makes ``get_float32_matmul_precision()`` raise ("mix of the legacy and
        new APIs"), measured on torch 2.13. The cuDNN flag is independent of the precision."""
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if bool(torch.backends.cuda.matmul.allow_tf32) != self.tf32_matmul:
            torch.backends.cuda.matmul.allow_tf32 = self.tf32_matmul
        torch.backends.cudnn.allow_tf32 = self.tf32_cudnn

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where torch refuses to answer (torch >= 2.9 raises when
    someone set ``matmul.allow_tf32`` against the precision: the two APIs disagree and neither is the truth)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def apply_matmul_settings(device: torch.device | str, *, tf32: bool) -> dict[str, Any]:
    """Set TF32 and float32 matmul precision explicitly, the same on every device; return what was set
    (``device`` is recorded with it: the switches are meant for CUDA)."""
    settings = MatmulSettings.for_tf32(tf32)
    settings.apply()
    return {"device": str(torch.device(device)), **settings.as_dict()}


@contextlib.contextmanager
def matmul_settings(device: torch.device | str, *, tf32: bool) -> Iterator[dict[str, Any]]:
    """:func:`apply_matmul_settings` inside the block; the previous values are restored on exit."""
    previous = MatmulSettings.current()
    try:
        yield apply_matmul_settings(device, tf32=tf32)
    finally:
        previous.apply()


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (after which cuBLAS may have read its workspace setting)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _DeterminismState:
    algorithms: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool

    @classmethod
    def current(cls) -> _DeterminismState:
        return cls(
            algorithms=torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        )

    def apply(self) -> None:
        torch.use_deterministic_algorithms(self.algorithms, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


@contextlib.contextmanager
def deterministic(device: torch.device | str) -> Iterator[None]:
    """Deterministic algorithms (warn only), deterministic cuDNN, no cuDNN autotuning inside the block; every
    flag, and ``CUBLAS_WORKSPACE_CONFIG`` when this set it, is restored on exit (also when the block raises).

    On CUDA, when the variable is unset here and CUDA is already initialised, it is set anyway and a warning
    names :func:`prepare_cuda_env` (see the module docstring: set late, it silences torch's check).
    """
    device = torch.device(device)
    previous = _DeterminismState.current()
    env_set_here = prepare_cuda_env()
    if env_set_here and device.type == "cuda" and cuda_initialized():
        log.warning(
            "%s was set after CUDA started: workspaces already made keep their size, so matrix products may not be "
            "deterministic although torch no longer warns; call cloakbench.cuda_env.prepare_cuda_env() at "
            "program start",
            CUBLAS_ENV,
        )
    try:
        _DeterminismState(algorithms=True, warn_only=True, cudnn_deterministic=True, cudnn_benchmark=False).apply()
        yield
    finally:
        previous.apply()
        if env_set_here:
            os.environ.pop(CUBLAS_ENV, None)


def settings_record() -> dict[str, Any]:
    """The process-wide flags that change numbers or speed, as plain data for the run metadata."""
    state = _DeterminismState.current()
    return {
        **MatmulSettings.current().as_dict(),
        "cudnn_benchmark": state.cudnn_benchmark,
        "cudnn_deterministic": state.cudnn_deterministic,
        "deterministic_algorithms": state.algorithms,
        "deterministic_warn_only": state.warn_only,
        CUBLAS_ENV.lower(): os.environ.get(CUBLAS_ENV),
    }


def takes_device(factory: Callable[..., object]) -> bool:
    """Whether ``factory`` has a parameter named ``device`` that a keyword can fill (the zoo's factories build
    their ONNX sessions for it). A bare ``**kwargs`` does not count: a plug-in's factory may pass it on to a
    config that rejects unknown keys."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    param = params.get("device")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def gpu_actor_cpus(nodes: Sequence[Mapping[str, float]], threads: int) -> float:
    """How many CPUs the Ray executor reserves for each of its GPU actors.

    ``nodes``: the resources of each live node (``ray.nodes()[i]["Resources"]``, or the cluster totals as one
    node). An actor with a GPU still needs CPUs: it decodes and encodes PNGs, runs the codecs of the input
    countermeasures, feeds the GPU and runs onnxruntime's CPU fallback, with ``threads`` torch threads. Reserving
    none (the old ``num_cpus=0``) let Ray pack CPU tasks onto those cores. Each GPU gets an equal share of its
    node's CPUs (``CPU // GPU``, at least 1), capped at ``threads``: more would be reserved and never used. The
    smallest share over the GPU nodes is taken, so that every GPU of every node can still hold an actor. A node
    with fewer CPUs than GPUs gets a fraction (Ray accepts fractions below 1, whole numbers above), rather than 1
    each and GPUs whose actor could never start."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    shares = [float(node.get("CPU", 0.0)) / float(node["GPU"]) for node in nodes if float(node.get("GPU", 0.0)) >= 1]
    if not shares:
        raise ValueError("no node has a GPU")
    share = min(shares)
    if share < 1:
        return math.floor(share * 10_000) / 10_000  # Ray's resource precision is 1e-4; 0 CPUs: reserve 0
    return float(min(int(share), threads))
