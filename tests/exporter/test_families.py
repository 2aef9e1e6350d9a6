"""The checkpoint families are registered once: the contract's list, the registry and the docs agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from exporter.checkpoints import registry
from tokenline.manifest import Family

ROOT = Path(__file__).resolve().parents[2]


def test_registry_holds_exactly_the_contracts_families() -> None:
    assert set(registry.FAMILIES) == set(get_args(Family))
    assert [f.name for f in registry.REGISTRY] == list(registry.FAMILIES) == list(registry.SIGNATURES)
    for fam in registry.REGISTRY:
        assert fam.description and callable(fam.convert) and fam.signature.required
        assert len(fam.preprocess.mean) == len(fam.preprocess.std) == 3


def test_a_family_missing_on_either_side_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = registry.Family("hf_vit", "one too many", registry.REGISTRY[0].convert, registry.REGISTRY[0].signature,
                            registry.REGISTRY[0].preprocess)
    monkeypatch.setattr(registry, "FAMILIES", {**registry.FAMILIES, "hf_vit": extra})
    with pytest.raises(RuntimeError, match=r"not in tokenline.manifest.Family: \['hf_vit'\]"):
        registry.check_contract()
    monkeypatch.setattr(registry, "FAMILIES", {k: v for k, v in registry.FAMILIES.items() if k != "img_focus"})
    with pytest.raises(RuntimeError, match=r"in the contract but not registered: \['img_focus'\]"):
        registry.check_contract()


def test_docs_list_every_family() -> None:
    table = (ROOT / "docs" / "checkpoints.md").read_text().split("| family |")[1].split("\n\n")[0]
    assert re.findall(r"^\| `(\w+)` \|", table, re.M) == list(registry.FAMILIES)
    manifest_doc = (ROOT / "docs" / "manifest.md").read_text()
    row = next(line for line in manifest_doc.splitlines() if line.startswith("| `family` |"))
    assert re.findall(r"`(\w+)`", row)[1:] == list(registry.FAMILIES)
