from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from app.tenants.schemas import ResourceName

Runtime = Literal["python3.11", "nodejs20.x", "provided"]
Handler = Annotated[str, StringConstraints(pattern=r"^[^\s]{1,128}$")]
PackageType = Literal["Zip", "Image"]
# name[:tag] of an image on the workers; digests and ids are not accepted (see ImageSource).
ImageReference = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$",
        max_length=255,
    ),
]

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


class ImageSource(BaseModel):
    """A container image: an uploaded archive, or an image an operator put on the workers."""

    model_config = ConfigDict(extra="forbid")

    archive_base64: str | None = Field(
        None,
        description="A `docker save` archive of one image, base64-encoded (up to 256 MB this "
        "way; larger ones as the multipart file part `image`)",
    )
    reference: ImageReference | None = Field(
        None,
        description="name:tag of an image already on the workers; the operator decides which "
        "names functions may use (LAMBENT_IMAGE_REFERENCE_PATTERNS)",
    )

    @field_validator("reference")
    @classmethod
    def _a_name(cls, value: str | None) -> str | None:
        # The engine takes "sha256:<id>", and a bare hex string as the prefix of an image id,
        # so such a reference could run any image on the worker, another tenant's included.
        repository = (value or "").rpartition(":")[0] or (value or "")
        if value is not None and (repository == "sha256" or re.fullmatch("[0-9a-f]+", repository)):
            raise ValueError("image ids and digests are not accepted; name the image")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ImageSource:
        if (self.archive_base64 is None) == (self.reference is None):
            raise ValueError("give exactly one of archive_base64 and reference")
        return self


class FunctionSettings(BaseModel):
    """The configuration fields shared by create and update."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("environment", check_fields=False)
    @classmethod
    def _environment(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_environment(value)


class FunctionConfig(FunctionSettings):
    name: ResourceName
    package_type: PackageType = Field(
        "Zip", description="Zip: code for a runtime of Lambent's; Image: a container image"
    )
    runtime: Runtime | None = Field(None, description="Required for Zip; none for Image")
    handler: Handler | None = Field(
        None,
        description="module.function for python3.11, file.function for nodejs20.x, free text for "
        "provided (required for Zip). For Image, optional: passed as _HANDLER, which is "
        "otherwise the image's command",
    )
    memory_mb: MemoryMb = 128
    timeout_s: TimeoutS = 3
    environment: dict[str, str] = Field(default_factory=dict)
    description: Description = ""

    @model_validator(mode="after")
    def _fields_of_the_package_type(self) -> FunctionConfig:
        if self.package_type == "Zip" and (self.runtime is None or self.handler is None):
            raise ValueError("a Zip function needs a runtime and a handler")
        if self.package_type == "Image" and self.runtime is not None:
            raise ValueError("an Image function has no runtime: its image brings its own")
        return self


class FunctionCreate(FunctionConfig):
    code: CodeZip | None = Field(None, description="The zip package (package_type Zip)")
    image: ImageSource | None = Field(None, description="The container image (package_type Image)")

    @model_validator(mode="after")
    def _package_of_the_type(self) -> FunctionCreate:
        if self.package_type == "Zip" and (self.code is None or self.image is not None):
            raise ValueError("a Zip function takes code, and no image")
        if self.package_type == "Image" and (self.image is None or self.code is not None):
            raise ValueError("an Image function takes image, and no code")
        return self


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
    package_type: str
    runtime: str | None = Field(description="None for a container image function")
    handler: str
    image_uri: str | None = Field(
        description="An Image function's image: the reference it names, or for an uploaded "
        "archive the image's id"
    )
    memory_mb: int
    timeout_s: int
    environment: dict[str, str]
    description: str
    code_sha256: str = Field(description="The zip's, or the uploaded image archive's; '' otherwise")
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
