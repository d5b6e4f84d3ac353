"""The generated FineTuneJob CRD: up to date, structural, documented, and consistent with the
pydantic models it is generated from."""

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from invalid_manifests import (
    ALLOWED_UPDATES_WITH_JOB,
    FORBIDDEN_UPDATES_WITH_JOB,
    FULL_MANIFEST,
    INVALID_MANIFESTS,
    OUTPUTS_BESIDE_INPUTS,
    VALID_MANIFEST,
    InvalidManifest,
)
from pydantic import ValidationError

from kubetune_operator import crd
from kubetune_trainer.api import MUTABLE_FIELDS, FineTuneJob, FineTuneSpec

ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = ROOT / crd.CRD_PATH
REGENERATE = f"run `python -m kubetune_operator.crd {crd.CRD_PATH}` and commit the result"
MINIMAL_SPEC: dict[str, Any] = VALID_MANIFEST["spec"]

Node = dict[str, Any]


@pytest.fixture(scope="module")
def built() -> Node:
    return crd.build_crd()


@pytest.fixture(scope="module")
def schema(built: Node) -> Node:
    openapi: Node = built["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return openapi


def walk(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Every schema node with its path: properties, array items and map values."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def properties(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    for node_path, sub in walk(node, path):
        for name, prop in sub.get("properties", {}).items():
            yield f"{node_path}.{name}", prop


def apply_defaults(value: Any, node: Node) -> Any:
    """Structural defaulting as the API server does it: missing fields first, then recurse."""
    if isinstance(value, dict) and "properties" in node:
        for name, prop in node["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name, sub in value.items():
            if name in node["properties"]:
                apply_defaults(sub, node["properties"][name])
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for sub in value.values():
            apply_defaults(sub, node["additionalProperties"])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            apply_defaults(item, node["items"])
    return value


def cel_messages(schema: Node) -> list[str]:
    return [r["message"] for _, n in walk(schema) for r in n.get("x-kubernetes-validations", [])]


# ------------------------------------------------------------------------------ generated file


def test_committed_crd_is_generated_from_the_models(built: Node) -> None:
    assert CRD_FILE.exists(), f"{CRD_FILE} is missing: {REGENERATE}"
    text = CRD_FILE.read_text(encoding="utf-8")
    assert yaml.safe_load(text) == built, f"{crd.CRD_PATH} is stale: {REGENERATE}"
    assert text == crd.render_crd(), f"{crd.CRD_PATH} is not formatted as generated: {REGENERATE}"
    assert text.startswith(crd.HEADER)


def test_main_writes_the_rendered_crd(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    assert crd.main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == crd.render_crd()


def test_crd_identity(built: Node) -> None:
    spec = built["spec"]
    assert built["metadata"]["name"] == "finetunejobs.kubetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase",
        "Stage",
        "Model",
        "Method",
        "Progress",
        "Loss",
        "Ready",
        "Age",
    ]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


# -------------------------------------------------------------------------------- schema shape


def test_every_property_is_described(schema: Node) -> None:
    assert schema.get("description")
    undocumented = [
        path
        for path, prop in properties(schema)
        # Root metadata must be a bare {type: object}: the API server rejects even a description.
        if path != ".metadata" and not prop.get("description", "").strip()
    ]
    assert not undocumented, f"properties without a description: {undocumented}"


def test_schema_is_structural(schema: Node) -> None:
    forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "nullable"}
    for path, node in walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert not node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: preserves unknown"
        assert node.get("additionalProperties") is not False, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if node.get("type") == "object" and path.startswith(".spec"):
            assert "properties" in node or "additionalProperties" in node, f"{path}: free-form"


def test_nested_spec_objects_default_to_empty(schema: Node) -> None:
    # So the API server fills in every nested default and `kubectl get -o yaml` shows them.
    spec = schema["properties"]["spec"]
    for name, prop in spec["properties"].items():
        if prop["type"] == "object" and name not in spec["required"]:
            assert prop.get("default") == {}, f"spec.{name} should default to {{}}"


def test_crd_defaults_match_model_defaults(schema: Node) -> None:
    defaulted = apply_defaults(copy.deepcopy(MINIMAL_SPEC), schema["properties"]["spec"])
    model = FineTuneSpec.model_validate(MINIMAL_SPEC)
    assert defaulted == model.model_dump(by_alias=True, exclude_none=True)
    # The defaulted object is itself a valid spec that round-trips unchanged.
    assert FineTuneSpec.model_validate(defaulted) == model


def test_immutability_rule_freezes_every_training_field(schema: Node) -> None:
    (rule,) = schema["x-kubernetes-validations"]
    assert "oldSelf.status.jobName" in rule["rule"]
    for name, field in FineTuneSpec.model_fields.items():
        frozen = f"self.spec.{field.alias} ==" in rule["rule"]
        assert frozen is (name not in MUTABLE_FIELDS), f"spec.{field.alias}"


# --------------------------------------------------------------------- model-level validation


def _error_locs(exc: ValidationError) -> list[tuple[str | int, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"baseModel": {"uri": "gs://models/llama"}}, ("baseModel", "uri")),
        ({"output": {"uri": "https://example.com/out"}}, ("output", "uri")),
        ({"lora": {"targetModules": ["all-linear", "q_proj"]}}, ("lora", "targetModules")),
        ({"dataset": {"trainUri": "s3://d/x", "trainURI": "s3://d/y"}}, ("dataset", "trainURI")),
    ],
    ids=["uri-scheme", "output-scheme", "all-linear-mixed", "unknown-field"],
)
def test_model_rejects_and_names_the_field(patch: dict[str, Any], loc: tuple[str, ...]) -> None:
    spec = {**MINIMAL_SPEC, **patch}
    with pytest.raises(ValidationError) as info:
        FineTuneSpec.model_validate(spec)
    assert any(error_loc[: len(loc)] == loc for error_loc in _error_locs(info.value)), str(
        info.value
    )


def test_valid_manifest_is_accepted() -> None:
    job = FineTuneJob.model_validate(VALID_MANIFEST)
    assert job.spec.method == "lora"
    assert job.spec.lora.target_modules == ["all-linear"]


@pytest.mark.parametrize("manifest", OUTPUTS_BESIDE_INPUTS, ids=lambda m: m["metadata"]["name"])
def test_an_output_beside_its_inputs_is_accepted(manifest: dict[str, Any]) -> None:
    FineTuneJob.model_validate(manifest)


def test_full_manifest_round_trips(schema: Node) -> None:
    job = FineTuneJob.model_validate(FULL_MANIFEST)
    dumped = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    expected = apply_defaults(copy.deepcopy(FULL_MANIFEST), schema)
    # Pydantic writes datetimes as ...Z and floats as floats; compare values, not spellings.
    assert FineTuneJob.model_validate(dumped) == job
    assert dumped["spec"] == expected["spec"]
    assert set(dumped["status"]) == set(FULL_MANIFEST["status"])


def test_invalid_manifest_list_is_large_and_unique() -> None:
    ids = [case.id for case in INVALID_MANIFESTS]
    assert len(ids) >= 18
    assert len(set(ids)) == len(ids)
    for case in INVALID_MANIFESTS:
        assert case.manifest["metadata"]["name"] == case.id
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", case.id)


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda c: c.id)
def test_models_reject_what_the_api_server_rejects(case: InvalidManifest, schema: Node) -> None:
    with pytest.raises(ValidationError) as info:
        FineTuneJob.model_validate(case.manifest)
    # Exactly one error: the case's single change, on an otherwise valid manifest.
    assert len(info.value.errors()) == 1, str(info.value)
    # CEL rules and their pydantic twins share one message.
    if any(case.expected in message for message in cel_messages(schema)):
        assert case.expected in str(info.value)


@pytest.mark.parametrize(
    "manifest",
    [c.manifest for c in FORBIDDEN_UPDATES_WITH_JOB] + ALLOWED_UPDATES_WITH_JOB,
)
def test_update_cases_differ_from_valid_only_by_immutability(manifest: dict[str, Any]) -> None:
    FineTuneJob.model_validate(manifest)


def test_timeout_seconds() -> None:
    spec = FineTuneSpec.model_validate({**MINIMAL_SPEC, "timeout": "1h30m"})
    assert spec.timeout_seconds() == 5400
    assert FineTuneSpec.model_validate(MINIMAL_SPEC).timeout_seconds() is None


def test_a_whole_default_with_a_fractional_exclusive_bound_is_refused_at_generation() -> None:
    # The API server compared default 0 with int(0.5) = 0 and refused the CRD.
    node = {"type": "number", "default": 0.0, "minimum": 0, "exclusiveMaximum": 0.5}
    with pytest.raises(ValueError, match="use an inclusive bound"):
        crd.structural_schema(node)
    node["default"] = 0.1
    assert crd.structural_schema(node)["maximum"] == 0.5
