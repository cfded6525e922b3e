"""FaceCure's trackers as FaceCure trains them (issue 17, item 5), and our anchored loop under its own names.

FaceCure (ftramer/FaceCure ``eval_e2e.py``, ``train_robust_features.py``) fine-tunes through Fawkes 0.3's
``load_victim_model(..., end2end=True)``: every layer trainable (BatchNorm in training mode under Keras's
``fit``), a new ``Dense`` softmax head, categorical cross-entropy, Keras's ``Adadelta()`` (lr 1.0, rho 0.95,
epsilon 1e-7), class-balanced batches of 32 with random horizontal flips, 10 epochs x 500 steps. The robust
extractor trains on public identities' clean photos plus their cloaks by every attack (Fawkes v1.0, LowKey,
Fawkes v0.3), each labelled with its identity. Each test below fails on the code before this change (the
names ``end-to-end``/``adaptive`` then ran the anchored Adam loop with frozen statistics, and ``adaptive``
trained on the cell's own defense only).

The extractor here is a tiny convolutional module (fast); the real-face runs are in tests/test_adaptation.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cloakbench.attacks.adaptation import (
    ADAPTATIONS,
    Adaptation,
    Adapted,
    FileCheckpoints,
    TrainingData,
    TrainingSet,
    TrainReport,
)
from cloakbench.attacks.adaptation.finetune import (
    ClassBalancedBatches,
    FaceCureConfig,
    FaceCureFineTune,
    FineTune,
    FineTuneConfig,
    _facecure_module_class,
)
from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, Recognizer, TorchRecognizer
from cloakbench.bench.suite import parse_suite
from cloakbench.bench.views import Retrained, training_defenses

SIZE = 16


def tiny_recognizer(seed: int = 0) -> TorchRecognizer:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 8),
    )  # fmt: skip
    spec = InputSpec(
        size=(SIZE, SIZE), channel_order=ChannelOrder.RGB, scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        alignment=Alignment.NONE,
    )  # fmt: skip
    return TorchRecognizer(name="tiny", module=module, spec=spec, embedding_dim=8, weights_id="tiny-0")


def bn_mean(rec: TorchRecognizer) -> torch.Tensor:
    bn = rec.module[1]  # type: ignore[index]
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None
    return bn.running_mean


def tiny_set(n_per_class: int = 4, classes: int = 3, seed: int = 0) -> TrainingSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n_per_class * classes, 3, SIZE, SIZE), generator=g)
    labels = tuple(f"id{c}" for c in range(classes) for _ in range(n_per_class))
    return TrainingSet(images=images, labels=labels)


def test_facecure_entries_carry_facecure_numbers() -> None:
    """-full is FaceCure's sizes; the CPU entry is the same recipe with fewer batches and public photos."""
    full = ADAPTATIONS.create("end-to-end-full")
    assert isinstance(full, FaceCureFineTune) and full.training_data is TrainingData.ENROLLMENT
    # eval_e2e.py:255-256,281-282 (steps_per_epoch=500, --n_epochs 10, --batch-size 32); Keras Adadelta defaults
    assert (full.config.epochs, full.config.steps_per_epoch, full.config.batch_size) == (10, 500, 32)
    assert (full.config.lr, full.config.rho, full.config.eps) == (1.0, 0.95, 1e-7)
    assert full.config.flip_probability == 0.25 and full.config.public_per_identity is None
    cpu = ADAPTATIONS.create("end-to-end")
    assert isinstance(cpu, FaceCureFineTune)
    assert cpu.config == FaceCureConfig(epochs=1, steps_per_epoch=50, public_per_identity=3)
    adaptive = ADAPTATIONS.create("adaptive")
    assert isinstance(adaptive, FaceCureFineTune) and adaptive.training_data is TrainingData.PUBLIC_CLOAKED_ALL
    adaptive_full = ADAPTATIONS.create("adaptive-full")
    assert isinstance(adaptive_full, FaceCureFineTune) and adaptive_full.config == FaceCureConfig()


def test_anchored_names_keep_the_old_loop() -> None:
    for name, data in (
        ("end-to-end-anchored", TrainingData.ENROLLMENT),
        ("adaptive-anchored", TrainingData.PUBLIC_CLOAKED),
    ):
        a = ADAPTATIONS.create(name)
        assert isinstance(a, FineTune) and a.training_data is data and not a.adversarial
        assert a.config == FineTuneConfig()  # Adam 1e-4, anchor weight 3, 5 epochs of 16: as before
    full = ADAPTATIONS.create("adaptive-anchored-full")
    assert isinstance(full, FineTune) and full.config.epochs == 20
    assert isinstance(ADAPTATIONS.create("adversarial"), FineTune)


def test_loss_is_plain_cross_entropy_of_a_new_linear_head() -> None:
    rec = tiny_recognizer()
    module = _facecure_module_class()(rec, 3, FaceCureConfig(flip_probability=0.0), seed=0)
    assert isinstance(module.head, torch.nn.Linear) and module.head.bias is not None
    assert torch.count_nonzero(module.head.bias) == 0  # Keras Dense: zero bias
    bound = (6 / (8 + 3)) ** 0.5  # Keras Dense: Glorot uniform
    assert module.head.weight.abs().max() <= bound and module.head.weight.abs().max() > bound / 2
    x = torch.rand((5, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    module.backbone.train()  # batch statistics, as in training: both forwards below see the same batch
    loss = module.training_step((x, y), 0)
    feats = module.backbone(rec.preprocess(x))  # the raw output: FaceCure's Dense reads layers[-1].output
    assert not torch.allclose(feats.norm(dim=1), torch.ones(5))  # (so the test can tell raw from unit-norm)
    expected = F.cross_entropy(feats @ module.head.weight.T + module.head.bias, y)
    torch.testing.assert_close(loss, expected)  # nothing else: no anchor term, no scale, no normalisation


def test_optimizer_is_keras_adadelta() -> None:
    """One step of the optimizer equals Keras 2.3's Adadelta update written out (lr 1.0, rho 0.95, eps 1e-7)."""
    rec = tiny_recognizer()
    module = _facecure_module_class()(rec, 3, FaceCureConfig(), seed=0)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adadelta)
    assert {id(p) for group in opt.param_groups for p in group["params"]} == {id(p) for p in module.parameters()}
    p = module.head.bias
    before = p.detach().clone()
    g = torch.tensor([0.3, -2.0, 1e-3])
    for q in module.parameters():
        q.grad = torch.zeros_like(q)
    p.grad = g.clone()
    opt.step()
    a = 0.05 * g**2  # accumulator: rho * 0 + (1 - rho) g^2
    update = g * (0.0 + 1e-7) ** 0.5 / (a + 1e-7) ** 0.5  # sqrt(delta accumulator + eps) / sqrt(a + eps) * g
    torch.testing.assert_close(p.detach(), before - 1.0 * update)


def test_batchnorm_statistics_move_in_facecure_and_stay_in_anchored() -> None:
    rec = tiny_recognizer()
    data = tiny_set()
    bn_before = bn_mean(rec).clone()
    faithful = ADAPTATIONS.create("end-to-end", epochs=1, steps_per_epoch=2, batch_size=4).adapt(rec, data, seed=0)
    assert not torch.allclose(bn_mean(faithful.recognizer), bn_before)  # training mode
    anchored = ADAPTATIONS.create("end-to-end-anchored", epochs=1, batch_size=4).adapt(rec, data, seed=0)
    assert torch.equal(bn_mean(anchored.recognizer), bn_before)  # frozen, as before
    assert torch.equal(bn_mean(rec), bn_before)  # the original is untouched
    assert faithful.bias is not None and anchored.bias is None
    assert faithful.report.history[-1]["loss"] > 0


def test_facecure_training_is_seeded() -> None:
    rec = tiny_recognizer()
    data = tiny_set()
    adaptation = ADAPTATIONS.create("end-to-end", epochs=1, steps_per_epoch=2, batch_size=4)
    x = data.images[:4]
    first, again = (adaptation.adapt(rec, data, seed=5).recognizer.embed(x) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(adaptation.adapt(rec, data, seed=6).recognizer.embed(x), first)


def test_facecure_checkpoint_is_reused_and_keyed_apart_from_the_anchored_loop(tmp_path: Path) -> None:
    rec = tiny_recognizer()
    data = tiny_set()
    adaptation = ADAPTATIONS.create("end-to-end", epochs=1, steps_per_epoch=2, batch_size=4)
    first = adaptation.adapt(rec, data, seed=0, checkpoints=FileCheckpoints(tmp_path))
    store = FileCheckpoints(tmp_path)
    cached = adaptation.adapt(rec, data, seed=0, checkpoints=store)
    assert store.hits == 1 and cached.report.cached
    x = data.images[:4]
    assert torch.equal(first.recognizer.embed(x), cached.recognizer.embed(x))
    assert first.bias is not None and cached.bias is not None and torch.equal(first.bias, cached.bias)
    anchored = ADAPTATIONS.create("end-to-end-anchored", epochs=1, batch_size=4)
    assert isinstance(adaptation, FaceCureFineTune) and isinstance(anchored, FineTune)
    assert adaptation.checkpoint_key(rec, data, 0) != anchored.checkpoint_key(rec, data, 0)


def test_flip_augmentation_is_random_horizontal_with_probability_a_quarter() -> None:
    module = _facecure_module_class()(tiny_recognizer(), 3, FaceCureConfig(), seed=0)
    x = torch.rand((2000, 3, 2, 3), generator=torch.Generator().manual_seed(0))
    out = module.augment(x)
    flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert bool((flipped | kept).all())  # each photo is itself or its left-right mirror
    assert 0.22 < float(flipped.float().mean()) < 0.28  # 1/2 (randint(2)) x 1/2 (horizontal_flip's rate)
    again = _facecure_module_class()(tiny_recognizer(), 3, FaceCureConfig(), seed=0).augment(x)
    assert torch.equal(again, out)  # seeded


def test_batches_draw_identities_uniformly_then_a_photo() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)  # FaceCure draws identities, not photos: 50/50, not 90/10
    batches = list(ClassBalancedBatches(labels, batch_size=32, steps=40, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 40 and all(len(b) == 32 for b in batches)
    drawn = labels[torch.tensor(batches).flatten()]
    assert 0.45 < float((drawn == 1).float().mean()) < 0.55
    minority = {i for b in batches for i in b if i >= 90}
    assert len(minority) == 10  # every photo of the small identity gets drawn


def test_softmax_is_scored_on_the_raw_features_through_the_logits_recognizer() -> None:
    """The end-to-end tracker's scores are its head's logits on the extractor's raw output (over their norm,
    which ranks classes as the softmax does), evaluated without flip test-time augmentation."""
    rec = tiny_recognizer()
    data = tiny_set()
    adapted = ADAPTATIONS.create("end-to-end", epochs=1, steps_per_epoch=3, batch_size=4).adapt(rec, data, seed=0)
    assert adapted.logits is not None and adapted.bias is not None
    x = data.images
    with torch.no_grad():
        raw = adapted.recognizer.module(rec.preprocess(x))
        logits = raw @ adapted.head.T + adapted.bias
    scores = adapted.logits.embed(x)
    torch.testing.assert_close(scores, F.normalize(logits, dim=1), atol=1e-5, rtol=0)
    assert torch.equal(scores.argsort(dim=1), logits.argsort(dim=1))
    assert adapted.logits.weights_id != adapted.recognizer.weights_id and not adapted.logits.spec.flip_tta
    with pytest.raises(ValueError, match="logits"):
        adapted.head_scores(np.zeros((1, 8), dtype=np.float32))
    cosine = Adapted(
        recognizer=rec, classes=("a", "b"), head=torch.tensor([[2.0, 0.0], [0.0, 1.0]]), report=_report()
    )  # fmt: skip
    np.testing.assert_allclose(cosine.head_scores(np.array([[0.6, 0.8]], dtype=np.float32)), [[0.6, 0.8]])


def _report() -> TrainReport:
    return TrainReport(
        adaptation="x", n_images=0, n_identities=0, epochs=0, seconds=0.0, images_per_s=0.0, cached=False,
        device="cpu", final_loss=0.0, final_train_accuracy=0.0, config_hash="",
    )  # fmt: skip


class _Recording(Adaptation):
    """Records the training sets it is given instead of training."""

    def __init__(self, training_data: TrainingData) -> None:
        self.name = "recording"
        self.training_data = training_data
        self.seen: list[TrainingSet] = []

    def adapt(self, recognizer: Recognizer, data: TrainingSet, *, seed: int, checkpoints: Any = None,
              progress: bool = False) -> Adapted:  # fmt: skip
        self.seen.append(data)
        assert isinstance(recognizer, TorchRecognizer)
        return Adapted(recognizer=recognizer, classes=(), head=torch.zeros(0, 8), report=_report())

    def config_dict(self) -> dict[str, object]:
        return {}


def _provider(training_data: TrainingData) -> tuple[Retrained, _Recording, list[str]]:
    """Five identities x 2 enrollment photos + 1 query (one protected); each defense's 'cloak' is the photo plus a
    constant."""
    images = torch.rand((15, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) * 0.5
    idents = ("p", "q", "r", "s", "t")
    data = SimpleNamespace(
        images=images, labels=tuple(i for i in idents for _ in range(2)) + idents,
        train={i: np.array([2 * n, 2 * n + 1]) for n, i in enumerate(idents)},
        query={i: np.array([10 + n]) for n, i in enumerate(idents)}, protected=("p",),
        all_train=np.arange(10), all_query=np.arange(10, 15),
    )  # fmt: skip
    offsets = {"fawkes": 0.1, "lowkey": 0.2, "noise": 0.3}
    calls: list[str] = []

    def cloak(spec: Any, identities: tuple[str, ...], per: int | None) -> dict[str, np.ndarray]:
        calls.append(spec.label)
        out = {}
        for i in identities:
            idx = data.train[i][:per] if per else data.train[i]
            out[i] = ((images[idx] + offsets[spec.label]).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return out

    adaptation = _Recording(training_data)
    specs = [SimpleNamespace(label=label, cloaked_count=lambda n: n) for label in offsets]
    provider = Retrained(
        tiny_recognizer(), adaptation, data, seed=0, cloak=cloak, checkpoints=None,  # type: ignore[arg-type]
        embed=lambda rec, idx: np.zeros((len(idx), 8), dtype=np.float32), defenses=specs,
    )  # fmt: skip
    provider.specs = specs  # type: ignore[attr-defined]
    return provider, adaptation, calls


def test_adaptive_trains_once_on_clean_photos_and_every_defenses_cloaks() -> None:
    provider, adaptation, calls = _provider(TrainingData.PUBLIC_CLOAKED_ALL)
    specs = provider.specs  # type: ignore[attr-defined]
    views = [provider.cloaked(s, "p") for s in specs] + [provider.clean(s) for s in specs]
    assert len(adaptation.seen) == 1 and all(v is views[0] for v in views)  # one model for every defense
    (training,) = adaptation.seen
    public = ("q", "r", "s", "t")  # the protected user's photos are never trained on
    assert training.labels == tuple(i for i in public for _ in range(2)) * 4  # clean + 3 defenses, true labels
    clean = training.images[:8]
    for k, offset in enumerate((0.1, 0.2, 0.3), start=1):
        torch.testing.assert_close(training.images[8 * k : 8 * (k + 1)], clean + offset, atol=1 / 255, rtol=0)
    assert sorted(calls) == ["fawkes", "lowkey", "noise"]


def test_adaptive_end_to_end_trains_on_the_enrollment_set_plus_every_defenses_public_cloaks() -> None:
    """FaceCure's eval_e2e.py --robust: the user's cloaks in the enrollment set, and each public identity's
    training photos also cloaked by every defense, labelled with their identity; one model per defense and user,
    and a softmax head over the enrollment set's identities."""
    provider, adaptation, _ = _provider(TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL)
    specs = provider.specs  # type: ignore[attr-defined]
    assert TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL.end_to_end and not TrainingData.PUBLIC_CLOAKED_ALL.end_to_end
    provider.cloaked(specs[1], "p")  # lowkey's cloaks of the protected user
    (training,) = adaptation.seen
    enrollment = tuple(i for i in ("p", "q", "r", "s", "t") for _ in range(2))
    public = tuple(i for i in ("q", "r", "s", "t") for _ in range(2))
    assert training.labels == enrollment + public * 3  # the enrollment set, then 3 defenses' public cloaks
    images = provider.data.images
    torch.testing.assert_close(training.images[:2], images[:2] + 0.2, atol=1 / 255, rtol=0)  # p: cloaked
    torch.testing.assert_close(training.images[2:10], images[2:10])  # the others: clean, as scraped
    for k, offset in enumerate((0.1, 0.2, 0.3)):
        start = 10 + 8 * k
        torch.testing.assert_close(training.images[start : start + 8], images[2:10] + offset, atol=1 / 255, rtol=0)
    provider.cloaked(specs[0], "p")
    provider.clean(specs[0])
    assert len(adaptation.seen) == 3  # one model per (defense, user), and one with no user cloaked
    assert adaptation.seen[2].labels == enrollment + public * 3
    torch.testing.assert_close(adaptation.seen[2].images[:10], images[:10])
    assert ADAPTATIONS.create("adaptive-end-to-end").training_data is TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL
    assert ADAPTATIONS.create("adaptive-end-to-end-full").config == FaceCureConfig()


def test_adaptive_anchored_trains_per_defense_on_its_own_cloaks() -> None:
    provider, adaptation, _ = _provider(TrainingData.PUBLIC_CLOAKED)
    specs = provider.specs  # type: ignore[attr-defined]
    provider.cloaked(specs[0], "p")
    provider.cloaked(specs[1], "p")
    assert len(adaptation.seen) == 2
    first = adaptation.seen[0]
    assert len(first.labels) == 16  # clean + the cell's defense only
    torch.testing.assert_close(first.images[8:], first.images[:8] + 0.1, atol=1 / 255, rtol=0)


@pytest.mark.parametrize("bad", [{"steps_per_epoch": 0}, {"rho": 1.0}, {"flip_probability": 1.5}, {"eps": 0}])
def test_facecure_config_is_validated(bad: dict[str, Any]) -> None:
    from cloakbench.errors import ConfigError

    with pytest.raises(ConfigError):
        ADAPTATIONS.create("end-to-end", **bad)


def test_adaptive_trains_on_each_set_of_cloaks_once(celeb24_root: Path) -> None:
    """Entries that share cloaks (same defense and parameters; another label or cloak_fraction) count once, and
    a defense whose cloaking failed is left out (runner._evaluate passes these to the adaptive tracker)."""
    suite = parse_suite(
        {
            "name": "t", "dataset": {"source": "folder", "path": str(celeb24_root)}, "recognizers": ["sface"],
            "defenses": [
                {"name": "noise", "params": {"epsilon": 0.05}},
                {"name": "noise", "label": "noise-half", "params": {"epsilon": 0.05}, "cloak_fraction": 0.5},
                {"name": "noise", "label": "noise-0.1", "params": {"epsilon": 0.1}},
                {"name": "pgd", "surrogates": ["sface"]},
            ],
            "countermeasures": ["adaptive"],
        },
        where="test",
    )  # fmt: skip
    chosen = training_defenses(suite.defenses, suite.cloak_source, lambda d: True)
    assert [d.label for d in chosen] == ["noise", "noise-0.1", "pgd"]
    chosen = training_defenses(suite.defenses, suite.cloak_source, lambda d: d.label != "pgd")
    assert [d.label for d in chosen] == ["noise", "noise-0.1"]
