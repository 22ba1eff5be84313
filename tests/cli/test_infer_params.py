"""`cnei infer --param`: request parameters from the command line."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument


def test_infer_params_are_typed_as_their_oip_parameter_kinds():
    from services.cli.infer import request_parameters

    assert request_parameters(["accuracy_floor=0.95", "priority=2", "region=site-b", "binary_data_output=true",
                               "note=a=b"]) == {
        "accuracy_floor": 0.95, "priority": 2, "region": "site-b", "binary_data_output": True, "note": "a=b"}
    assert isinstance(request_parameters(["priority=2"])["priority"], int)
    for bad in ("oops", "=1"):
        with pytest.raises(InvalidArgument, match=f"--param needs KEY=VALUE, not '{bad}'"):
            request_parameters([bad])
