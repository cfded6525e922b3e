"""The paper defenses on real celeb24 faces: budgets, presets, target choice, universality, the bench.

Steps are cut down here (the budget is enforced whatever the step count); the full presets are measured
by ``suites/defenses.yaml`` and ``scripts/defense_cost.py`` (numbers in the README and the issue notes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES, Budget, ThreatModel, quality_report
from cloakbench.defenses.budgets import QUANTISATION_SLACK, dssim
from cloakbench.defenses.objectives import gaussian_blur
from cloakbench.defenses.opom import OPOM, Subspace, hull, subspace_distance
from cloakbench.defenses.targets import choose_target, public_faces_from_folder
from cloakbench.errors import ConfigError
from cloakbench.images import quantize

PAPER_BOUNDS = {"min": 0.002, "low": 0.003, "mid": 0.005, "high": 0.008, "ultra": 0.01}
V1_BOUNDS = {"low": 0.004, "mid": 0.012, "high": 0.017}


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    m = scan_folder(celeb24_root)
    return load_images([r for r in m.records if r.identity == "Tom_Hanks"][:3])


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture(scope="module")
def casia() -> Recognizer:
    return RECOGNIZERS.create("facenet-casia")


def _small_pool(celeb24_root: Path, tmp_path_factory: pytest.TempPathFactory, names: list[str]) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for name in names:
        src = celeb24_root / name
        (root / name).mkdir()
        for f in sorted(src.iterdir())[:6]:
            (root / name / f.name).symlink_to(f)
    return root


def test_dssim_budget_is_enforced_on_the_quantised_image(faces: torch.Tensor) -> None:
    noise = (torch.rand(faces.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.4
    budget = Budget(dssim=0.005, linf=20 / 255)
    out = budget.enforce(faces, faces + noise)
    assert torch.equal(out, quantize(out))
    d = dssim(faces, out)
    assert float(d.max()) <= 0.005 + 1e-6
    # the bisection keeps much of the perturbation (measured 0.0028-0.0038: rounding makes DSSIM step-wise)
    assert float(d.min()) > 0.0025
    assert float((out - faces).abs().max()) <= 20 / 255 + QUANTISATION_SLACK
    assert budget.violations(faces, out) == []
    assert budget.violations(faces, quantize(faces + noise)) != []
    with pytest.raises(ConfigError, match="linf"):
        Budget()


@pytest.mark.parametrize("name", sorted(n for n in DEFENSES.list() if n != "precomputed"))  # reads files: its own tests
def test_every_preset_stays_within_its_bound(
    name: str, faces: torch.Tensor, sface: Recognizer, casia: Recognizer
) -> None:  # fmt: skip
    entry = DEFENSES.get(name)
    steps = entry.defaults.get("steps", 3)
    two = ("fawkes-v1", "fawkes-v1-mid", "fawkes-v1-high", "fawkes-v1-centred", "fawkes-v1-centred-mid",
           "fawkes-v1-centred-high", "lowkey")  # fmt: skip
    surrogates = [sface, casia] if name in two else [sface]
    overrides: dict[str, Any] = {"steps": min(int(steps), 6)} if name != "noise" else {}
    if name == "fawkes":  # 0.3's custom learning rate 2 moves no pixel by 0.5/255 in 6 steps (rounds to nothing)
        overrides["learning_rate"] = 20.0
    defense = DEFENSES.create(name, surrogates=surrogates, name=name, **overrides)
    out = defense.protect(faces, ["Tom_Hanks"] * faces.shape[0], generator=torch.Generator().manual_seed(0))
    q = quality_report(faces, out)
    assert torch.equal(out, quantize(out))
    assert float(q["linf"].min()) > 0, "the cloak changed nothing"
    budget = defense.budget
    if budget.linf is not None:
        assert float(q["linf"].max()) <= budget.linf + QUANTISATION_SLACK
    if budget.dssim is not None:
        assert float(q["dssim"].max()) <= budget.dssim + 1e-6
    mode = name.rsplit("-", 1)[-1]
    # Fawkes as its code runs only penalises DSSIM (issue 17): v1.0 caps pixels at 15/255, 0.3 nothing; the
    # centred variants (cloakbench's) enforce their DSSIM bound
    if name == "fawkes-v1-centred":  # custom: high unless overridden
        assert budget.dssim == V1_BOUNDS["high"] and budget.linf == pytest.approx(15 / 255)
    elif name.startswith("fawkes-v1-centred-"):
        assert budget.dssim == V1_BOUNDS[mode] and budget.linf == pytest.approx(15 / 255)
    elif name == "fawkes-v1" or name.startswith("fawkes-v1-"):
        assert budget.dssim is None and budget.linf == pytest.approx(15 / 255)
        assert defense.config.dssim_threshold == V1_BOUNDS["high" if name == "fawkes-v1" else mode]  # type: ignore[attr-defined]
    elif name.startswith("fawkes"):
        assert budget.dssim is None and budget.linf == 1.0
        want = 0.007 if name == "fawkes" else PAPER_BOUNDS[mode]  # custom paper version: the paper's default rho
        assert defense.config.dssim_threshold == want  # type: ignore[attr-defined]


def test_every_entry_says_where_it_comes_from() -> None:
    for name in DEFENSES.list():
        meta = DEFENSES.get(name).meta
        assert meta.details["threat model"] in {t.value for t in ThreatModel}, name
        if name not in ("noise", "precomputed"):  # a baseline, and another tool's files: no paper of their own
            assert meta.paper and meta.year and meta.venue, name
    assert DEFENSES.get("fawkes-high").meta.details["threat model"] == "poisoning"
    assert DEFENSES.get("lowkey").meta.details["threat model"] == "evasion"


def test_v1_presets_need_their_extractors(sface: Recognizer) -> None:
    with pytest.raises(ConfigError, match="2 extractors"):
        DEFENSES.create("fawkes-v1-high", surrogates=[sface])
    low = DEFENSES.create("fawkes-v1-low", surrogates=[sface, RECOGNIZERS.create("facenet-msceleb")])
    assert [s.name for s in low.surrogates] == ["sface"]  # v1.0 low uses one extractor


def test_fawkes_target_is_far_seeded_and_attracts(
    celeb24_root: Path, tmp_path_factory: pytest.TempPathFactory, faces: torch.Tensor, sface: Recognizer
) -> None:  # fmt: skip
    names = ["Barack_Obama", "Drew_Barrymore", "Halle_Berry", "Keanu_Reeves", "Tom_Hanks"]
    pool = public_faces_from_folder(_small_pool(celeb24_root, tmp_path_factory, names)).without(["Tom_Hanks"])
    assert sorted(pool.images) == [n for n in names if n != "Tom_Hanks"]
    gen = torch.Generator().manual_seed(1)
    choice = choose_target(pool, faces, [sface], farthest=2, generator=gen)
    # the two farthest by Fawkes 0.3's rule (smallest L2 distance from the identity's centroid to any of the
    # user's photos), recomputed here
    user = sface.embed(faces)
    dist = {
        n: float((user - torch.nn.functional.normalize(sface.embed(pool.images[n]).mean(0), dim=0)).norm(dim=1).min())
        for n in pool.images
    }
    assert set(choice.candidates) == set(sorted(dist, key=lambda n: -dist[n])[:2])
    assert choice.identity in choice.candidates
    again = choose_target(pool, faces, [sface], farthest=2, generator=torch.Generator().manual_seed(1))
    assert again == choice

    fawkes = DEFENSES.create("fawkes-low", surrogates=[sface], target_pool=str(pool_root(pool)), steps=20)
    out = fawkes.protect(faces, ["Tom_Hanks"] * 3, generator=torch.Generator().manual_seed(0))
    target = fawkes.targets["Tom_Hanks"].identity
    assert target != "Tom_Hanks"
    centre = torch.nn.functional.normalize(sface.embed(pool.images[target]).mean(0), dim=0)
    before = sface.embed(faces) @ centre
    after = sface.embed(out) @ centre
    # measured: +0.28 to +0.45 cosine towards the target's centre after 20 steps (0.3 low: rho 0.003 only penalised;
    # the kept iterates end at TF DSSIM 0.007-0.059, L-inf 5-12/255)
    assert bool((after > before + 0.1).all()), (before, after)


def pool_root(pool: Any) -> Path:
    return Path(pool.source)


def test_fawkes_target_pool_errors_name_the_problem(sface: Recognizer) -> None:
    fawkes = DEFENSES.create("fawkes-min", surrogates=[sface], target_pool="dataset")
    with pytest.raises(ConfigError, match="dataset"):
        fawkes.pool()
    with pytest.raises(ConfigError, match="no/such/folder"):
        DEFENSES.create("fawkes-min", surrogates=[sface], target_pool="no/such/folder").pool()


def test_lowkey_smoothing_matches_opencv(faces: torch.Tensor) -> None:
    ours = gaussian_blur(faces, kernel=7, sigma=3.0)
    img = faces[0].permute(1, 2, 0).numpy()
    ref = cv2.GaussianBlur(img, (7, 7), 3.0, borderType=cv2.BORDER_REFLECT_101)
    assert float(np.abs(ours[0].permute(1, 2, 0).numpy() - ref).max()) < 1e-5


def test_opom_adds_one_mask_per_person_and_leaves_the_hull(faces: torch.Tensor, sface: Recognizer) -> None:
    opom = DEFENSES.create("opom", surrogates=[sface], steps=10)
    assert isinstance(opom, OPOM)
    out = opom.protect(faces, ["Tom_Hanks"] * 3, generator=torch.Generator().manual_seed(0))
    mask = opom.masks["Tom_Hanks"]
    expected = quantize((faces + mask).clamp(0, 1))
    assert torch.equal(out, expected)  # the very same mask on every photo
    clean = sface.embed(faces)
    mean, basis = hull(clean, Subspace.AFFINE)
    assert float(subspace_distance(clean, mean, basis).max()) < 1e-4  # every photo lies on its own hull
    moved = subspace_distance(sface.embed(out), mean, basis)
    # measured 1.28-1.52 (Euclidean, unit embeddings) after 10 steps at 8/255 on 3 Tom_Hanks photos
    assert float(moved.min()) > 0.8, moved


def test_bench_runs_paper_defenses_with_grids_and_png_round_trip(celeb24_root: Path, tmp_path: Path) -> None:
    """A small suite: cloakbench's Fawkes v1.0 low variant (its centred DSSIM bound is enforced) and Fawkes min
    (0.3: DSSIM only penalised) with the dataset's own identities as target pool."""
    from cloakbench.bench.output import write_run
    from cloakbench.bench.runner import run_suite
    from cloakbench.bench.suite import parse_suite

    root = tmp_path / "six"
    root.mkdir()
    for ident in sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:6]:
        (root / ident.name).symlink_to(ident, target_is_directory=True)
    suite = parse_suite(
        {
            "name": "paper-defenses",
            "dataset": {"source": "folder", "path": str(root), "max_per_identity": 8},
            "protected": {"count": 2},
            "defenses": [
                # few steps: this checks the wiring (cap, budgets after the PNG round trip, dataset target
                # pool, grids); the presets' strength is measured by suites/defenses.yaml
                {"name": "fawkes-v1-centred-low", "surrogates": ["sface"], "params": {"steps": 5}},
                {"name": "fawkes-min", "surrogates": ["sface"], "params": {"target_pool": "dataset", "steps": 5}},
            ],
            "recognizers": ["sface"],
            "countermeasures": ["none"],
            "classifiers": ["nearest-neighbour"],
        },
        where="test",
    )
    result = run_suite(suite)
    assert len(result.manifest.records) == 6 * 8  # the seeded cap per identity
    by_defense: dict[str, list[dict[str, Any]]] = {}
    for row in result.cloaks:
        by_defense.setdefault(row["defense"], []).append(row)
    assert max(r["dssim"] for r in by_defense["fawkes-v1-centred-low"]) <= 0.004 + 1e-6  # enforced after the PNG
    assert max(r["linf"] for r in by_defense["fawkes-v1-centred-low"]) <= 15 / 255 + QUANTISATION_SLACK
    assert min(r["linf"] for r in by_defense["fawkes-min"]) > 0  # 0.3 bounds nothing, but every photo is cloaked
    assert all(r["status"] == "ok" for r in result.summary), result.summary
    write_run(result, tmp_path / "run")
    for label in ("fawkes-v1-centred-low", "fawkes-min"):
        grid = cv2.imread(str(tmp_path / "run" / "grids" / f"{label}.png"))
        assert grid is not None and grid.shape[0] == 3 * 112 + 8  # original / cloaked / difference rows
