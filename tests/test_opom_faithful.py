"""OPOM as its authors' code runs it (zhongyy/OPOM@6a81c658384d, code/generation/attack/privacy.py, the published
code/generation/gen_privacy_*.sh configurations and code/evaluation/test_privacy.py).

The reference loops below are written out independently of cloakbench, on 0..255 pixels as the original, with
the affine hull solved from its constrained least-squares (KKT) system as the original's cvxpy problem states it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, TorchRecognizer
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.runner import CellWorker, cloak_all, derive_seed, make_defense, run_suite
from cloakbench.bench.suite import Suite, parse_suite
from cloakbench.config import build
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.opom import (
    OPOM,
    OPOMConfig,
    Subspace,
    Update,
    conv_dropout,
    convex_hull_projection,
    unseen_photo_ranks,
)
from cloakbench.errors import ConfigError


def _toy() -> TorchRecognizer:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6))
    spec = InputSpec(size=(8, 8), channel_order=ChannelOrder.RGB, scale=1.0, mean=(0.0, 0.0, 0.0),
                     std=(1.0, 1.0, 1.0), alignment=Alignment.NONE)  # fmt: skip
    return TorchRecognizer(name="toy", module=module, spec=spec, embedding_dim=6)


def _photos(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 0.2 + 0.6 * torch.rand((n, 3, 8, 8), generator=g)  # away from 0 and 1: no clipping anywhere


def _affine_projection(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """privacy.py affine_hull_cvx: min ||A x - y||^2 s.t. sum(x) = 1, A the clean unit features as columns."""
    a64, y64 = a.double(), y.double()
    n = a64.shape[1]
    kkt = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    kkt[:n, :n] = 2 * a64.T @ a64
    kkt[:n, n] = 1
    kkt[n, :n] = 1
    rhs = torch.cat([2 * a64.T @ y64, torch.ones((1, y64.shape[1]), dtype=torch.float64)])
    x = torch.linalg.solve(kkt, rhs)[:n]
    out: torch.Tensor = (a64 @ x).float()
    return out


def _reference(
    module: nn.Module, data: torch.Tensor, noise: torch.Tensor, *, steps: int, momentum: bool
) -> torch.Tensor:
    """FIM.process (momentum False) or DFANet_MFIM.process without dropout (momentum True), affine hull."""

    def features(x255: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module(x255 / 255)
        return out

    eps, alpha = 8.0, 1.0
    n_feature = features(data).detach()
    data_adv = data + noise
    total = torch.zeros_like(data)
    eta = torch.zeros_like(data[:1])
    for _ in range(steps):
        data_adv = data_adv.detach().requires_grad_(True)
        adv = features(data_adv)
        y = (adv / adv.norm(dim=1, keepdim=True)).T
        a = (n_feature / n_feature.norm(dim=1, keepdim=True)).T
        loss = F.mse_loss(_affine_projection(y.detach(), a), y)  # Loss = -DIS = +MSE
        (grad,) = torch.autograd.grad(loss, data_adv)
        if momentum:
            norm = grad.abs()
            for dim in range(3):
                norm = norm.mean(dim, keepdim=True)
            total = total + grad / norm
            data_adv = data_adv.detach() + alpha * total.sign()
        else:
            data_adv = data_adv.detach() + alpha * grad.mean(0, keepdim=True).sign()
        eta = (data_adv - data).mean(0, keepdim=True).clamp(-eps, eps)
        data_adv = (data + eta).clamp(0, 255)
    return eta / 255


@pytest.mark.parametrize("update", [Update.IFGSM, Update.MIFGSM])
def test_the_mask_follows_the_original_update(update: Update) -> None:
    toy, photos = _toy(), _photos()
    steps = 4
    opom = OPOM(OPOMConfig(steps=steps, update=update), surrogates=[toy])
    mask = opom.fit(photos, generator=torch.Generator().manual_seed(0))
    # the same start noise the defense draws first from its generator: every photo its own U(-8/255, 8/255)
    noise = (2 * torch.rand(photos.shape, generator=torch.Generator().manual_seed(0)) - 1) * 8
    ref = _reference(toy.module, photos * 255, noise, steps=steps, momentum=update is Update.MIFGSM)
    assert mask.shape == (1, 3, 8, 8)
    same = (mask - ref).abs() < 1e-6
    # float rounding may flip the sign of a near-zero gradient component: allow a handful of pixels (measured: 0
    # of 192 differ for both updates); the old cloakbench loop (momentum 0.9 on the sign of the summed gradient,
    # unsquared distances, one shared random start) differs on most pixels
    assert float(same.float().mean()) > 0.97, float(same.float().mean())
    assert float(mask.abs().max()) <= 8 / 255 + 1e-7


def test_presets_are_the_published_configurations() -> None:
    def config(name: str) -> OPOMConfig:
        entry = DEFENSES.get(name)
        params = {k: v for k, v in entry.defaults.items() if k not in entry.runtime_args}
        return build(OPOMConfig, params, where=name)

    base = config("opom")  # gen_privacy_*.sh: --alpha 8 --round 16 --base 1 --DFANet 0 --loss_type 8
    assert (base.epsilon, base.steps, base.step_size) == (8 / 255, 16, 1 / 255)
    assert (base.update, base.subspace, base.dropout) == (Update.IFGSM, Subspace.AFFINE, 0.0)
    assert config("opom-center").subspace is Subspace.CENTER  # --loss_type 7
    convex = config("opom-convex")  # --loss_type 9 --nter 5
    assert (convex.subspace, convex.centre_steps, convex.steps) == (Subspace.CONVEX, 5, 16)
    mi = config("opom-mifgsm-100")  # --round 100 --base 0 --DFANet 1 (droprate 0.1), momentum accumulates (mu 1)
    assert (mi.update, mi.steps, mi.momentum, mi.dropout, mi.epsilon) == (Update.MIFGSM, 100, 1.0, 0.1, 8 / 255)


def test_convex_hull_projection_solves_the_originals_problem() -> None:
    g = torch.Generator().manual_seed(0)
    points = F.normalize(torch.randn((6, 5), generator=g), dim=1)
    queries = F.normalize(torch.randn((3, 5), generator=g), dim=1)
    ours = convex_hull_projection(queries, points)
    a = points.double().numpy()
    for q, p in zip(queries.double().numpy(), ours.double().numpy(), strict=True):

        def objective(c: np.ndarray, q: np.ndarray = q) -> float:
            return float(np.sum((c @ a - q) ** 2))

        res = minimize(objective, np.full(6, 1 / 6), method="SLSQP", bounds=[(0.0, 1.0)] * 6,
                       constraints=[{"type": "eq", "fun": lambda c: c.sum() - 1}],
                       options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
        assert np.sum((p - q) ** 2) <= res.fun + 1e-7
        assert np.abs(p - res.x @ a).max() < 1e-4


def test_dfanet_drops_out_every_convolution_while_active() -> None:
    toy, x = _toy(), _photos(2)
    clean = toy.embed(x)
    with conv_dropout([toy], 0.5, torch.Generator().manual_seed(0)):
        first, second = toy.embed(x), toy.embed(x)
        raw = next(iter(toy.module.children()))(x)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    assert 0.3 < float((raw == 0).float().mean()) < 0.7  # half of the conv's outputs zeroed (the rest doubled)
    assert torch.equal(toy.embed(x), clean)  # the hooks are gone afterwards


def test_unseen_photo_ranks_follow_test_privacy() -> None:
    # two test photos of the user (masked and clean) and two distractors, as unit vectors in 2-d
    clean = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    masked = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    distractors = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    # pair (0, 1): masked 0 vs clean 1 scores 0.8, distractors 0.6 / -0.8 -> rank 1
    # pair (1, 0): masked 1 vs clean 0 scores 0.8, distractors -0.6 / 0.8 -> a tie counts against the user: rank 2
    assert unseen_photo_ranks(masked, clean, distractors).tolist() == [1, 2]
    assert unseen_photo_ranks(masked, clean, torch.tensor([[0.7071, 0.7071]])).tolist() == [2, 2]


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


def test_a_mask_fitted_on_some_photos_is_evaluated_on_photos_it_never_saw(
    celeb24_root: Path, sface: Recognizer
) -> None:
    records = scan_folder(celeb24_root).records
    user = [r for r in records if r.identity == "Tom_Hanks"]
    fitting, unseen = load_images(user[:6]), load_images(user[6:10])  # disjoint photos of one person
    others = [r for r in records if r.identity in {"Will_Smith", "Keanu_Reeves", "Hugh_Jackman", "Mark_Ruffalo"}]
    distractors = sface.embed(load_images([r for i, r in enumerate(others) if i % 20 < 5]))
    opom = DEFENSES.create("opom", surrogates=[sface])
    assert isinstance(opom, OPOM)
    mask = opom.fit(fitting, generator=torch.Generator().manual_seed(0))
    cloaked = opom.apply(mask, unseen)
    # universal: the one mask on every photo, never refitted on the photos it cloaks
    assert torch.equal(cloaked, torch.round((unseen + mask).clamp(0, 1) * 255) / 255)
    clean_ranks = unseen_photo_ranks(sface.embed(unseen), sface.embed(unseen), distractors)
    ranks = unseen_photo_ranks(sface.embed(cloaked), sface.embed(unseen), distractors)
    assert ranks.shape == (4 * 3,)
    protection, clean_protection = float((ranks > 1).float().mean()), float((clean_ranks > 1).float().mean())
    # measured (80 distractors): clean 0.00, masked unseen photos 0.75 (9 of 12 pairs), masked fitting photos 1.00
    # (30/30): the fitting photos overstate the mask; three pairs of slack for other CPUs
    assert clean_protection == 0.0
    assert protection >= 0.5, ranks


def _four_people(celeb24_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for ident in ("Tom_Hanks", "Will_Smith", "Tina_Fey", "Keanu_Reeves"):
        (root / ident).mkdir(parents=True)
        for src in sorted((celeb24_root / ident).iterdir())[:10]:
            shutil.copy2(src, root / ident / src.name)
    return root


def _suite(root: Path, defense: dict[str, Any], protocols: list[str]) -> Suite:
    return parse_suite(
        {
            "name": "opom-probes", "dataset": {"source": "folder", "path": str(root)},
            "protected": {"identities": ["Tom_Hanks"]}, "defenses": [defense], "recognizers": ["sface"],
            "countermeasures": ["none"], "classifiers": ["nearest-neighbour"], "protocols": protocols,
            "seeds": [0], "device": "cpu",
        },
        where="test suite",
    )  # fmt: skip


@pytest.mark.slow  # two fits of one mask (16 steps on 7 photos): 440 s measured on a 2-core CPU at load 12
def test_probe_cloaking_protocol_masks_unseen_query_photos(celeb24_root: Path, tmp_path: Path) -> None:
    """OPOM's protocol in the bench: the mask is fitted on the user's enrollment photos only, cloaks their query
    photos (which it never saw), and those search a clean gallery of everybody's enrollment photos."""
    suite = _suite(_four_people(celeb24_root, tmp_path), {"name": "opom", "surrogates": ["sface"]},
                   ["evasion", "probe-cloaking"])  # fmt: skip
    cache = ArtifactCache(tmp_path / "artifacts")
    result = run_suite(suite, cache=cache)
    rows = {r["protocol"]: r for r in result.summary}
    probe = rows["probe-cloaking"]
    assert probe["classifier"] == "gallery-search" and probe["status"] == "ok"
    assert probe["clean_accuracy_protected"] == 1.0  # clean query photos find a clean enrollment photo first
    # measured (sface, its own surrogate): probe-cloaking 0.67 (2 of 3 masked query photos lost), evasion 1.00 (the
    # mask on its own fitting photos); one photo of slack for other CPUs
    assert probe["protection_rate"] >= 1 / 3
    worker = CellWorker(suite, cache=cache)
    data = worker.data
    train, query = data.train["Tom_Hanks"], data.query["Tom_Hanks"]
    assert not set(train.tolist()) & set(query.tolist())  # the queries are photos the mask never saw
    queries = [q for q in result.queries if q["protocol"] == "probe-cloaking"]
    assert {q["image_id"] for q in queries} == {data.manifest.records[i].image_id for i in query}
    cloaks = cloak_all(suite, data, suite.defenses[0], 0, worker.models, cache, progress=False, quality_rows=None)
    defense = make_defense(suite.defenses[0], data, 0, worker.models)
    seed = derive_seed(0, "Tom_Hanks", defense.config_dict())
    mask = defense.fit(data.images[train], generator=torch.Generator().manual_seed(seed))
    # one mask, fitted on the enrollment photos, on every query photo (a PNG round trip changes nothing)
    expected = torch.round((data.images[query] + mask).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(cloaks.probes["Tom_Hanks"], expected.numpy())


def test_probe_cloaking_refuses_defenses_without_a_universal_mask(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="universal"):
        _suite(tmp_path, {"name": "pgd", "surrogates": ["sface"]}, ["probe-cloaking"])
