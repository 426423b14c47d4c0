from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.tenants.schemas import ResourceName

Runtime = Literal["python3.11", "provided"]
Handler = Annotated[str, StringConstraints(pattern=r"^[^\s]{1,128}$")]

ENV_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
ENV_MAX_BYTES = 4096  # Lambda's limit on all variables together
# Set by the platform for every instance; a function may not override them.
RESERVED_ENV = frozenset(
    {
        "_HANDLER",
        "_X_AMZN_TRACE_ID",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_LAMBDA_RUNTIME_API",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
    }
)

MemoryMb = Annotated[int, Field(ge=128, le=10240, description="Memory in MB, 128 to 10,240")]
TimeoutS = Annotated[int, Field(ge=1, le=900, description="Time limit in seconds, 1 to 900")]
Description = Annotated[str, Field(max_length=256)]


def check_environment(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if not ENV_KEY.match(key):
            raise ValueError(f"environment variable name {key!r} must match {ENV_KEY.pattern}")
        if key in RESERVED_ENV or key.startswith("LAMBENT_"):
            raise ValueError(f"environment variable {key!r} is reserved by the platform")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > ENV_MAX_BYTES:
        raise ValueError(f"environment variables take {size} bytes; the limit is {ENV_MAX_BYTES}")
    return env


class CodeZip(BaseModel):
    zip_base64: str = Field(description="The zip package, base64-encoded")


class FunctionSettings(BaseModel):
    """The configuration fields shared by create and update."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("environment", check_fields=False)
    @classmethod
    def _environment(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_environment(value)


class FunctionConfig(FunctionSettings):
    name: ResourceName
    runtime: Runtime
    handler: Handler = Field(description="module.function for python3.11; free text for provided")
    memory_mb: MemoryMb = 128
    timeout_s: TimeoutS = 3
    environment: dict[str, str] = Field(default_factory=dict)
    description: Description = ""


class FunctionCreate(FunctionConfig):
    code: CodeZip


class FunctionUpdate(FunctionSettings):
    runtime: Runtime | None = None
    handler: Handler | None = None
    memory_mb: MemoryMb | None = None
    timeout_s: TimeoutS | None = None
    environment: dict[str, str] | None = None
    description: Description | None = None


class FunctionOut(BaseModel):
    name: str
    arn: str
    runtime: str
    handler: str
    memory_mb: int
    timeout_s: int
    environment: dict[str, str]
    description: str
    code_sha256: str
    code_size: int
    reserved_concurrency: int | None = Field(
        description="None when the function has no reservation"
    )
    provisioned_concurrency: int
    revision: int
    created_at: datetime
    updated_at: datetime


class FunctionList(BaseModel):
    functions: list[FunctionOut]
    next_token: str | None = Field(None, description="Pass as next_token for the next page")


class ReservedConcurrency(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reserved_concurrency: int = Field(
        ge=0,
        description="Concurrent invocations reserved for (and allowed to) the function; "
        "0 throttles it",
    )


class ProvisionedConcurrencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provisioned_concurrency: int = Field(
        ge=0, le=1000, description="Instances kept initialised and ready; 0 turns it off"
    )


class ProvisionedConcurrencyOut(ProvisionedConcurrencyConfig):
    ready: int = Field(description="Provisioned instances initialised now")
    status: Literal["READY", "IN_PROGRESS", "OFF"]


class InstanceOut(BaseModel):
    id: str
    worker: str
    state: str = Field(description="initializing, idle or busy")
    provisioned: bool
    started_at: datetime
    last_used_at: datetime
    invocations: int


class InstanceList(BaseModel):
    instances: list[InstanceOut]
