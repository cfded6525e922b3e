"""Models from a file (ONNX, TorchScript) named in a suite, without code.

The real SFace network is exported to ONNX and to TorchScript (and, wrapped, to files that take NHWC BGR input)
with the helpers of ``scripts/file_models_check.py``; loaded through suite mappings, their embeddings of celeb24
faces must equal SFace's own, the TorchScript file must work as a PGD surrogate (in a suite run and through the
defense API), and every bad mapping must be refused at validation with a ConfigError naming the key path and
value (``cloakbench validate``/``run``: exit 2, no run folder).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.recognizers.from_file import (
    FileFormat,
    load_file_model,
    parse_file_model,
    recognizer_from_file,
)
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.plan import cells_of, plan_tasks
from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import load_suite, parse_suite
from cloakbench.cli import EXIT_BAD_INPUT, main
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.base import MIN_SURROGATE_SHIFT
from cloakbench.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EVERY = 80  # every 80th celeb24 photo (sorted paths): 23 faces of 23 identities


def _script() -> ModuleType:
    path = PROJECT_ROOT / "scripts" / "file_models_check.py"
    spec = importlib.util.spec_from_file_location("file_models_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CHECK = _script()


@pytest.fixture(scope="module")
def sface() -> Recognizer:
    return RECOGNIZERS.create("sface")


@pytest.fixture(scope="module")
def exported(sface: Recognizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Suite mappings of SFace exported as onnx, torchscript, onnx-nhwc-bgr, torchscript-nhwc-bgr."""
    mappings: dict[str, dict[str, Any]] = CHECK.export_variants(
        sface, tmp_path_factory.mktemp("exported"), nhwc_bgr=True
    )
    return mappings


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    images: torch.Tensor = CHECK.load_faces(celeb24_root, EVERY)
    return images


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    """Small TorchScript/ONNX files for the error cases: a good [B, 16] net, a [B, 16, 1, 1] one, a state_dict."""
    good = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 16)
    )
    four_d = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1))
    example = torch.rand(2, 3, 112, 112)
    paths = {
        "good.pt": CHECK.export_torchscript(good, example, tmp_path / "good.pt"),
        "4d.pt": CHECK.export_torchscript(four_d, example, tmp_path / "4d.pt"),
        "good.onnx": CHECK.export_onnx(good, example, tmp_path / "good.onnx"),
        "static.onnx": CHECK.export_onnx(good, example[:1], tmp_path / "static.onnx", dynamic_batch=False),
        "state.pt": tmp_path / "state.pt",
    }
    torch.save(good.state_dict(), paths["state.pt"])
    return paths


INPUT = {"size": 112, "colour": "rgb", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _suite(recognizers: list[Any], **extra: Any) -> dict[str, Any]:
    return {"name": "file-models", "defenses": ["noise"], "recognizers": recognizers, **extra}


# --- embeddings equal the zoo model's -------------------------------------------------------------------------------


def test_exported_files_embed_like_the_zoo_model(
    sface: Recognizer, exported: dict[str, dict[str, Any]], faces: torch.Tensor
) -> None:
    suite = parse_suite(_suite(list(exported.values())), where="test")
    assert [m.name for m in suite.models] == [m["name"] for m in exported.values()]
    reference = sface.embed_batched(faces)
    for key, model in zip(exported, suite.models, strict=True):
        assert model.embedding_dim == 128 and len(model.sha256) == 64
        rec = load_file_model(model)
        assert rec.capabilities.differentiable is (model.format is FileFormat.TORCHSCRIPT)
        diff = CHECK.compare(reference, rec.embed_batched(faces))
        # measured (benchmarks/results/file_models.json, 92 faces): onnx 3.7e-7, torchscript 0.0, the NHWC-BGR files
        # the same; 1e-4 is the bound the feature promises
        assert diff["max_abs_diff"] <= 1e-4, (key, diff)


def test_the_declared_colour_and_layout_are_what_the_model_gets(
    sface: Recognizer, exported: dict[str, dict[str, Any]], faces: torch.Tensor
) -> None:
    """The NHWC BGR file declared as RGB is a different model: the conversions are applied, not ignored."""
    wrong = {**exported["torchscript-nhwc-bgr"], "name": "wrong-colour"}
    wrong["input"] = {**wrong["input"], "colour": "rgb"}
    rec = recognizer_from_file(wrong)
    diff = CHECK.compare(sface.embed_batched(faces), rec.embed_batched(faces))
    assert diff["max_abs_diff"] > 0.05, diff  # measured on these 23 faces: 0.126 (min cosine 0.849)
    with pytest.raises(ConfigError, match=r"onnx: .*\['batch', 112, 112, 3\], which does not take layout nchw at size"):
        recognizer_from_file({**exported["onnx-nhwc-bgr"], "name": "wrong-layout", "input": exported["onnx"]["input"]})


# --- the TorchScript file as a surrogate ----------------------------------------------------------------------------


def test_torchscript_file_is_a_pgd_surrogate_like_the_zoo_model(
    sface: Recognizer, exported: dict[str, dict[str, Any]], faces: torch.Tensor
) -> None:
    file_rec = recognizer_from_file(exported["torchscript"])
    result = CHECK.pgd_check(sface, file_rec, faces[:2], epsilon=8 / 255, steps=3)
    moved = result["file_model_shift_file_surrogate"]
    noise = result["file_model_shift_noise"]
    # measured (benchmarks/results/file_models.json: 8 faces, 10 steps): the cloak moves the file model's embedding
    # by cosine distance 1.53-1.73, noise at the same budget by 0.010-0.026; the cloaks made through the file and
    # through the zoo model are equal (0 levels apart)
    assert min(moved) >= MIN_SURROGATE_SHIFT
    assert min(moved) > 10 * max(noise), result
    assert result["cloaks_max_diff_levels"] <= 1.0, result


def test_a_suite_runs_with_file_models_as_surrogate_recognizer_and_backend(
    exported: dict[str, dict[str, Any]], names_dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    ts, onnx = exported["torchscript"], exported["onnx"]
    suite = parse_suite(
        {
            "name": "file-models-run",  # 4 celeb24 identities x 4 photos (their folder names; no names file)
            "dataset": {"source": "folder", "path": str(names_dataset[0]), "max_per_identity": 4},
            "protected": {"identities": ["Drew_Barrymore"]},
            "defenses": [{"name": "pgd", "surrogates": [ts], "params": {"steps": 2}}],
            "recognizers": [ts["name"], onnx],
            "services": [{"kind": "rekognition", "backend": onnx["name"], "transport": "in-process"}],
            "classifiers": ["nearest-neighbour"],
            "bootstrap": {"resamples": 10},
            "device": "cpu",
        },
        where="test",
    )
    assert sorted(m.name for m in suite.models) == sorted([ts["name"], onnx["name"]])
    assert suite.defenses[0].surrogates == (ts["name"],)
    result = run_suite(suite, cache=ArtifactCache(tmp_path / "artifacts"))
    assert result.summary and all(r["status"] == "ok" for r in result.summary), result.summary
    rows = {(r["recognizer"], r["protocol"]): r for r in result.summary}
    assert rows[(ts["name"], "poisoning")]["oblivious"] is False  # the surrogate's own weights
    assert rows[(onnx["name"], "poisoning")]["oblivious"] is True  # another file: other weights as far as we know
    # the resolved suite (config.yaml) parses back to the same suite
    assert parse_suite(suite.to_dict(), where="config.yaml") == suite


def test_an_adaptation_plans_retraining_only_for_the_white_box_file(exported: dict[str, dict[str, Any]]) -> None:
    suite = parse_suite(
        _suite(
            [exported["torchscript"], exported["onnx"]],
            countermeasures=[{"name": "end-to-end"}],
            classifiers=["nearest-neighbour"],
        ),
        where="test",
    )
    cells = {t.subject: cells_of(suite, t) for t in plan_tasks(suite) if t.countermeasure == "end-to-end"}
    assert cells == {exported["torchscript"]["name"]: 2, exported["onnx"]["name"]: 1}  # + the softmax head


# --- identity: content, not path ------------------------------------------------------------------------------------


def test_weights_id_keys_on_content_and_a_changed_file_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = parse_file_model({"name": "m", "torchscript": str(tiny["good.pt"]), "input": INPUT}, where="t")
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(tiny["good.pt"], copy)
    moved = parse_file_model({"name": "m", "torchscript": str(copy), "input": INPUT}, where="t")
    assert moved.weights_id == model.weights_id and moved.path != model.path
    resized = parse_file_model({"name": "m", "torchscript": str(copy), "input": {**INPUT, "size": 96}}, where="t")
    assert resized.weights_id != model.weights_id  # the input spec is part of it (cloaks depend on it)
    shutil.copy(tiny["good.onnx"], copy)  # the file changes after validation
    with pytest.raises(ConfigError, match="changed since the suite was validated"):
        load_file_model(moved)
    with pytest.raises(ConfigError, match=r"t\.sha256: .* has SHA-256 [0-9a-f]{64}, not the pinned 0{64}"):
        parse_file_model({"name": "m", "onnx": str(copy), "input": INPUT, "sha256": "0" * 64}, where="t")


def test_relative_paths_are_relative_to_the_suite_file(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "suites"
    (folder / "models").mkdir(parents=True)
    shutil.copy(tiny["good.pt"], folder / "models" / "net.pt")
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(_suite([{"name": "net", "torchscript": "models/net.pt", "input": INPUT}])))
    monkeypatch.chdir(tmp_path)
    suite = load_suite(path)
    assert suite.models[0].torchscript == (folder / "models" / "net.pt").resolve()
    assert suite.models[0].embedding_dim == 16
    assert "models" not in load_suite(PROJECT_ROOT / "suites" / "quick.yaml").to_dict()  # old digests hold


# --- errors at validation -------------------------------------------------------------------------------------------

# (case, recognizer mapping (paths are keys of the `tiny` fixture), what the error says after "test: ")
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown colour", {"input": {**INPUT, "colour": "rgba"}}, "recognizers[0].input.colour: 'rgba' is not one of"),
    ("unknown layout", {"input": {**INPUT, "layout": "chw"}}, "recognizers[0].input.layout: 'chw' is not one of"),
    ("size not positive", {"input": {**INPUT, "size": 0}}, "recognizers[0].input.size must be a positive side"),
    ("size of one side", {"input": {**INPUT, "size": [112]}}, "recognizers[0].input.size: expected an integer or"),
    ("mean of two", {"input": {**INPUT, "mean": [0.5, 0.5]}}, "recognizers[0].input.mean: expected 3 items, got 2"),
    ("std zero", {"input": {**INPUT, "std": [0.5, 0, 0.5]}}, "recognizers[0].input.std must be positive in every"),
    ("mean off scale", {"input": {**INPUT, "mean": [127.5] * 3}}, "recognizers[0].input.mean must lie in [0, 1] (the"),
    ("no input", {"input": None}, "recognizers[0]: missing required key 'input'"),
    ("unknown key", {"inputs": INPUT}, "recognizers[0]: unknown key(s) 'inputs'; did you mean 'input'?"),
    ("both files", {"onnx": "good.onnx"}, "recognizers[0]: give exactly one of 'onnx: FILE'"),
    ("bad name", {"name": "my model"}, "recognizers[0].name must be 1 to 100 ASCII letters"),
    ("name clash", {"name": "sface"}, "recognizers[0].name: 'sface' is a registered recognizer"),
    ("missing file", {"torchscript": "nope.pt"}, "recognizers[0].torchscript: {dir}/nope.pt does not exist"),
    ("onnx is a zip", {"torchscript": None, "onnx": "good.pt"}, "recognizers[0].onnx: {dir}/good.pt: not a usable"),
    ("torchscript is onnx", {"torchscript": "good.onnx"}, "recognizers[0].torchscript: {dir}/good.onnx: not a Torch"),
    ("state_dict", {"torchscript": "state.pt"}, "recognizers[0].torchscript: {dir}/state.pt: not a TorchScript"),
    (
        "output 4-d",
        {"torchscript": "4d.pt"},
        "recognizers[0].torchscript: file model 'net' returned shape [2, 16, 1, 1]",
    ),
    (
        "dim pinned",
        {"embedding_dim": 512},
        "recognizers[0].embedding_dim: 512 given, but {dir}/good.pt outputs [B, 16]",
    ),
    (
        "fixed size",
        {"input": {**INPUT, "size": 96}, "torchscript": None, "onnx": "static.onnx"},
        "recognizers[0].onnx:",
    ),
    ("not a model", {"torchscript": None}, "recognizers[0]: a mapping here is a model from a file"),
]


@pytest.mark.parametrize(("case", "change", "expected"), BAD, ids=[c[0] for c in BAD])
def test_bad_file_model_is_refused_at_validation(
    case: str, change: dict[str, Any], expected: str, tiny: dict[str, Path]
) -> None:
    item: dict[str, Any] = {"name": "net", "torchscript": "good.pt", "input": INPUT, **change}
    item = {k: v for k, v in item.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_suite(_suite([item]), where="test", base=tiny["good.pt"].parent)
    assert f"test: {expected.format(dir=tiny['good.pt'].parent)}" in str(caught.value), str(caught.value)


def test_wrong_file_types_say_what_the_file_looks_like(tiny: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"zip archive, as TorchScript and torch.save files are: use the 'torchscript'"
    ):
        parse_file_model({"name": "n", "onnx": str(tiny["good.pt"]), "input": INPUT}, where="t")
    with pytest.raises(ConfigError, match=r"looks like an ONNX file: use the 'onnx' key"):
        parse_file_model({"name": "n", "torchscript": str(tiny["good.onnx"]), "input": INPUT}, where="t")
    with pytest.raises(ConfigError, match=r"torch.save checkpoint or state_dict is not TorchScript: save the model"):
        parse_file_model({"name": "n", "torchscript": str(tiny["state.pt"]), "input": INPUT}, where="t")


def test_a_fixed_batch_onnx_file_runs_one_image_at_a_time(tiny: dict[str, Path], faces: torch.Tensor) -> None:
    fixed = recognizer_from_file({"name": "fixed", "onnx": str(tiny["static.onnx"]), "input": INPUT})
    dynamic = recognizer_from_file({"name": "dynamic", "onnx": str(tiny["good.onnx"]), "input": INPUT})
    assert not fixed.capabilities.batched and dynamic.capabilities.batched
    assert torch.allclose(fixed.embed(faces[:3]), dynamic.embed(faces[:3]), atol=1e-6)


def test_onnx_file_is_no_surrogate_and_a_name_has_one_definition(tiny: dict[str, Path]) -> None:
    onnx = {"name": "net-onnx", "onnx": str(tiny["good.onnx"]), "input": INPUT}
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.surrogates\[0\]: 'net-onnx' is an ONNX file, a black box"):
        parse_suite({**_suite([onnx]), "defenses": [{"name": "pgd", "surrogates": ["net-onnx"]}]}, where="test")
    again = {**onnx, "input": {**INPUT, "mean": [0.4, 0.4, 0.4]}}
    with pytest.raises(ConfigError, match=r"recognizers\[1\]\.name: 'net-onnx' is already defined differently at"):
        parse_suite({**_suite([onnx, again])}, where="test")
    # the same model given twice: one definition; listing it twice is the usual repeat error
    with pytest.raises(ConfigError, match=r"recognizers\[1\]: 'net-onnx' repeats recognizers\[0\]"):
        parse_suite({**_suite([onnx, onnx])}, where="test")


def test_cli_refuses_a_bad_file_model_with_exit_2(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    item = {"name": "net", "torchscript": "good.pt", "input": {**INPUT, "colour": "rgba"}}
    path.write_text(yaml.safe_dump(_suite([item])))
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert f"{path}: recognizers[0].input.colour: 'rgba' is not one of" in capsys.readouterr().err
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "run").exists()
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(_suite([{**item, "input": INPUT}])))
    assert main(["validate", str(ok)]) == 0


def test_defense_api_refuses_the_onnx_file_as_surrogate(tiny: dict[str, Path]) -> None:
    rec = recognizer_from_file({"name": "net-onnx", "onnx": str(tiny["good.onnx"]), "input": INPUT})
    with pytest.raises(ConfigError, match="needs differentiable surrogates"):
        DEFENSES.create("pgd", surrogates=[rec], name="pgd")
