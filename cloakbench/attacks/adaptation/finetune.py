"""Fine-tuning a white-box face extractor with PyTorch Lightning: the adaptations of DESIGN §7.

Two recipes live here.

**FaceCure's** (:class:`FaceCureFineTune`, registered as ``end-to-end`` and ``adaptive``), as
ftramer/FaceCure's ``eval_e2e.py`` and ``train_robust_features.py`` train (both call Fawkes 0.3's
``load_victim_model(..., end2end=True)``):

- every layer of the extractor is trainable and its normalisation layers run in training mode (batch
  statistics, running statistics updated), as Keras's ``fit`` runs a trainable BatchNorm;
- a new linear softmax head (weights Glorot-uniform, bias zero: Keras's ``Dense`` defaults) reads the
  extractor's raw output (``teacher_model.layers[-1].output``: Fawkes normalises outside its Keras models), not
  the unit-norm embedding; the loss is plain cross-entropy, with no other term;
- Adadelta with Keras 2.2/2.3's defaults: learning rate 1.0, rho 0.95, epsilon 1e-7, one optimizer for the
  extractor and the head;
- each batch draws ``batch_size`` identities uniformly with replacement, then one photo of each uniformly
  (FaceCure's ``DataGenerator.generate``), and flips each photo horizontally with probability 1/4 (a coin
  flip, then ``horizontal_flip``'s own rate of 1/2);
- ``epochs`` x ``steps_per_epoch`` batches (FaceCure: 10 x 500, batch 32).

The softmax tracker is scored by a recognizer of its own (:attr:`Adapted.logits`: extractor, then head, no
flip test-time augmentation), whose embeddings are the logits over their norm: dividing by a positive number
ranks the classes exactly as the softmax does, and the bench's embedding cache serves them like any other.

**Ours, anchored** (:class:`FineTune`, registered as ``end-to-end-anchored``, ``adaptive-anchored`` and
``adversarial``). One training loop serves all three (they differ in their data and in whether PGD perturbs
each batch):

- the extractor is a copy of the recognizer's module, trained whole with Adam; its normalisation layers
  stay in eval mode (running statistics frozen: a few hundred photos of a handful of identities would
  otherwise overwrite statistics estimated on millions);
- the head is a cosine softmax classifier (unit-norm class weights, logits ``scale * cos``) initialised at
  the class centroids of the original embeddings, so training starts from a sensible classifier;
- the loss is cross-entropy plus ``anchor_weight`` times the mean cosine distance between the new
  embedding of each training image and the *original* model's embedding of its clean counterpart. For a
  cloaked photo that pulls its features back to where the clean photo's were — robust retraining in
  feature space — and for a clean photo it keeps the embedding where it was, which is what keeps clean
  accuracy (FaceCure fine-tunes on far more identities than a CPU run can afford; with 20 identities the
  features of identities it never saw drift: measured with PGD cloaks, 10 photos per identity, 19 public
  identities x 3, clean top-1 1.000 -> 0.958 at weight 1 (3 epochs), -> 0.972 at weight 3 (5 epochs); at
  weight 10 a 6-photo run lost more, not less: 8 points). ``anchor_weight: 0`` gives plain cross-entropy
  fine-tuning (not measured here). In ``end-to-end-anchored`` the tracker has no clean counterpart of the
  user's cloaked photos, so their anchor is the original model's embedding of the cloak itself: the anchor
  holds the poisoned features where the cloak put them (issue 17 suspects this keeps that tracker's
  protection at 1.00 where FaceCure's end-to-end reports 0.88; not measured);
- ``adversarial``: each batch is replaced by its PGD adversarial examples (L-inf ``epsilon``, random start,
  ``attack_steps`` signed steps on the cross-entropy of the current model), Madry et al. 2018.

Runs are seeded with ``seed_everything(seed, workers=True)`` and a seeded data order, and trained weights
are cached by a hash of (adaptation config, base weights, training data, seed): the same suite never
trains twice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cloakbench.attacks.adaptation.base import (
    Adaptation,
    Adapted,
    CheckpointStore,
    TrainingData,
    TrainingSet,
    TrainReport,
    label_indices,
    require_white_box,
)
from cloakbench.attacks.recognizers.base import Recognizer, TorchRecognizer
from cloakbench.config import require, source_digest, stable_hash, to_plain

log = logging.getLogger(__name__)

ADAPT_VERSION = 1  # bump when the training loop changes in a way the config does not capture
FACECURE_VERSION = 2  # the same, for FaceCure's recipe (2: the head reads the raw features)


def training_code() -> str:
    """Digest of the adaptation package's source: part of every checkpoint key, so a model trained by older code
    is never read back as this code's."""
    return source_digest(packages=("cloakbench.attacks.adaptation",))


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    epochs: int = 5
    batch_size: int = 16  # measured on a 2-core CPU: forward+backward of SFace is fastest per image at 8-16
    lr: float = 1e-4  # Adam, extractor
    head_lr: float = 1e-2  # Adam, cosine head
    weight_decay: float = 0.0
    scale: float = 16.0  # logits = scale * cosine
    anchor_weight: float = 3.0  # see the module docstring for what was measured
    public_per_identity: int | None = 3  # adaptive/adversarial: photos per public identity used (None: all)
    epsilon: float = 8 / 255  # adversarial only: PGD budget (L-inf)
    attack_steps: int = 3  # adversarial only
    attack_step_size: float = 4 / 255  # adversarial only

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        require(self.lr > 0 and self.head_lr > 0, f"lr and head_lr must be positive, got {self.lr}, {self.head_lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.scale > 0, f"scale must be positive, got {self.scale}")
        require(self.anchor_weight >= 0, f"anchor_weight must be >= 0, got {self.anchor_weight}")
        require(
            self.public_per_identity is None or self.public_per_identity >= 1,
            f"public_per_identity must be >= 1 or null, got {self.public_per_identity}",
        )
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(self.attack_steps >= 1, f"attack_steps must be >= 1, got {self.attack_steps}")
        require(self.attack_step_size > 0, f"attack_step_size must be positive, got {self.attack_step_size}")


def data_digest(data: TrainingSet) -> str:
    """Content hash of a training set (pixels, labels, references)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.images.detach().cpu().numpy()).tobytes())
    h.update("\n".join(data.labels).encode("utf-8"))
    if data.references is not None:
        h.update(np.ascontiguousarray(data.references.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class FaceCureConfig:
    """FaceCure's training recipe; the defaults are FaceCure's sizes (``eval_e2e.py``/``train_robust_features.py``)."""

    epochs: int = 10
    steps_per_epoch: int = 500
    batch_size: int = 32
    lr: float = 1.0  # Adadelta (Keras 2.2/2.3 default)
    rho: float = 0.95  # Adadelta (Keras default)
    eps: float = 1e-7  # Adadelta (Keras's K.epsilon())
    flip_probability: float = 0.25  # np.random.randint(2), then horizontal_flip(rate=0.5)
    public_per_identity: int | None = None  # adaptive: photos per public identity (None: all, as FaceCure)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.steps_per_epoch >= 1, f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        require(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.rho < 1, f"rho must be in [0, 1), got {self.rho}")
        require(self.eps > 0, f"eps must be positive, got {self.eps}")
        require(0 <= self.flip_probability <= 1, f"flip_probability must be in [0, 1], got {self.flip_probability}")
        require(
            self.public_per_identity is None or self.public_per_identity >= 1,
            f"public_per_identity must be >= 1 or null, got {self.public_per_identity}",
        )


class ClassBalancedBatches:
    """``steps`` batches of dataset indices: ``batch_size`` classes drawn uniformly with replacement, then one
    example of each drawn uniformly among that class's examples (FaceCure's ``DataGenerator.generate``)."""

    def __init__(self, labels: torch.Tensor, *, batch_size: int, steps: int, generator: torch.Generator) -> None:
        order = torch.argsort(labels, stable=True)
        self.members = order  # dataset indices grouped by class
        self.counts = torch.bincount(labels)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.batch_size = batch_size
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        n_classes = int(self.counts.shape[0])
        for _ in range(self.steps):
            classes = torch.randint(n_classes, (self.batch_size,), generator=self.generator)
            within = (torch.rand(self.batch_size, generator=self.generator) * self.counts[classes]).long()
            yield self.members[self.offsets[classes] + within].tolist()


def checkpoint_key(config: dict[str, object], recognizer: Recognizer, data: TrainingSet, seed: int) -> str:
    """A retrained model's cache key: its adaptation config, the training code, the base weights, the training
    data's content and the seed."""
    return stable_hash(
        ("adapt", config, training_code(), recognizer.name, recognizer.weights_id, data_digest(data), seed), length=24
    )


def _stored_history(state: dict[str, torch.Tensor]) -> tuple[dict[str, float], ...]:
    return tuple(
        {"epoch": float(e), "loss": float(loss), "train_accuracy": float(acc)}
        for e, (loss, acc) in enumerate(state.get("history", torch.zeros(0, 2)).tolist())
    )


def _backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


def _checkpoint(
    backbone: torch.nn.Module, history: tuple[dict[str, float], ...], **heads: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the backbone's state (``backbone.`` keys), the head tensors and the history."""
    saved = {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}
    saved.update({k: v.detach().cpu() for k, v in heads.items()})
    saved["history"] = torch.tensor([[h["loss"], h["train_accuracy"]] for h in history], dtype=torch.float64)
    return saved


def _trained(
    name: str, rec: TorchRecognizer, backbone: torch.nn.Module, key: str, data: TrainingSet, *, n_classes: int,
    epochs: int, seen: int, seconds: float, cached: bool, history: tuple[dict[str, float], ...],
) -> tuple[TorchRecognizer, TrainReport]:  # fmt: skip
    """The retrained extractor as a recognizer of its own weights id, and the report of its training."""
    adapted = TorchRecognizer(
        name=rec.name, module=copy.deepcopy(backbone).to(rec.device), spec=rec.spec, embedding_dim=rec.embedding_dim,
        weights_id=f"{rec.weights_id}+{name}:{key}",
    )  # fmt: skip
    last = history[-1] if history else {"loss": float("nan"), "train_accuracy": float("nan")}
    report = TrainReport(
        adaptation=name, n_images=int(data.images.shape[0]), n_identities=n_classes, epochs=epochs,
        seconds=seconds, images_per_s=(seen / seconds) if not cached and seconds > 0 else float("nan"),
        cached=cached, device=str(rec.device), final_loss=float(last["loss"]),
        final_train_accuracy=float(last["train_accuracy"]), config_hash=key, history=history,
    )  # fmt: skip
    return adapted, report


def glorot_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Keras's default ``Dense`` kernel initialiser: U(-b, b) with b = sqrt(6 / (fan_in + fan_out))."""
    bound = math.sqrt(6.0 / (rows + cols))
    return (torch.rand((rows, cols), generator=generator) * 2 - 1) * bound


def _freeze_statistics(module: torch.nn.Module) -> None:
    module.eval()  # BatchNorm uses its running statistics, Dropout is off; gradients still flow


def _lightning() -> Any:
    import pytorch_lightning as pl

    return pl


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning announces devices and tips through logging and warnings; the library prints nothing."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            # on purpose: normalisation layers keep their running statistics (see the module docstring)
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fit(
    module: Any, *, seed: int, epochs: int, device: torch.device, progress: bool,
    make_loader: Callable[[], torch.utils.data.DataLoader[Any]],
) -> None:  # fmt: skip
    """Train ``module`` with Lightning, seeded, quietly, under :func:`~cloakbench.devices.deterministic`.

    Lightning's own ``deterministic="warn"`` set the same flags but left ``cudnn.benchmark`` off for the rest of
    the process and set ``CUBLAS_WORKSPACE_CONFIG`` after CUDA had started; with ``deterministic=None`` and
    ``benchmark=None`` (pytorch-lightning 2.6: "leave the flags alone") Lightning touches none of them, and the
    context restores every flag when training ends or fails."""
    from cloakbench.devices import deterministic  # at call time, as Lightning itself is imported

    pl = _lightning()
    with _quiet_lightning(), deterministic(device):
        pl.seed_everything(seed, workers=True)
        loader = make_loader()
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            deterministic=None,  # set by deterministic(device) above, and restored by it
            benchmark=None,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            use_distributed_sampler=False,  # FaceCure's class-balanced batches are the sampler
        )
        trainer.fit(module, train_dataloaders=loader)


def _module_class() -> type:
    pl = _lightning()

    class FaceFineTuner(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Extractor + cosine head; cross-entropy + anchor loss; optional PGD on every batch."""

        def __init__(
            self, recognizer: TorchRecognizer, centroids: torch.Tensor, config: FineTuneConfig, *,
            adversarial: bool, seed: int,
        ) -> None:  # fmt: skip
            super().__init__()
            self.preprocess_spec = recognizer  # preprocess() only reads the input spec
            self.backbone = copy.deepcopy(recognizer.module)
            for p in self.backbone.parameters():
                p.requires_grad_(True)
            self.head = torch.nn.Parameter(centroids.clone())
            self.config = config
            self.adversarial = adversarial
            self.attack_generator = torch.Generator().manual_seed(seed)
            self.history: list[dict[str, float]] = []
            self._epoch: list[tuple[float, float, int]] = []

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.backbone(self.preprocess_spec.preprocess(x)), dim=1)

        def logits(self, emb: torch.Tensor) -> torch.Tensor:
            return self.config.scale * emb @ F.normalize(self.head, dim=1).T

        def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """PGD (L-inf, random start) on the cross-entropy of the current model; parameters get no gradient."""
            cfg = self.config
            noise = torch.rand(x.shape, generator=self.attack_generator).to(x.device)
            adv = (x + (noise * 2 - 1) * cfg.epsilon).clamp(0, 1)
            for _ in range(cfg.attack_steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(self.logits(self.embed(adv)), y)
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = adv + cfg.attack_step_size * grad.sign()
                    adv = (x + (adv - x).clamp(-cfg.epsilon, cfg.epsilon)).clamp(0, 1)
            return adv.detach()

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
            x, y, ref = batch
            if self.adversarial:
                x = self.perturb(x, y)
            emb = self.embed(x)
            logits = self.logits(emb)
            loss = F.cross_entropy(logits, y)
            if self.config.anchor_weight > 0:
                loss = loss + self.config.anchor_weight * (1 - (emb * ref).sum(dim=1)).mean()
            correct = float((logits.argmax(dim=1) == y).float().sum())
            self._epoch.append((float(loss.detach()) * x.shape[0], correct, x.shape[0]))
            return loss

        def on_train_epoch_start(self) -> None:
            _freeze_statistics(self.backbone)
            self._epoch = []

        def on_train_epoch_end(self) -> None:
            n = sum(e[2] for e in self._epoch)
            self.history.append(
                {"epoch": float(len(self.history)), "loss": sum(e[0] for e in self._epoch) / max(n, 1),
                 "train_accuracy": sum(e[1] for e in self._epoch) / max(n, 1)}
            )  # fmt: skip

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(
                [
                    {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": self.config.lr},
                    {"params": [self.head], "lr": self.config.head_lr},
                ],
                weight_decay=self.config.weight_decay,
            )

    return FaceFineTuner


class FineTune(Adaptation):
    """End-to-end, adaptive or adversarial fine-tuning (which one is set by ``training_data`` and ``adversarial``)."""

    def __init__(self, config: FineTuneConfig, *, name: str, training_data: TrainingData, adversarial: bool) -> None:
        self.config = config
        self.name = name
        self.training_data = training_data
        self.adversarial = adversarial

    def config_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "training_data": self.training_data.value, "adversarial": self.adversarial,
            "config": to_plain(self.config), "version": ADAPT_VERSION,
        }  # fmt: skip

    def checkpoint_key(self, recognizer: Recognizer, data: TrainingSet, seed: int) -> str:
        return checkpoint_key(self.config_dict(), recognizer, data, seed)

    def adapt(
        self, recognizer: Recognizer, data: TrainingSet, *, seed: int, checkpoints: CheckpointStore | None = None,
        progress: bool = False,
    ) -> Adapted:  # fmt: skip
        rec = require_white_box(recognizer, self.name)
        cfg = self.config
        key = self.checkpoint_key(rec, data, seed)
        classes, y = label_indices(data.labels)
        references = data.references if data.references is not None else data.images
        ref_emb = rec.embed_batched(references)  # the original model's view of the clean counterparts
        centroids = torch.stack([F.normalize(ref_emb[y == c].mean(dim=0), dim=0) for c in range(len(classes))])

        module = _module_class()(rec, centroids, cfg, adversarial=self.adversarial, seed=seed)
        state = checkpoints.load(key) if checkpoints is not None else None
        cached = state is not None
        start = time.perf_counter()
        if state is not None:
            module.backbone.load_state_dict(_backbone_state(state))
            module.head.data.copy_(state["head"])
            history = _stored_history(state)
        else:
            _fit(
                module, seed=seed, epochs=cfg.epochs, device=rec.device, progress=progress,
                make_loader=lambda: torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(data.images.cpu(), y, ref_emb),
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(seed),
                    num_workers=0,
                ),
            )  # fmt: skip
            history = tuple(module.history)
            if checkpoints is not None:
                checkpoints.save(key, _checkpoint(module.backbone, history, head=module.head))
        adapted, report = _trained(
            self.name, rec, module.backbone, key, data, n_classes=len(classes), epochs=cfg.epochs,
            seen=data.images.shape[0] * cfg.epochs, seconds=time.perf_counter() - start, cached=cached,
            history=history,
        )  # fmt: skip
        return Adapted(recognizer=adapted, classes=classes, head=module.head.detach().cpu(), report=report)


def _facecure_module_class() -> type:
    pl = _lightning()

    class FaceCureTuner(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Extractor (BatchNorm in training mode) + linear softmax head; plain cross-entropy; Adadelta."""

        def __init__(self, recognizer: TorchRecognizer, n_classes: int, config: FaceCureConfig, *, seed: int) -> None:
            super().__init__()
            self.preprocess_spec = recognizer  # preprocess() only reads the input spec
            self.backbone = copy.deepcopy(recognizer.module)
            for p in self.backbone.parameters():
                p.requires_grad_(True)
            init = torch.Generator().manual_seed(seed)
            self.head = torch.nn.Linear(recognizer.embedding_dim, n_classes)
            with torch.no_grad():
                self.head.weight.copy_(glorot_uniform(n_classes, recognizer.embedding_dim, init))
                self.head.bias.zero_()
            self.config = config
            self.flip_generator = torch.Generator().manual_seed(seed + 1)
            self.history: list[dict[str, float]] = []
            self._epoch: list[tuple[float, float, int]] = []

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """The extractor's raw output, what FaceCure's ``Dense`` head reads (no normalisation)."""
            out: torch.Tensor = self.backbone(self.preprocess_spec.preprocess(x))
            return out

        def augment(self, x: torch.Tensor) -> torch.Tensor:
            """Flip each photo left-right with probability ``flip_probability`` (seeded)."""
            flip = torch.rand(x.shape[0], generator=self.flip_generator) < self.config.flip_probability
            return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.head(self.features(self.augment(x)))
            loss = F.cross_entropy(logits, y)
            correct = float((logits.argmax(dim=1) == y).float().sum())
            self._epoch.append((float(loss.detach()) * x.shape[0], correct, x.shape[0]))
            return loss

        def on_train_epoch_start(self) -> None:
            self.backbone.train()  # batch statistics; running statistics updated (Keras's fit on a trainable BN)
            self._epoch = []

        def on_train_epoch_end(self) -> None:
            n = sum(e[2] for e in self._epoch)
            self.history.append(
                {"epoch": float(len(self.history)), "loss": sum(e[0] for e in self._epoch) / max(n, 1),
                 "train_accuracy": sum(e[1] for e in self._epoch) / max(n, 1)}
            )  # fmt: skip

        def configure_optimizers(self) -> torch.optim.Optimizer:
            cfg = self.config
            return torch.optim.Adadelta(self.parameters(), lr=cfg.lr, rho=cfg.rho, eps=cfg.eps)

    return FaceCureTuner


class FaceCureFineTune(Adaptation):
    """FaceCure's end-to-end tracker (``eval_e2e.py``) or robust extractor (``train_robust_features.py``):
    which one is set by ``training_data`` (see the module docstring for the recipe)."""

    def __init__(self, config: FaceCureConfig, *, name: str, training_data: TrainingData) -> None:
        self.config = config
        self.name = name
        self.training_data = training_data

    def config_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "recipe": "facecure", "training_data": self.training_data.value,
            "config": to_plain(self.config), "version": FACECURE_VERSION,
        }  # fmt: skip

    def checkpoint_key(self, recognizer: Recognizer, data: TrainingSet, seed: int) -> str:
        return checkpoint_key(self.config_dict(), recognizer, data, seed)

    def adapt(
        self, recognizer: Recognizer, data: TrainingSet, *, seed: int, checkpoints: CheckpointStore | None = None,
        progress: bool = False,
    ) -> Adapted:  # fmt: skip
        rec = require_white_box(recognizer, self.name)
        cfg = self.config
        key = self.checkpoint_key(rec, data, seed)
        classes, y = label_indices(data.labels)
        module = _facecure_module_class()(rec, len(classes), cfg, seed=seed)
        state = checkpoints.load(key) if checkpoints is not None else None
        cached = state is not None
        start = time.perf_counter()
        if state is not None:
            module.backbone.load_state_dict(_backbone_state(state))
            module.head.weight.data.copy_(state["head.weight"])
            module.head.bias.data.copy_(state["head.bias"])
            history = _stored_history(state)
        else:
            _fit(
                module, seed=seed, epochs=cfg.epochs, device=rec.device, progress=progress,
                make_loader=lambda: torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(data.images.cpu(), y),
                    batch_sampler=ClassBalancedBatches(
                        y, batch_size=cfg.batch_size, steps=cfg.steps_per_epoch,
                        generator=torch.Generator().manual_seed(seed),
                    ),
                    num_workers=0,
                ),
            )  # fmt: skip
            history = tuple(module.history)
            if checkpoints is not None:
                head = module.head
                checkpoints.save(
                    key, _checkpoint(module.backbone, history, **{"head.weight": head.weight, "head.bias": head.bias})
                )
        adapted, report = _trained(
            self.name, rec, module.backbone, key, data, n_classes=len(classes), epochs=cfg.epochs,
            seen=cfg.epochs * cfg.steps_per_epoch * cfg.batch_size, seconds=time.perf_counter() - start,
            cached=cached, history=history,
        )  # fmt: skip
        return Adapted(
            recognizer=adapted, classes=classes, head=module.head.weight.detach().cpu(), report=report,
            bias=module.head.bias.detach().cpu(), logits=_logits_recognizer(adapted, module.head),
        )  # fmt: skip


def _logits_recognizer(adapted: TorchRecognizer, head: torch.nn.Linear) -> TorchRecognizer:
    """The end-to-end model up to its softmax, as a recognizer: its embedding of a photo is the head's logits
    on the extractor's raw output, over their norm (the same ranking of classes as the softmax). Evaluated as
    FaceCure evaluates the model: no flip test-time augmentation."""
    module = torch.nn.Sequential(copy.deepcopy(adapted.module), copy.deepcopy(head).to(adapted.device))
    return TorchRecognizer(
        name=f"{adapted.name}-softmax", module=module, spec=dataclasses.replace(adapted.spec, flip_tta=False),
        embedding_dim=head.out_features, weights_id=f"{adapted.weights_id}:softmax",
    )  # fmt: skip
