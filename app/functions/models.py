from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Function(Base):
    __tablename__ = "functions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_functions_tenant_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    # "Zip": code for one of Lambent's runtimes. "Image": a container image, which brings its own
    # runtime (so runtime is None) and is either uploaded (its archive is the code blob, and
    # image_uri its image id) or named by reference (image_uri; no blob).
    package_type: Mapped[str] = mapped_column(String(8), default="Zip", server_default="Zip")
    runtime: Mapped[str | None] = mapped_column(String(32), nullable=True)
    handler: Mapped[str] = mapped_column(String(128))
    image_uri: Mapped[str | None] = mapped_column(String(255), nullable=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[int] = mapped_column(Integer)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    code_sha256: Mapped[str] = mapped_column(String(64), index=True)
    code_size: Mapped[int] = mapped_column(BigInteger)
    # None: no reservation (the function shares its tenant's limit). 0 throttles it.
    reserved_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    provisioned_concurrency: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Bumped on every change of code or configuration: instances of an older revision are never
    # handed new invocations. It is also SQLAlchemy's version counter, so two concurrent updates
    # of one function cannot both win: the second fails its WHERE revision = ... and retries.
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __mapper_args__ = {"version_id_col": revision}
