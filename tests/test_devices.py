"""Device plumbing (issue 20): torch's process-wide flags set, restored and recorded; the profiler's kernel rows;
ONNX providers that follow the suite's device; the CPU reservation of Ray's GPU actors.

No GPU here: the CUDA decisions are pure functions tested on plain data (``device_events``,
``gpu_actor_cpus``, the provider lists), the flags are torch's real ones (they exist on a CPU build), and the
ONNX sessions are real onnxruntime sessions on the real SFace file, asked for CUDA on a CPU-only build, so the
fallback itself is what is checked. The fake profiler events are the only stand-ins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cloakbench import devices
from cloakbench.attacks.adaptation import ADAPTATIONS, TrainingSet
from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer, sface
from cloakbench.attacks.recognizers.onnx_runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    OnnxRecognizer,
    provider_options_for,
    providers_for,
    usable_providers,
)
from cloakbench.bench import metadata
from cloakbench.bench.runner import ModelPool
from cloakbench.bench.timing import device_events, top_kernels
from cloakbench.datasets import load_images, scan_folder
from cloakbench.devices import (
    CUBLAS_DETERMINISTIC,
    CUBLAS_ENV,
    MatmulSettings,
    apply_matmul_settings,
    deterministic,
    gpu_actor_cpus,
    matmul_settings,
    prepare_cuda_env,
    settings_record,
    takes_device,
)
from cloakbench.registry import EntryMeta, Origin, OriginKind

CPU = torch.device("cpu")
CUDA_EVENT = torch.profiler.DeviceType.CUDA
CPU_EVENT = torch.profiler.DeviceType.CPU


@pytest.fixture(autouse=True)
def _restore_torch_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test leaves torch's global flags and the cuBLAS variable as it found them."""
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    matmul = MatmulSettings.current()
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    matmul.apply()
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]


# -- top_kernels ------------------------------------------------------------------------------------------------


def event(key: str, device_type: Any, self_device_us: float, *, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        key=key, device_type=device_type, is_user_annotation=annotation, self_device_time_total=self_device_us
    )


def test_device_events_keep_the_kernels_not_the_cpu_ops_that_launched_them() -> None:
    # what key_averages() of a CUDA profile holds for one matmul: the CPU op carries its kernel's 100 us as
    # self device time, the kernel event carries the same 100 us, and a record_function range mirrored on the
    # GPU timeline spans it once more
    averages = [
        event("aten::mm", CPU_EVENT, 100.0),
        event("aten::addmm", CPU_EVENT, 40.0),
        event("sm90_xmma_gemm_f32f32", CUDA_EVENT, 100.0),
        event("Memcpy HtoD (Pageable -> Device)", CUDA_EVENT, 40.0),
        event("my_step", CUDA_EVENT, 140.0, annotation=True),
    ]
    kept = device_events(averages)
    assert [e.key for e in kept] == ["sm90_xmma_gemm_f32f32", "Memcpy HtoD (Pageable -> Device)"]
    assert sum(e.self_device_time_total for e in kept) == 140.0  # all CPU ops + kernels would say 280 (+140)
    assert device_events([e for e in averages if e.device_type == CPU_EVENT]) == []


def test_device_events_on_real_cpu_profile_rows_keep_nothing() -> None:
    """The profiler's own event objects carry ``device_type``; a CPU-only profile has no device events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.relu(torch.ones(8, 8) @ torch.ones(8, 8))
    averages = list(prof.key_averages())
    assert averages and all(e.device_type == CPU_EVENT for e in averages)
    assert device_events(averages) == []


def test_top_kernels_cpu_shares_sum_to_at_most_one() -> None:
    a, b = torch.randn(128, 128), torch.randn(128, 128)
    top = top_kernels(lambda: torch.relu(a @ b + 1.0).sum(), device=CPU, n=2, quiet=True)
    every = top_kernels(lambda: torch.relu(a @ b + 1.0).sum(), device=CPU, n=1000, quiet=True)
    assert len(top) == 2 and all(r["clock"] == "cpu" for r in every)
    assert sum(r["share"] for r in top) <= 1.0
    assert sum(r["share"] for r in every) == pytest.approx(1.0)  # every row: the whole, counted once


# -- TF32 and matmul precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tf32", [True, False])
def test_apply_matmul_settings_sets_all_three_and_returns_them(tf32: bool) -> None:
    MatmulSettings.for_tf32(not tf32).apply()
    record = apply_matmul_settings(CPU, tf32=tf32)
    assert record == {
        "device": "cpu",
        "tf32_matmul": tf32,
        "tf32_cudnn": tf32,
        "float32_matmul_precision": "high" if tf32 else "highest",
    }
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")  # torch still answers


def test_matmul_settings_context_restores_the_previous_values() -> None:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True  # torch's own defaults: cuBLAS off, cuDNN on
    before = MatmulSettings.current()
    assert (before.tf32_matmul, before.tf32_cudnn) == (False, True)
    with matmul_settings("cuda", tf32=True) as record:
        assert record["device"] == "cuda" and MatmulSettings.current() == MatmulSettings.for_tf32(True)
    assert MatmulSettings.current() == before
    with pytest.raises(RuntimeError, match="inside"), matmul_settings(CPU, tf32=False):
        raise RuntimeError("inside")
    assert MatmulSettings.current() == before


def test_tf32_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="tf32"):
        apply_matmul_settings(CPU, tf32="yes")  # type: ignore[arg-type]


# -- determinism ------------------------------------------------------------------------------------------------


def flags() -> tuple[bool, bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        bool(torch.backends.cudnn.deterministic),
        bool(torch.backends.cudnn.benchmark),
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_sets_every_flag_and_restores_them(device: str) -> None:
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # a fast CUDA process
    with deterministic(device):
        assert flags() == (True, True, True, False)
        assert os.environ[CUBLAS_ENV] == CUBLAS_DETERMINISTIC
    assert flags() == (False, False, False, True)  # benchmark back on: Lightning's "warn" left it off
    assert CUBLAS_ENV not in os.environ  # set by the block, so taken away with it


def test_deterministic_restores_on_error_and_keeps_a_users_cublas_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    torch.use_deterministic_algorithms(True)  # strict, as a user may have it
    inside: list[tuple[str | None, tuple[bool, bool, bool, bool]]] = []

    def fail() -> None:
        with deterministic(CPU):
            inside.append((os.environ.get(CUBLAS_ENV), flags()))
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail()
    assert inside == [(":16:8", (True, True, True, False))]
    assert flags()[:2] == (True, False)  # strict again, not warn-only
    assert os.environ[CUBLAS_ENV] == ":16:8"


def test_deterministic_warns_when_cublas_setting_comes_after_cuda_started(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(devices, "cuda_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="cloakbench.devices"), deterministic("cuda"):
        pass
    assert "prepare_cuda_env" in caplog.text
    caplog.clear()
    prepare_cuda_env()  # at program start, as the CLI does: no warning later
    with caplog.at_level(logging.WARNING, logger="cloakbench.devices"), deterministic("cuda"):
        pass
    assert caplog.text == ""


def test_prepare_cuda_env_sets_only_an_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prepare_cuda_env() is True
    assert os.environ[CUBLAS_ENV] == CUBLAS_DETERMINISTIC
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    assert prepare_cuda_env() is False
    assert os.environ[CUBLAS_ENV] == ":16:8"


def test_settings_record_reads_the_flags_and_metadata_carries_it() -> None:
    apply_matmul_settings(CPU, tf32=True)
    with deterministic(CPU):
        inside = settings_record()
    assert inside == {
        "tf32_matmul": True,
        "tf32_cudnn": True,
        "float32_matmul_precision": "high",
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
        "deterministic_algorithms": True,
        "deterministic_warn_only": True,
        "cublas_workspace_config": CUBLAS_DETERMINISTIC,
    }
    after = settings_record()
    assert after["cublas_workspace_config"] is None and after["tf32_matmul"] is True
    assert metadata.collect(CPU, onnx_providers={})["torch_settings"] == after


@pytest.fixture(scope="module")
def few_faces(celeb24_root: Path) -> TrainingSet:
    by = scan_folder(celeb24_root).by_identity()
    records = [r for ident in sorted(by)[:3] for r in by[ident][:4]]
    return TrainingSet(images=load_images(records), labels=tuple(r.identity for r in records))


def test_fine_tuning_runs_deterministic_and_leaves_the_flags_as_it_found_them(
    few_faces: TrainingSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, tuple[bool, bool, bool, bool]]] = []
    real = devices.deterministic

    def spy(device: torch.device | str) -> Any:
        seen.append((str(device), flags()))
        return real(device)

    monkeypatch.setattr(devices, "deterministic", spy)
    torch.backends.cudnn.benchmark = True
    before = flags()
    rec = RECOGNIZERS.create("sface")
    ADAPTATIONS.create("end-to-end", epochs=1, steps_per_epoch=2, batch_size=4).adapt(rec, few_faces, seed=0)
    assert [d for d, _ in seen] == ["cpu"]  # training ran inside deterministic(device)
    assert flags() == before and torch.backends.cudnn.benchmark is True
    assert CUBLAS_ENV not in os.environ


# -- ONNX providers follow the device ---------------------------------------------------------------------------


def test_providers_follow_the_device() -> None:
    assert providers_for("cuda") == (CUDA_PROVIDER, CPU_PROVIDER)
    assert providers_for(torch.device("cuda:1")) == (CUDA_PROVIDER, CPU_PROVIDER)
    assert providers_for("cpu") == (CPU_PROVIDER,)
    assert provider_options_for("cuda:1", [CUDA_PROVIDER, CPU_PROVIDER]) == [{"device_id": "1"}, {}]
    assert provider_options_for("cuda", [CUDA_PROVIDER, CPU_PROVIDER]) == [{}, {}]
    assert usable_providers([CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER]) == [CPU_PROVIDER]
    assert usable_providers([CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]) == [
        CUDA_PROVIDER,
        CPU_PROVIDER,
    ]


def test_onnx_session_asked_for_cuda_on_a_cpu_build_records_and_says_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import onnxruntime as ort

    assert CUDA_PROVIDER not in ort.get_available_providers()  # this machine's build: the fallback is real
    with caplog.at_level(logging.WARNING, logger="cloakbench.attacks.recognizers.onnx_runtime"):
        rec = OnnxRecognizer(
            name="sface-file", path=sface.onnx_path(), spec=sface.SPEC, embedding_dim=128, device="cuda"
        )
    assert rec.providers_used == (CPU_PROVIDER,)
    assert "not CUDAExecutionProvider" in caplog.text
    emb = rec.embed(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    assert emb.shape == (2, 128) and torch.isfinite(emb).all()


def test_insightface_gets_cuda_first_when_the_suite_runs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """insightface would pick its own providers (CUDA whenever onnxruntime has it, whatever the suite's device);
    cloakbench passes them. onnxruntime is told it has CUDA so the list is not trimmed; the session then falls
    back to the CPU it really has, and ``providers_used`` says so."""
    insightface = pytest.importorskip("insightface")
    import onnxruntime as ort

    from cloakbench.attacks.recognizers.insightface_onnx import onnx_recognizer

    calls: list[dict[str, Any]] = []
    real_get_model = insightface.model_zoo.get_model

    def get_model(name: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_get_model(name, **kwargs)

    monkeypatch.setattr(insightface.model_zoo, "get_model", get_model)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # onnxruntime's own word on its CPU build
        on_gpu = onnx_recognizer(sface.onnx_path(), spec=sface.SPEC, embedding_dim=128, device="cuda:0")
    on_cpu = onnx_recognizer(sface.onnx_path(), spec=sface.SPEC, embedding_dim=128, device="cpu")
    assert calls[0]["providers"] == [CUDA_PROVIDER, CPU_PROVIDER]
    assert calls[0]["provider_options"] == [{"device_id": "0"}, {}]
    assert calls[1]["providers"] == [CPU_PROVIDER]  # not insightface's CUDA-if-available default
    assert on_gpu.providers_used == on_cpu.providers_used == (CPU_PROVIDER,)  # type: ignore[attr-defined]


# -- ModelPool passes the device to factories that take one --------------------------------------------------------


def test_takes_device() -> None:
    def kw(*, device: str = "cpu") -> None: ...
    def pos(device: str) -> None: ...
    def bare(**kwargs: Any) -> None: ...
    def none() -> None: ...
    def posonly(device: str, /) -> None: ...

    assert takes_device(kw) and takes_device(pos)
    assert not takes_device(bare) and not takes_device(none) and not takes_device(posonly)
    assert takes_device(sface.sface_onnx) and takes_device(RECOGNIZERS.get("sface-insightface").factory)


def test_model_pool_passes_its_device_to_factories_that_take_one(caplog: pytest.LogCaptureFixture) -> None:
    got: list[str] = []

    def with_device(*, device: str = "cpu") -> Recognizer:
        got.append(device)
        return sface.sface_onnx(device=device)

    def without_device() -> Recognizer:
        return sface.sface_onnx()

    origin = Origin(OriginKind.RUNTIME, "tests.test_devices")
    meta = EntryMeta(summary="test entry")
    RECOGNIZERS.register("test-devices-with", with_device, meta=meta, origin=origin)
    RECOGNIZERS.register("test-devices-without", without_device, meta=meta, origin=origin)
    try:
        cpu_pool = ModelPool(CPU)
        cpu_pool.get("test-devices-with")
        assert got == ["cpu"]
        # a suite on CUDA, here on a CPU-only machine: the factory is asked for CUDA, onnxruntime falls back,
        # and the pool's provider record says what ran
        cuda_pool = ModelPool(torch.device("cuda"))
        with caplog.at_level(logging.WARNING, logger="cloakbench.attacks.recognizers.onnx_runtime"):
            cuda_pool.get("test-devices-with")
            cuda_pool.get("test-devices-without")  # no device argument: built as before, no error
        assert got == ["cpu", "cuda"]
        assert "sface-onnx: onnxruntime runs on ['CPUExecutionProvider'], not CUDAExecutionProvider" in caplog.text
        assert cuda_pool.onnx_providers() == {
            "test-devices-with": [CPU_PROVIDER],
            "test-devices-without": [CPU_PROVIDER],
        }
        # a CPU-only recognizer refuses "cuda" in its factory (ValueError); the pool builds it on the CPU
        dlib = cuda_pool.get("dlib-resnet")
        assert dlib.device.type == "cpu"
    finally:
        RECOGNIZERS.remove_origin(origin)


# -- Ray GPU actors reserve CPUs --------------------------------------------------------------------------------


def test_gpu_actor_cpus() -> None:
    assert gpu_actor_cpus([{"CPU": 16.0, "GPU": 1.0}], threads=4) == 4  # capped by the threads it runs
    assert gpu_actor_cpus([{"CPU": 16.0, "GPU": 8.0}], threads=4) == 2  # CPUs // GPUs
    assert gpu_actor_cpus([{"CPU": 2.0, "GPU": 1.0}], threads=8) == 2
    # the smallest share over the GPU nodes, CPU-only nodes left out, so every GPU can hold an actor
    nodes = [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 8.0, "GPU": 8.0}, {"CPU": 96.0}]
    assert gpu_actor_cpus(nodes, threads=16) == 1
    assert gpu_actor_cpus([{"CPU": 4.0, "GPU": 8.0}], threads=4) == 0.5  # fewer CPUs than GPUs: a fraction
    assert gpu_actor_cpus([{"CPU": 2.0, "GPU": 3.0}], threads=4) == 0.6666
    with pytest.raises(ValueError, match="GPU"):
        gpu_actor_cpus([{"CPU": 8.0}], threads=2)
    with pytest.raises(ValueError, match="threads"):
        gpu_actor_cpus([{"CPU": 8.0, "GPU": 1.0}], threads=0)
