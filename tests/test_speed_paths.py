"""The speed paths of issue 20 change no cloak on the CPU, and say what they changed where they may.

- :meth:`Defense.protect_groups` (several users' photos in shared batches, each user's draws from their own
  generator) gives the cloaks of one :meth:`Defense.protect` call per user: the same bits for PGD, within float
  rounding for LowKey and Fawkes v1.0 (a few values by a level or two);
- a CUDA out-of-memory error halves a defense's batch, and the cloak is the one a smaller batch makes;
- ``precision: bf16`` moves embeddings a little (measured on this CPU, 2026-12-02: cosine distance 4e-5..1.9e-4 on
  SFace, 3e-5..1.1e-4 on FaceNet-CASIA, 16 celeb24 faces), keeps every output float32, and changes the recognizer's
  ``compute()`` and so every cache key built on it; fp32 suites keep the digest they had before the key existed;
- ``embed(grad=True)`` reads no value back from the device (the value check is ``embed()``'s, not the loop's).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.bench.executors import suite_digest
from cloakbench.bench.runner import ModelPool
from cloakbench.bench.suite import parse_suite
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.base import PhotoGroup
from cloakbench.errors import ConfigError, ImageContractError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def users(celeb24_root: Path) -> dict[str, torch.Tensor]:
    """Three users with 3, 2 and 4 photos: shared batches of 8 cut across them."""
    m = scan_folder(celeb24_root)
    wanted = {"Tom_Hanks": 3, "Barack_Obama": 2, "Drew_Barrymore": 4}
    return {who: load_images([r for r in m.records if r.identity == who][:n]) for who, n in wanted.items()}


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.mark.parametrize(
    ("name", "params"),
    [("pgd", {"steps": 2}), ("lowkey", {"steps": 2}), ("fawkes-v1-low", {"steps": 2})],
)
def test_shared_batches_make_the_same_cloaks_as_one_call_per_user(
    users: dict[str, torch.Tensor], sface: Recognizer, name: str, params: dict[str, Any]
) -> None:
    defense = DEFENSES.create(name, surrogates=[sface], name=name, **params)
    assert defense.independent_images

    def groups() -> list[PhotoGroup]:
        return [
            PhotoGroup(images=x, identities=[who] * len(x), generator=torch.Generator().manual_seed(7 + i))
            for i, (who, x) in enumerate(users.items())
        ]

    shared = defense.protect_groups(groups())
    one_by_one = [defense.protect(g.images, g.identities, generator=g.generator) for g in groups()]
    for a, b, x in zip(shared, one_by_one, users.values(), strict=True):
        assert not torch.equal(a, x)  # they are cloaks
        if name == "pgd":
            assert torch.equal(a, b)  # measured: the same bits
            continue
        # a batch's neighbours move a cloak by float rounding: measured 2026-12-02 (Intel Xeon), at most 25 of the
        # 112,896 values of a user's 3 photos differ, by at most 2 levels (a gradient sign flipped near zero)
        differ = a != b
        assert int(differ.sum()) <= 0.002 * a.numel()
        assert float((a - b).abs().max()) <= 3 / 255 + 1e-6


def test_targeted_fawkes_is_not_batched_across_users(sface: Recognizer) -> None:
    # the paper version picks one target per user: its photos are not independent of one another
    assert not DEFENSES.create("fawkes-low", surrogates=[sface], name="f", target_pool="demo").independent_images


def test_a_cuda_out_of_memory_error_halves_the_batch(
    users: dict[str, torch.Tensor], sface: Recognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.cat(list(users.values()))  # 9 photos
    ids = ["u"] * len(x)
    small = DEFENSES.create("pgd", surrogates=[sface], name="pgd", steps=2, batch_size=2)
    want = small.protect(x, ids, generator=torch.Generator().manual_seed(0))

    defense = DEFENSES.create("pgd", surrogates=[sface], name="pgd", steps=2, batch_size=8)
    real = defense._optimise
    seen: list[int] = []

    def optimise(images: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        if images.shape[0] > 2:  # a GPU that holds two photos' activations and no more
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, starts)

    monkeypatch.setattr(defense, "_optimise", optimise)
    got = defense.protect(x, ids, generator=torch.Generator().manual_seed(0))
    assert defense.oom_halvings == 2  # 8 -> 4 -> 2
    assert seen[:2] == [8, 4] and set(seen[2:]) <= {1, 2}
    assert torch.equal(got, want)  # the same draws, the same photos: the cloak a batch of two makes


def test_another_runtime_error_is_not_taken_for_memory(
    users: dict[str, torch.Tensor], sface: Recognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    defense = DEFENSES.create("pgd", surrogates=[sface], name="pgd", steps=1)

    def broken(images: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(defense, "_optimise", broken)
    x = users["Tom_Hanks"]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        defense.protect(x, ["u"] * len(x), generator=torch.Generator().manual_seed(0))
    assert defense.oom_halvings == 0


@pytest.mark.parametrize("name", ["sface", "facenet-casia"])
def test_bf16_moves_embeddings_a_little_and_says_so(users: dict[str, torch.Tensor], name: str) -> None:
    faces = torch.cat(list(users.values()))
    fp32 = ModelPool(CPU).get(name)
    bf16 = ModelPool(CPU, precision="bf16").get(name)
    a, b = fp32.embed(faces), bf16.embed(faces)
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=1), torch.ones(len(b)), atol=1e-5)
    distance = 1 - (a * b).sum(dim=1)
    # measured 2026-12-02 on 16 celeb24 faces: 3e-5..1.9e-4 (module docstring); 1e-3 leaves room across CPUs
    assert float(distance.max()) < 1e-3
    assert float(distance.max()) > 0  # bf16 did run
    assert (fp32.compute(), bf16.compute()) == ("cpu/fp32", "cpu/bf16")
    assert fp32.describe()["compute"] != bf16.describe()["compute"]  # every embedding cache key differs
    x = faces[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(bf16.embed(x, grad=True).sum(), x)
    assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


def test_bf16_cloak_stays_in_budget(users: dict[str, torch.Tensor]) -> None:
    sface = ModelPool(CPU, precision="bf16").get("sface")
    x = users["Tom_Hanks"]
    out = DEFENSES.create("pgd", surrogates=[sface], name="pgd", steps=2).protect(
        x, ["u"] * len(x), generator=torch.Generator().manual_seed(0)
    )
    assert out.dtype == torch.float32
    assert float((out - x).abs().max()) <= 8 / 255 + 0.5 / 255 + 1e-6


def test_black_boxes_refuse_bf16_and_the_pool_leaves_them_in_fp32() -> None:
    onnx = RECOGNIZERS.create("sface-onnx")
    with pytest.raises(ConfigError, match="float32 only"):
        onnx.set_precision("bf16")
    assert ModelPool(CPU, precision="bf16").get("sface-onnx").compute() == "cpu/fp32"
    # a session that onnxruntime runs on its CUDA provider is another compute (its embeddings, another cache key)
    onnx.providers_used = ("CUDAExecutionProvider", "CPUExecutionProvider")  # type: ignore[attr-defined]
    assert onnx.compute() == "cuda-onnxruntime/fp32"


def test_precision_keys_leave_fp32_digests_as_they_were() -> None:
    base = {"name": "s", "defenses": ["pgd"], "recognizers": ["sface"]}
    plain = parse_suite(base, where="t")
    explicit = parse_suite({**base, "precision": "fp32", "tf32": False}, where="t")
    bf16 = parse_suite({**base, "precision": "bf16"}, where="t")
    assert "precision" not in plain.to_dict() and "tf32" not in plain.to_dict()
    assert suite_digest(plain) == suite_digest(explicit)
    assert suite_digest(bf16) != suite_digest(plain)
    assert suite_digest(parse_suite({**base, "tf32": True}, where="t")) != suite_digest(plain)
    with pytest.raises(ConfigError, match="precision"):
        parse_suite({**base, "precision": "fp16"}, where="t")


def test_embed_with_gradients_checks_layout_not_values(sface: Recognizer) -> None:
    # the loop's call reads no value back (no host synchronisation on a GPU); a wrong layout is still refused
    out_of_range = torch.full((1, 3, 112, 112), 1.5, requires_grad=True)
    assert sface.embed(out_of_range, grad=True).shape == (1, 128)
    with pytest.raises(ImageContractError, match=r"\[0, 1\]"):
        sface.embed(out_of_range.detach())
    with pytest.raises(ImageContractError, match="shape"):
        sface.embed(torch.zeros((1, 1, 112, 112), requires_grad=True), grad=True)


def _people(celeb24_root: Path, tmp_path: Path, counts: dict[str, int]) -> Path:
    root = tmp_path / "faces"
    for ident, n in counts.items():
        (root / ident).mkdir(parents=True)
        for src in sorted((celeb24_root / ident).iterdir())[:n]:
            shutil.copy2(src, root / ident / src.name)
    return root


def test_the_bench_shares_batches_the_same_way_when_resumed(
    celeb24_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's shared batches (a GPU's, enabled here on the CPU): the partition does not depend on what is
    cached, a resumed cloaking equals an uninterrupted one, every key names its batch, and PGD's cloaks are those
    of one call per user."""
    from cloakbench.bench import runner
    from cloakbench.bench.cache import ArtifactCache

    counts = {"Tom_Hanks": 6, "Will_Smith": 6, "Tina_Fey": 6, "Keanu_Reeves": 6}  # 3 enrollment photos each
    suite = parse_suite(
        {
            "name": "shared", "dataset": {"source": "folder", "path": str(_people(celeb24_root, tmp_path, counts))},
            "protected": {"identities": list(counts)[:3]},
            "defenses": [{"name": "pgd", "surrogates": ["sface"], "params": {"steps": 2, "batch_size": 8}}],
            "recognizers": ["sface"], "countermeasures": ["none"], "classifiers": ["nearest-neighbour"],
            "seeds": [0], "device": "cpu",
        },
        where="test suite",
    )  # fmt: skip
    worker = runner.CellWorker(suite, cache=ArtifactCache(tmp_path / "plain"))
    data, spec = worker.data, suite.defenses[0]
    plain = runner.cloak_all(suite, data, spec, 0, worker.models, worker.cache, progress=False, quality_rows=None)

    monkeypatch.setattr(runner, "SHARED_BATCH_DEVICES", ("cpu", "cuda"))
    defense = runner.make_defense(spec, data, 0, worker.models)
    batch_of = runner.shared_batches(defense, data, data.protected, None)
    sizes = {ident: len(data.train[ident]) for ident in data.protected}
    assert sum(sizes.values()) > 8 and len(set(batch_of.values())) == 2  # two batches of at most 8 photos
    for batch in set(batch_of.values()):
        assert sum(sizes[i] for i in batch) <= 8

    cache = ArtifactCache(tmp_path / "shared")
    whole = runner.cloak_all(suite, data, spec, 0, worker.models, cache, progress=False, quality_rows=None)
    assert whole.key != plain.key  # the keys name the batch
    for ident in data.protected:
        assert np.array_equal(whole.images[ident], plain.images[ident])  # PGD: the same bits as one call per user
    # resume: one user's cloak lost; the batch is made again, the same partition, the same cloaks
    lost = data.protected[-1]
    next((cache.root / "cloaks").glob(f"{whole.key[lost]}*")).unlink()
    made: list[int] = []
    protect_groups = runner.Defense.protect_groups

    def counting(self: Any, groups: Any) -> Any:
        made.append(len(groups))
        return protect_groups(self, groups)

    monkeypatch.setattr(runner.Defense, "protect_groups", counting)
    resumed = runner.cloak_all(suite, data, spec, 0, worker.models, cache, progress=False, quality_rows=None)
    assert made == [len(batch_of[lost])]  # only the batch with the lost cloak
    assert resumed.key == whole.key
    for ident in data.protected:
        assert np.array_equal(resumed.images[ident], whole.images[ident])


def test_facenet_embeds_in_batches_of_32_on_a_cpu_within_float_rounding(users: dict[str, torch.Tensor]) -> None:
    # measured 2026-12-02 (Intel Xeon, 32 celeb24 faces): batch 32 vs 8 differ by at most 9e-8 per value, 2.4e-7 in
    # cosine distance; the optimisation loops keep batch 8 (preferred_batch_size), so no cloak changes
    rec = RECOGNIZERS.create("facenet-casia")
    assert (rec.embed_batch_size, rec.preferred_batch_size) == (32, 8)
    assert RECOGNIZERS.create("sface").embed_batch_size == 8
    faces = torch.cat(list(users.values()))
    by8, by32 = rec.embed_batched(faces, batch_size=8), rec.embed_batched(faces)
    assert float((by8 - by32).abs().max()) < 1e-6
