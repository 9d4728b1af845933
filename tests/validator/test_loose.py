"""The loose submission.json reader: upstream shapes normalised, deviations reported, never a crash."""

from __future__ import annotations

import json

from validator.loose import decimals, read_submission
from validator.schema import strict_problems


def codes(findings):
    return {f.code for f in findings}


def test_upstream_shapes_are_normalised():
    data = {
        "author": "A",
        "github_id": "a",
        "name": "n",
        "date": "2026-03-19T04:48:00Z",
        "track": "non-record-unlimited-compute-16mb",
        "val_bpb": 1.19250,
        "code_bytes": 58340,
        "seeds": {"42": 1.1, "7": 1.2},
    }
    sub, found = read_submission(json.dumps(data))
    assert sub.date == "2026-03-19" and sub.track == "non_record_16mb" and sub.unlimited_compute
    assert sub.bytes_code == 58340 and sorted(sub.seeds) == [7, 42] and sub.seed_results[7].val_bpb == 1.2
    assert {"JSON_DATE_TIMESTAMP", "JSON_TRACK_SPELLING", "JSON_CODE_BYTES_SPELLING", "JSON_SEEDS_DICT"} <= codes(found)
    assert not sub.strict


def test_decimals_are_remembered():
    sub, _ = read_submission('{"val_bpb": 1.08100, "seed_results": {"1": {"val_bpb": 1.08079352}}}')
    assert decimals(sub.val_bpb) == 5 and decimals(sub.seed_results[1].val_bpb) == 8
    assert sub.seeds == [1]


def test_bad_types_and_nulls_are_findings():
    text = '{"author": 5, "val_bpb": "1.1", "bytes_total": 1.5, "val_loss": null, "seeds": "42", "track": 3}'
    sub, found = read_submission(text)
    assert sub.val_bpb is None and sub.bytes_total is None
    assert {"JSON_FIELD_TYPE", "JSON_NULL_FIELD", "JSON_NO_VAL_BPB"} <= codes(found)


def test_not_json_and_not_object():
    assert read_submission("{")[0] is None and codes(read_submission("{")[1]) == {"JSON_INVALID"}
    assert codes(read_submission("[1, 2]")[1]) == {"JSON_NOT_OBJECT"}
    assert codes(read_submission("NaN")[1]) == {"JSON_NOT_OBJECT"}


def test_nan_and_bool_are_not_numbers():
    sub, found = read_submission('{"val_bpb": NaN, "bytes_total": true}')
    assert sub.val_bpb is None and sub.bytes_total is None


def test_strict_schema_problems_listed():
    assert strict_problems({"author": "a"})
    good = {
        "author": "a",
        "github_id": "a",
        "name": "n",
        "blurb": "b",
        "date": "2026-05-01",
        "variant": "v",
    }
    assert strict_problems(good) == []


def test_ssm_golf_folders_are_held_to_the_strict_schema():
    data = {"author": "a", "github_id": "a", "name": "n", "blurb": "b", "date": "2026-05-01", "variant": "v"}
    assert "JSON_STRICT_SCHEMA" not in codes(read_submission(json.dumps(data))[1])
    data["seeds"] = [1]
    data["seed_results"] = {"2": {}}
    assert "JSON_STRICT_SCHEMA" in codes(read_submission(json.dumps(data))[1])
