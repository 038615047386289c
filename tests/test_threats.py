"""The threat-model taxonomy (user x adversary x asset) and `safetylab threats`' grid."""

from __future__ import annotations

import pytest

from safetylab.claims import ADVERSARY_TIERS, ASSETS, USER_POPULATIONS, ThreatModel
from safetylab.studies import available, get_study

BASE = dict(deployer="d", adversary="a", access="black-box", budget="b", protected="p")


def test_taxonomy_fields_are_canonical_sets():
    tm = ThreatModel(**BASE, users=("experts", "public", "public"), tiers=("casual",), assets=("model", "users"))
    assert tm.users == ("public", "experts") and tm.assets == ("users", "model")
    assert tm.cells() == [("public", "casual", "users"), ("experts", "casual", "users"),
                          ("public", "casual", "model"), ("experts", "casual", "model")]
    assert tm.narrow(assets=["model", "society"]).cells() == [("public", "casual", "model"),
                                                            ("experts", "casual", "model")]
    assert not ThreatModel(**BASE).placed and ThreatModel(**BASE).cells() == []


@pytest.mark.parametrize("field, value", [("users", "everyone"), ("tiers", "nation-state"), ("assets", "profits")])
def test_unknown_taxonomy_value_is_rejected(field, value):
    kw = {"users": ("public",), "tiers": ("casual",), "assets": ("users",), field: (value,)}
    with pytest.raises(ValueError, match=field):
        ThreatModel(**BASE, **kw)


def test_a_partial_placement_or_an_attacker_without_access_is_rejected():
    with pytest.raises(ValueError, match="not tiers"):
        ThreatModel(**BASE, users=("public",), assets=("users",))
    with pytest.raises(ValueError, match="access='none'"):
        ThreatModel(**{**BASE, "access": "none"}, users=("public",), tiers=("casual",), assets=("users",))


def test_taxonomy_sizes():
    assert len(USER_POPULATIONS) * len(ADVERSARY_TIERS) * len(ASSETS) == 36
