"""A cloak cached by older code is never read back as this code's: the defense code is part of the cache key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cloakbench.bench import runner
from cloakbench.config import source_digest


def test_source_digest_follows_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mycloak"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "steps.py").write_text("STEPS = 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_digest(packages=("mycloak",))
    assert before == source_digest(packages=("mycloak",))
    (pkg / "steps.py").write_text("STEPS = 11\n")
    assert source_digest(packages=("mycloak",)) != before
    sys.modules.pop("mycloak", None)


def test_every_cloak_key_carries_the_defense_code() -> None:
    """The runner keys cloaks by the source of cloakbench.defenses, the transforms' twins (robust cloaks) and the
    recognizers (a rewrite of a network's layers can move its gradients): editing any of them (a step of Fawkes, a
    budget rule, a PReLU) makes every cloak new."""
    assert set(runner.DEFENSE_CODE) == {
        "cloakbench.defenses", "cloakbench.attacks.transforms", "cloakbench.attacks.recognizers",
    }  # fmt: skip
    root = Path(runner.__file__).resolve().parents[1]
    text = (root / "bench" / "runner.py").read_text()
    assert '"cloak", CLOAK_VERSION, defense.config_dict(), code, DECODER_VERSION,' in text  # and the decoder's rules
    assert '"clean", (model.name, model.describe()), cm_key if apply else None, DECODER_VERSION,' in text


def test_every_checkpoint_key_carries_the_training_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrained model cached by older training code is never read back: the adaptation package's source is part
    of the checkpoint key of FaceCure's recipe and of the anchored loop alike."""
    import types

    import torch

    from cloakbench.attacks.adaptation import ADAPTATIONS, TrainingSet, finetune

    data = TrainingSet(images=torch.rand(2, 3, 8, 8), labels=("a", "b"))
    model = types.SimpleNamespace(name="sface", weights_id="w")
    for name in ("end-to-end", "end-to-end-anchored"):
        adaptation = ADAPTATIONS.create(name)
        before = adaptation.checkpoint_key(model, data, 0)  # type: ignore[arg-type]
        assert before == adaptation.checkpoint_key(model, data, 0)  # type: ignore[arg-type]
        monkeypatch.setattr(finetune, "training_code", lambda: "edited")
        assert adaptation.checkpoint_key(model, data, 0) != before  # type: ignore[arg-type]
        monkeypatch.undo()
