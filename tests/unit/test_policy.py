"""Policy: one schema, safe defaults, hard maxima, errors that name the field."""

from __future__ import annotations

import pytest

from stockade import Mount, Policy, PolicyError
from stockade.policy import MIN_PIDS_LIMIT, coerce_policy


def test_defaults_are_safe() -> None:
    p = Policy()
    assert p.network_policy == "none"
    assert p.filesystem_access == ()
    assert p.environment == {}
    assert p.runtime is None and p.isolation is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mb", 4096),
        ("cpu_limit", 2.5),
        ("timeout_seconds", 601),
        ("timeout_seconds", 0),
        ("pids_limit", 0),
        ("max_output_bytes", -1),
        ("network_policy", "full"),
        ("isolation", "tee"),
    ],
)
def test_out_of_range_names_the_field(field: str, value: object) -> None:
    with pytest.raises(PolicyError, match=field):
        Policy.build(**{field: value})


@pytest.mark.parametrize("value", [0, 1, MIN_PIDS_LIMIT - 1])
def test_a_pids_limit_no_isolate_can_run_with_is_refused_naming_the_minimum(value: int) -> None:
    # pids_limit=1 used to validate, and then no isolate could start (namespaces: BlockingIOError).
    with pytest.raises(PolicyError, match=rf"pids_limit: .*at least {MIN_PIDS_LIMIT}: .*agent.*runner.*command"):
        Policy.build(pids_limit=value)
    assert Policy.build(pids_limit=MIN_PIDS_LIMIT).pids_limit == MIN_PIDS_LIMIT == 4


@pytest.mark.parametrize("value", [0, -1, 0.001, 0.0099])
def test_a_cpu_limit_below_what_a_cgroup_can_enforce_is_refused(value: float) -> None:
    # 0.001 used to validate and was quietly enforced as 0.01 (the smallest quota).
    with pytest.raises(PolicyError, match=r"cpu_limit: .*at least 0.01 cores: .*1 ms in every 100 ms"):
        Policy.build(cpu_limit=value)
    assert Policy.build(cpu_limit=0.01).cpu_limit == 0.01


def test_unknown_field_is_refused() -> None:
    with pytest.raises(PolicyError, match="memory_limit"):
        Policy.build(memory_limit=5)


def test_policy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Policy.build(cpu_limit=99)


def test_digest_is_canonical_and_sensitive() -> None:
    a = Policy.build(memory_mb=256, environment={"B": "2", "A": "1"})
    b = Policy.build(environment={"A": "1", "B": "2"}, memory_mb=256)
    assert a.digest == b.digest
    assert len(a.digest) == 64
    assert a.digest != Policy.build(memory_mb=257, environment={"A": "1", "B": "2"}).digest


def test_mount_short_form() -> None:
    m = Mount.parse("/opt/data:/data:rw")
    assert (m.source, m.target, m.writable) == ("/opt/data", "/data", True)
    m = Mount.parse("/opt/data")
    assert (m.source, m.target, m.writable) == ("/opt/data", "/opt/data", False)


@pytest.mark.parametrize(
    "spec", ["relative:/x", "/proc/1:/x", "/sys:/x", "/dev/kvm:/x", "/:/host", "/opt:/usr", "/opt:/proc/x", "/opt:/"]
)
def test_dangerous_mounts_are_refused(spec: str) -> None:
    with pytest.raises(PolicyError, match="filesystem_access"):
        Policy.build(filesystem_access=[spec])


def test_duplicate_mount_targets_refused() -> None:
    with pytest.raises(PolicyError, match="same target"):
        Policy.build(filesystem_access=["/opt/a:/data", "/opt/b:/data"])


def test_bad_environment_names_refused() -> None:
    with pytest.raises(PolicyError, match="environment"):
        Policy.build(environment={"A=B": "x"})


def test_an_environment_no_exec_could_take_is_refused() -> None:
    # Past the kernel's limits anyway (a run failed "Argument list too long"), and before, a daemon's
    # cache of policies kept 256 of them: 8 MiB each, sent by any caller.
    with pytest.raises(PolicyError, match=r"environment variable 'BIG' is 131074 bytes: at most 131072"):
        Policy.build(environment={"BIG": "x" * 131069})  # BIG=, its value and the NUL
    with pytest.raises(PolicyError, match=r"the environment is \d+ bytes: at most 1048576"):
        Policy.build(environment={f"V{i}": "x" * (100 << 10) for i in range(11)})
    assert Policy.build(environment={"OK": "x" * (100 << 10)}).environment["OK"]


def test_coerce_accepts_dict_and_overrides() -> None:
    p = coerce_policy({"memory_mb": 128}, timeout_seconds=5, cpu_limit=None)
    assert p.memory_mb == 128 and p.timeout_seconds == 5 and p.cpu_limit == 1.0
    with pytest.raises(PolicyError):
        coerce_policy("nope")  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    p = Policy()
    with pytest.raises(Exception):
        p.memory_mb = 5  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value"), [("timeout_seconds", True), ("memory_mb", "256"), ("cpu_limit", "1")])
def test_values_are_taken_as_json_gives_them(field: str, value: object) -> None:
    # A string is not read as a number, nor true as 1: a request says what it means.
    with pytest.raises(PolicyError, match=field):
        Policy.build(**{field: value})


def test_building_a_policy_directly_raises_policy_error_naming_the_field() -> None:
    # Not pydantic's ValidationError: callers catch stockade's tree.
    with pytest.raises(PolicyError, match=r"^invalid policy: memory_mb: Input should be less than or equal to 2048"):
        Policy(memory_mb=99999)
    with pytest.raises(PolicyError, match="surprise: unknown field"):
        Policy(surprise=1)


def test_an_unknown_field_suggests_the_nearest_one() -> None:
    with pytest.raises(PolicyError, match=r"memory: unknown field \(did you mean memory_mb\?\)"):
        Policy.build(memory=128)
    # Names other sandboxes give the same thing (docker's mounts and volumes, cpus).
    for other, ours in (("mounts", "filesystem_access"), ("volumes", "filesystem_access"), ("cpus", "cpu_limit")):
        with pytest.raises(PolicyError, match=rf"{other}: unknown field \(did you mean {ours}\?\)"):
            Policy.build(**{other: 1})


# ---- a dataclass that checks itself, and the doors that read it ---------------------------


def test_json_values_become_the_fields_types() -> None:
    p = Policy.build(timeout_seconds=5, allowed_hosts=["a.example"], network_policy="allowlist",
                     filesystem_access=[{"source": "/srv", "target": "/data"}], secrets=["T@a.example"])  # fmt: skip
    assert p.timeout_seconds == 5.0 and isinstance(p.timeout_seconds, float)
    assert p.allowed_hosts == ("a.example",) and p.filesystem_access == (Mount(source="/srv", target="/data"),)
    assert p.secrets[0].hosts == ("a.example",)
    assert Policy(**p.fields()) == p and Policy(**p.to_dict()) == p
    assert p.non_defaults() == {
        "timeout_seconds": 5.0, "network_policy": "allowlist", "allowed_hosts": ["a.example"],
        "filesystem_access": [{"source": "/srv", "target": "/data", "writable": False}],
        "secrets": [{"name": "T", "hosts": ["a.example"], "header": "Authorization", "format": "Bearer {value}"}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"memory_mb": True}, "memory_mb: Input should be a valid integer"),
        ({"memory_mb": 256.0}, "memory_mb: Input should be a valid integer"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds: Input should be a finite number"),
        ({"cpu_limit": float("nan")}, "cpu_limit: Input should be a finite number"),  # not "at most 2"
        ({"cpu_limit": float("inf")}, "cpu_limit: Input should be a finite number"),
        ({"timeout_seconds": 10**400}, "timeout_seconds: Input should be a valid number"),
        ({"allowed_hosts": "a.example"}, "allowed_hosts: Input should be a list"),
        ({"environment": {"A": 1}}, "environment.A: Input should be a valid string"),
        ({"filesystem_access": ["/srv", {"source": "/srv", "mode": "rw"}]}, "filesystem_access.1.mode: unknown field"),
        ({"filesystem_access": ["/srv", "/proc:/p"]}, "filesystem_access.1: source /proc may not be shared"),
        ({"memory_mb": 1, "disk_mb": 0}, "memory_mb: Input should be greater than or equal to 16; disk_mb: Input"),
        (  # every wrong item of a list, and each problem of one, not only the first
            {"filesystem_access": ["/proc:/p", "/srv", {"source": "/srv", "x": 1, "y": 2}, "srv"]},
            "filesystem_access.0: source /proc may not be shared into a sandbox; filesystem_access.2.x: unknown "
            "field; filesystem_access.2.y: unknown field; filesystem_access.3: source 'srv' must be an absolute path",
        ),
        (
            {"environment": {"A": 1, "B": "b", "C": None}},
            "environment.A: Input should be a valid string; environment.C",
        ),
    ],
)
def test_every_problem_is_named_where_it_is(fields: dict[str, object], said: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.build(**fields)
    assert str(caught.value).startswith("invalid policy: " + said)


def test_a_change_is_checked_and_the_runtime_s_own_mount_keeps_the_digest() -> None:
    p = Policy.build(memory_mb=256)
    with pytest.raises(PolicyError, match="memory_mb"):
        p.replace(memory_mb=1)
    assert p.replace(disk_mb=8).disk_mb == 8 and p.disk_mb == 64
    grown = p.with_mount(Mount(source="/srv", target="/opt/stockade/env"))
    assert grown.filesystem_access[-1].target == "/opt/stockade/env" and p.filesystem_access == ()
    assert grown.digest == p.digest  # the policy the caller asked for, not the runtime's addition


def test_a_request_model_reads_a_policy_through_the_same_checks() -> None:
    from stockade.protocol.models import ExecuteRequest, parse

    request = parse(ExecuteRequest, {"code": "pass", "policy": {"memory_mb": 256, "filesystem_access": ["/srv"]}}, "x")
    assert request.policy == Policy.build(memory_mb=256, filesystem_access=["/srv"])
    assert request.model_dump(mode="json")["policy"] == request.policy.to_dict()
    for bad in ({"memory_mb": "256"}, {"memroy_mb": 1}, {"filesystem_access": [{"source": "/srv", "x": 1}]}):
        with pytest.raises(PolicyError) as at_the_door:
            parse(ExecuteRequest, {"code": "pass", "policy": bad}, "x")
        with pytest.raises(PolicyError) as in_process:
            Policy.build(**bad)
        assert str(at_the_door.value) == str(in_process.value)


def test_the_json_schema_is_read_from_the_fields() -> None:
    from pydantic import TypeAdapter

    schema = TypeAdapter(Policy).json_schema()
    memory = schema["properties"]["memory_mb"]
    assert (memory["minimum"], memory["maximum"], memory["type"], memory["default"]) == (16, 2048, "integer", 512)
    assert memory["description"] == "memory limit, MB"
    assert schema["properties"]["network_policy"]["enum"] == ["none", "loopback", "allowlist"]
    assert schema["$defs"]["Mount"]["required"] == ["source"]


def test_a_runtime_that_is_none_of_stockades_is_refused_when_the_policy_is_made() -> None:
    with pytest.raises(
        PolicyError, match=r"runtime: 'docker' is no runtime \(one of process, gvisor, microvm, fake\)$"
    ):
        Policy(runtime="docker")
    with pytest.raises(PolicyError, match=r"did you mean 'gvisor'\?"):
        Policy.build(runtime="gvisr")
    assert Policy(runtime="microvm").runtime == "microvm" and Policy().runtime is None


def test_the_http_apis_cache_of_policies_holds_no_large_request() -> None:
    # Keyed by what a caller sent: 256 distinct environments of a MiB each were kept for the daemon's life.
    from stockade.server import seed

    small = seed.SeedExecuteRequest(agent_id="a", code="1", environment={"A": "1"})
    large = seed.SeedExecuteRequest(agent_id="a", code="1", environment={"A": "x" * 100_000})
    seed._policy.cache_clear()
    assert small.policy() is small.policy()  # built once
    assert large.policy().environment["A"] == "x" * 100_000
    assert seed._policy.cache_info().currsize == 1


def test_a_list_or_dict_past_its_bound_is_one_problem_and_a_message_names_twenty() -> None:
    """Two million wrong items were two million problems: ten seconds to check, a message of megabytes."""
    from stockade.errors import InvalidRequestError
    from stockade.protocol.models import ExecuteRequest, SandboxExec, parse

    for fields, said in (
        ({"allowed_hosts": [0] * 2_000_000}, "allowed_hosts: List should have at most 256 items after validation"),
        ({"secrets": [{"name": "A", "hosts": ["x.example"] * 257}]}, "secrets.0.hosts: List should have at most 256"),
        ({"environment": {str(i): 0 for i in range(5000)}}, "environment: Dictionary should have at most 4096"),
    ):
        with pytest.raises(PolicyError) as caught:
            Policy.build(**fields)
        assert str(caught.value).startswith(f"invalid policy: {said}") and len(caught.value.problems) == 1
    with pytest.raises(PolicyError) as caught:
        Policy.build(allowed_hosts=[0] * 200)
    assert len(caught.value.problems) == 200
    assert str(caught.value).endswith("allowed_hosts.19: Input should be a valid string; and 180 more")
    with pytest.raises(PolicyError, match=r"k9: unknown field; policy: 99990 more unknown fields$"):
        Policy.build(**{f"k{i}": 0 for i in range(100_000)})
    # A long name is not searched for its nearest (as long as it is), and is said cut.
    with pytest.raises(PolicyError) as caught:
        Policy.build(**{str(i) * 700_000: 0 for i in range(10)})
    assert len(str(caught.value)) < 2000 and "0000000000...: unknown field" in str(caught.value)
    with pytest.raises(InvalidRequestError, match="command: List should have at most 16384 items after"):
        parse(ExecuteRequest, {"command": [0] * 100_000}, "execute request")
    with pytest.raises(InvalidRequestError, match="env: Dictionary should have at most 4096 items, not"):
        parse(SandboxExec, {"sandbox_id": "s", "command": ["true"], "env": {str(i): 0 for i in range(5000)}}, "exec")
    from stockade.daemon.mcp import McpCall

    with pytest.raises(InvalidRequestError, match="config: Dictionary should have at most 16 items, not 100000"):
        parse(McpCall, {"config": {str(i): 0 for i in range(100_000)}, "server": "s", "tool": "t"}, "mcp call")


def test_no_caller_mount_covers_the_environments_place_with_or_without_an_environment() -> None:
    """Without an environment a caller's mount there was let by, its source passed under
    STOCKADE_MOUNT_ROOTS as the store's own would be (a build in progress, its pip.log)."""
    for target in ("/opt/stockade/env", "/opt/stockade/env/python"):
        with pytest.raises(PolicyError, match=f"target {target} is the environment's place"):
            Policy(filesystem_access=[f"/srv:{target}"])
    # Above it, a mount is a caller's (its source is checked as any other): refused only over an environment.
    for target in ("/opt/other", "/opt", "/opt/stockade"):
        assert Policy(filesystem_access=[f"/srv:{target}"]).filesystem_access[0].target == target


def test_a_requests_unknown_field_is_answered_with_the_nearest_it_has() -> None:
    from stockade.errors import InvalidRequestError
    from stockade.protocol.models import SandboxExec, parse

    with pytest.raises(InvalidRequestError, match=r"comand: unknown field \(did you mean 'command'\?\)"):
        parse(SandboxExec, {"sandbox_id": "sb-1", "comand": ["true"]}, "sandbox.exec")
    with pytest.raises(InvalidRequestError, match=r"zzzzzz: unknown field$"):  # nothing near: no guess
        parse(SandboxExec, {"sandbox_id": "sb-1", "command": ["true"], "zzzzzz": 1}, "sandbox.exec")
    # Many are one complaint, naming ten: pydantic's report of one error each held the loop for a second.
    with pytest.raises(InvalidRequestError) as caught:
        parse(SandboxExec, {"sandbox_id": "sb-1", "command": ["true"], **{f"x{i}": 0 for i in range(99_999)}}, "exec")
    assert str(caught.value) == (
        "invalid exec: exec: 99999 unknown fields ('x0', 'x1', 'x2', 'x3', 'x4', 'x5', 'x6', 'x7', 'x8', 'x9', ...)"
    )


def test_a_path_with_a_nul_byte_is_refused_as_such() -> None:
    with pytest.raises(PolicyError, match="holds a NUL byte, which no path can"):
        Policy(filesystem_access=[{"source": "/srv/a\0b", "target": "/data"}])


def test_a_policy_setting_given_beside_the_policy_is_told_where_it_goes() -> None:
    # {"memory_mb": 256} for a held sandbox's create was "unknown field", with nothing to say why.
    from stockade.errors import InvalidRequestError
    from stockade.protocol.models import SandboxCreate, parse

    with pytest.raises(
        InvalidRequestError, match=r'memory_mb: unknown field \(a policy setting: put it under "policy"\)'
    ):
        parse(SandboxCreate, {"memory_mb": 256}, "sandbox.create request")
