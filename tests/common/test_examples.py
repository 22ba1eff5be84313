"""The deployment examples under deploy/examples are valid specs (what `cnei deploy apply` reads)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.common import deployment
from services.common.ensemble_plan import ensemble_interface

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_is_a_valid_deployment(path):
    spec = deployment.from_dict(yaml.safe_load(path.read_text()))
    assert spec.model == path.stem.removesuffix("-deployment")


def test_the_ensemble_example_runs_both_tiers_on_one_image():
    spec = deployment.from_dict(yaml.safe_load((EXAMPLES[0].parent / "digits-both-tiers.yaml").read_text()))
    assert ensemble_interface(spec) == (["image"], ["edge_probabilities", "cloud_probabilities"])
    assert [(s.tier, s.precision) for s in spec.ensemble] == [("edge", "INT8"), ("cloud", "FP32")]
