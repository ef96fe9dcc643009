"""The placement's config (one model per backend, by ``type``) and the runtimes a policy may be placed on."""

from __future__ import annotations

import pytest

from stockade.errors import ConfigError
from stockade.placement import LocalPlacementConfig, RayPlacementConfig, parse_placement
from stockade.placement.base import runtime_choices
from stockade.policy import Policy
from stockade.settings import Settings


def test_a_backend_by_name_json_or_dict() -> None:
    assert parse_placement(None) == LocalPlacementConfig()
    assert parse_placement("local") == LocalPlacementConfig()
    ray = parse_placement('{"type": "ray", "address": "10.0.0.1:6379", "pool_size": 4}')
    assert isinstance(ray, RayPlacementConfig)
    assert (ray.address, ray.pool_size, ray.namespace, ray.claim_timeout) == ("10.0.0.1:6379", 4, "stockade", 30.0)
    assert parse_placement({"type": "ray", "address": "auto"}) == RayPlacementConfig(type="ray", address="auto")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("kubernetes", "type: 'kubernetes' is no placement (local, or ray with its address)"),
        ('{"type": "ray"}', "ray.address: Field required"),
        ('{"type": "ray", "address": "h:1", "adress": "x"}', "ray.adress: unknown field"),
        ('{"type": "local", "address": "h:1"}', "local.address: unknown field"),
        ('{"type": "ray", "address": "h:1", "pool_size": 65}', "ray.pool_size: Input should be less than or equal"),
        ('{"type": "ray", "address": "h:1", "namespace": "a b"}', "ray.namespace: String should match pattern"),
        ("{not json", "not JSON"),
    ],
)
def test_a_bad_config_names_what_is_wrong(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match="placement: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        parse_placement(value)


def test_the_setting_chooses_the_backend_and_its_errors_name_the_variable() -> None:
    assert Settings.load({}).placement == LocalPlacementConfig()
    chosen = Settings.load({"STOCKADE_PLACEMENT": '{"type": "ray", "address": "head:6379"}'}).placement
    assert isinstance(chosen, RayPlacementConfig) and chosen.address == "head:6379"
    with pytest.raises(ConfigError, match=r"STOCKADE_PLACEMENT: ray\.address: Field required"):
        Settings.load({"STOCKADE_PLACEMENT": '{"type": "ray"}'})


def test_the_runtimes_a_policy_may_be_placed_on() -> None:
    assert runtime_choices(Policy()) == (["process"], "runtime process")
    assert runtime_choices(Policy(runtime="gvisor")) == (["gvisor"], "runtime gvisor")
    assert runtime_choices(Policy(isolation="microvm")) == (["microvm"], "runtime microvm")
    # A trust: every level it accepts, strongest first (the cluster's nodes say which exist).
    assert runtime_choices(Policy(trust="verified"))[0] == ["gvisor", "microvm"]
    assert runtime_choices(Policy(trust="trusted"))[0] == ["process", "gvisor", "microvm"]


def test_serve_flags_give_the_placement_setting_or_name_what_is_missing() -> None:
    import json
    import subprocess
    import sys

    from stockade.cli_service import _placement_flags

    assert json.loads(_placement_flags("ray", "head:6379")) == {"type": "ray", "address": "head:6379"}
    assert json.loads(_placement_flags(None, "auto")) == {"type": "ray", "address": "auto"}  # the address implies ray
    assert _placement_flags("local", None) == "local"
    with pytest.raises(ConfigError, match="--placement ray needs --ray-address"):
        _placement_flags("ray", None)
    with pytest.raises(ConfigError, match="--ray-address is for --placement ray"):
        _placement_flags("local", "head:6379")
    # The daemon refuses the bad flags before it starts anything.
    refused = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "serve", "--placement", "ray", "--no-socket"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "--placement ray needs --ray-address" in refused.stderr
