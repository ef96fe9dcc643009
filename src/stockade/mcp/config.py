"""``isolation_config.json``: which MCP servers there are, how each starts, and how each tool is isolated.

The format is seed 001's (``default_execution_mode``, ``mcp_servers.<id>.tools.<name>`` with
``execution_mode``, ``memory_mb``, ``vcpus``, ``timeout_secs``, ``network_enabled``, ``mounts``,
``env_vars``), with what a server needs to start (``command``, ``args``, ``env``; stdio) and
stockade's own keys: ``lifecycle``, ``expose``, ``allowed_hosts``, ``allowed_cidrs``, ``secrets``, ``packages``,
``environment_name``. The tool options may also stand on a server, as its tools' defaults.

Every tool resolves to a ``Policy`` (or to ``direct``: no isolation, only where the file says
``direct`` itself). An unknown key or a bad value is refused with its path in the file
(``mcp_servers.solana.tools.get_balance.memory_mb: ...``); so is ``unikernel``, which asks for
what this host cannot give (stockade has no unikernel runtime), never downgraded.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, PolicyError
from ..limits import MAX_ARGV_ITEMS, MAX_LIST_ITEMS
from ..policy import Policy
from ..protocol.models import Env, items_at_most

CONFIG_NAME = "isolation_config.json"
MAX_CONFIG_BYTES = 1 << 20
# Each tool's policy is made (checked) as the config is read, a daemon's caller's on its event loop:
# far more than any real file needs, far less than a 16 MiB request could name.
MAX_SERVERS = 64
MAX_TOOLS = 1024  # listed, over all servers
# Each list and map of a config bounded, and checked by its count before its items (a config of
# two million wrong args held a daemon's loop for 15 s while each was said); and all of them together,
# counted before anything is checked (lists each within its bound, 30 servers' worth, took 65 s and 13 GB).
Items = Annotated[tuple[str, ...], items_at_most(MAX_LIST_ITEMS)]
MAX_CONFIG_VALUES = 100_000


def count_values(data: Any, limit: int) -> int:
    """The items of the lists and maps in ``data`` together, counted until past ``limit``."""
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            count += len(value)
            if count > limit:
                break
            stack.extend(value.values() if isinstance(value, dict) else value)
    return count


ExecutionMode = Literal["direct", "process", "gvisor", "microvm", "unikernel", "isolated"]
# An isolate's own options: a persistent server's tools share one isolate, so these are the server's.
ISOLATE_OPTIONS = ("execution_mode", "memory_mb", "vcpus", "network_enabled", "mounts", "env_vars")
# What a unikernel would need, and why this host has none: as `stockade doctor` words a missing runtime.
UNIKERNEL_REFUSED = (
    "execution_mode 'unikernel' is not offered here: stockade has no unikernel runtime (its runtimes are "
    "process, gvisor and microvm; 'isolated' picks the strongest of them that works on this host)"
)


# A Policy's field, as the config file calls what set it.
_POLICY_TO_CONFIG = {
    "filesystem_access": "mounts",
    "cpu_limit": "vcpus",
    "environment_name": "environment_name",
    "environment": "env_vars",
    "timeout_seconds": "timeout_secs",
    "network_policy": "network_enabled",
}


class MountConfig(BaseModel):
    """Seed 001's mount: ``host_path`` shown at ``guest_path``, read-only unless ``readonly`` is false."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_path: str
    guest_path: str
    readonly: bool = True


class ToolOptions(BaseModel):
    """The options a tool (or, as its tools' defaults, a server) may set; None: not said here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    execution_mode: ExecutionMode | None = None
    unikernel_image: str | None = None  # seed 001's; refused with unikernel itself
    memory_mb: int | None = Field(default=None, ge=16)
    vcpus: float | None = Field(default=None, gt=0)
    timeout_secs: float | None = Field(default=None, gt=0)
    network_enabled: bool | None = None
    mounts: Annotated[tuple[MountConfig, ...], items_at_most(MAX_LIST_ITEMS)] | None = None
    env_vars: Env | None = None


class ServerConfig(ToolOptions):
    """One MCP server: how to start it (stdio), what it may reach, and its tools."""

    command: str = Field(min_length=1)
    args: Annotated[tuple[str, ...], items_at_most(MAX_ARGV_ITEMS)] = ()
    env: Env = Field(default_factory=dict)
    lifecycle: Literal["ephemeral", "persistent"] = "ephemeral"
    expose: Literal["listed", "all"] = "listed"
    allowed_hosts: Items = ()
    allowed_cidrs: Items = ()
    secrets: Annotated[tuple[Any, ...], items_at_most(MAX_LIST_ITEMS)] = ()  # SecretGrant or NAME@HOST: Policy's
    packages: Items = ()
    environment_name: str | None = None
    tools: dict[str, ToolOptions] = Field(default_factory=dict)  # all servers' together: IsolationConfig's bound

    @model_validator(mode="after")
    def _persistent_tools_share_the_isolate(self) -> ServerConfig:
        if self.lifecycle == "persistent":
            for name, tool in self.tools.items():
                for option in ISOLATE_OPTIONS:
                    if getattr(tool, option) is not None:
                        raise ValueError(
                            f"tools.{name}.{option}: the tools of a persistent server share its isolate; "
                            "set it on the server"
                        )
        return self


class IsolationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_execution_mode: ExecutionMode = "process"  # stockade's default runtime; "isolated": the strongest
    mcp_servers: Annotated[dict[str, ServerConfig], items_at_most(MAX_SERVERS)] = Field(
        default_factory=dict, max_length=MAX_SERVERS
    )
    source: str = Field(default="", exclude=True)  # the file it was read from, for messages

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if (held := count_values(data, MAX_CONFIG_VALUES)) > MAX_CONFIG_VALUES:
            raise ValueError(f"the config holds more than {MAX_CONFIG_VALUES} values in its lists and maps ({held}+)")
        servers = data.get("mcp_servers") if isinstance(data, dict) else None
        if isinstance(servers, dict):
            tools = [s.get("tools") for s in servers.values() if isinstance(s, dict)]
            listed = sum(len(t) for t in tools if isinstance(t, dict))
            if listed > MAX_TOOLS:
                raise ValueError(f"mcp_servers: {listed} tools are listed, more than {MAX_TOOLS} in all")
        return data

    @field_validator("mcp_servers")
    @classmethod
    def _names(cls, servers: dict[str, ServerConfig]) -> dict[str, ServerConfig]:
        for name in servers:
            if not name or "/" in name or "." in name:
                raise ValueError(f"{name!r} is not a server id (no '/' or '.': the gateway names tools server.tool)")
        return servers

    @classmethod
    def parse(cls, data: Any, source: str = "") -> IsolationConfig:
        """``data`` (the file's JSON) checked; ConfigError naming the path of what is wrong."""
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source or CONFIG_NAME}: {_first_error(exc)}") from None
        config = config.model_copy(update={"source": source})
        for server_id, server in config.mcp_servers.items():
            for tool in [None, *server.tools]:
                config.policy_for(server_id, tool)  # every tool's policy made once: refused now, not at a call
        return config

    def server(self, server_id: str) -> ServerConfig:
        try:
            return self.mcp_servers[server_id]
        except KeyError:
            known = ", ".join(sorted(self.mcp_servers)) or "none"
            where = self.source or CONFIG_NAME
            raise ConfigError(f"no MCP server {server_id!r} in {where} (servers: {known})") from None

    def exposes(self, server_id: str, tool: str) -> bool:
        server = self.server(server_id)
        return server.expose == "all" or tool in server.tools

    def options(self, server_id: str, tool: str | None) -> ToolOptions:
        """``tool``'s options over its server's over the file's default (``tool`` None: the server's)."""
        server = self.server(server_id)
        said: dict[str, Any] = {"execution_mode": self.default_execution_mode}
        for layer in (server, server.tools.get(tool) if tool is not None else None):
            if layer is not None:
                said.update({k: v for k, v in layer.model_dump(include=set(ToolOptions.model_fields)).items()
                             if v is not None})  # fmt: skip
        return ToolOptions.model_validate(said)

    def policy_for(self, server_id: str, tool: str | None) -> Policy | None:
        """The policy ``tool`` of ``server_id`` runs under (None: ``direct``, no isolate)."""
        server = self.server(server_id)
        where = f"mcp_servers.{server_id}" + (f".tools.{tool}" if tool is not None and tool in server.tools else "")
        options = self.options(server_id, tool)
        mode = options.execution_mode
        if mode == "unikernel" or options.unikernel_image is not None:
            raise ConfigError(f"{self.source or CONFIG_NAME}: {where}.execution_mode: {UNIKERNEL_REFUSED}")
        if mode == "direct":
            return None
        if options.network_enabled is False and server.allowed_hosts:
            raise ConfigError(
                f"{self.source or CONFIG_NAME}: {where}.network_enabled: false, yet mcp_servers.{server_id}"
                ".allowed_hosts names hosts"
            )
        if options.network_enabled and not server.allowed_hosts:
            raise ConfigError(
                f"{self.source or CONFIG_NAME}: {where}.network_enabled: name the hosts it may reach in "
                f"mcp_servers.{server_id}.allowed_hosts (stockade's network is an allow-list)"
            )
        fields: dict[str, Any] = {
            "memory_mb": options.memory_mb or 512,
            "cpu_limit": options.vcpus or 1.0,
            "timeout_seconds": max(options.timeout_secs or 30.0, 1.0),
            "network_policy": "allowlist" if server.allowed_hosts else "none",
            "allowed_hosts": server.allowed_hosts,
            "allowed_cidrs": server.allowed_cidrs,
            "secrets": server.secrets,
            "filesystem_access": [
                {"source": m.host_path, "target": m.guest_path, "writable": not m.readonly}
                for m in options.mounts or ()
            ],
            "environment": {**server.env, **(options.env_vars or {})},
            "packages": server.packages,
            "environment_name": server.environment_name,
        }
        if mode == "isolated":
            # Any runtime will do; ToolHost puts it on the strongest that works here (and serves the policy).
            fields["trust"] = "trusted"
        else:
            fields["runtime"] = mode
        try:
            return Policy(**fields)
        except PolicyError as exc:
            where_in, message = (exc.problems or (((), str(exc)),))[0]
            if not where_in:  # a check of several fields together: said of the tool's whole policy
                raise ConfigError(f"{self.source or CONFIG_NAME}: {where}: {message}") from None
            said = f"{'.'.join(map(str, where_in))}: {message}"
            for policy_name, config_name in _POLICY_TO_CONFIG.items():  # in the file's words
                if said.startswith(policy_name):
                    said = config_name + said[len(policy_name) :]
            raise ConfigError(f"{self.source or CONFIG_NAME}: {where}.{said}") from None


def find_config(path: str | None = None) -> str:
    """The config file: ``path``, else ``$STOCKADE_CONFIG_DIR``'s (default ``~/.config/stockade/``)."""
    if path:
        return path
    from ..settings import current

    return os.path.join(current().config_dir, CONFIG_NAME)


def load_config(path: str | None = None) -> IsolationConfig:
    where = find_config(path)
    try:
        with open(where, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"no MCP isolation config at {where}: write one (docs/mcp.md) or give --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not JSON: {exc}") from None
    return IsolationConfig.parse(data, where)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message
