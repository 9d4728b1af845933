"""submission.json's `env`: the recorded overrides of the runs, hyperparameter names only; old files still read."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from validator.loose import read_submission
from validator.schema import Submission, env_name_problem

META = {"author": "a", "github_id": "a", "name": "n", "blurb": "b", "date": "2026-11-27", "variant": "baseline"}


def test_env_is_optional_and_round_trips():
    assert Submission.model_validate(META).env == {}
    sub = Submission.model_validate({**META, "env": {"MODEL_DIM": "128", "COMPILE": "0"}})
    assert Submission.model_validate(json.loads(json.dumps(sub.model_dump()))).env == {
        "MODEL_DIM": "128",
        "COMPILE": "0",
    }


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "SEED", "RUN_ID", "DATA_PATH", "EVAL_ONLY", "model_dim"])
def test_names_a_submitter_may_not_record(name):
    assert env_name_problem(name)
    with pytest.raises(ValidationError, match=name):
        Submission.model_validate({**META, "env": {name: "1"}})


def test_upstream_shapes_without_env_still_read():
    upstream = {"author": "x", "github_id": "x", "name": "r", "date": "2026-03-01T10:00:00Z", "track": "10min_16mb",
                "val_bpb": 1.2, "seeds": {"1337": 1.2}, "code_bytes": 50000}  # fmt: skip
    sub, findings = read_submission(json.dumps(upstream))
    assert sub is not None and sub.val_bpb == 1.2 and not any(f.severity.value == "error" for f in findings)
    ours, findings = read_submission(json.dumps({**META, "env": {"MODEL_DIM": "128"}}))
    assert ours is not None and ours.strict and "JSON_STRICT_SCHEMA" not in {f.code for f in findings}
    bad, findings = read_submission(json.dumps({**META, "env": {"LD_PRELOAD": "x.so"}}))
    assert bad is not None and not bad.strict and "JSON_STRICT_SCHEMA" in {f.code for f in findings}
