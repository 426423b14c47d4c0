# The python3.11 runtime: Debian's python3 (3.11). Lambent's bootstrap is not baked in: the worker
# mounts its own at /var/runtime, so an upgrade of Lambent needs no new image.
FROM lambent/base:bookworm
ARG SANDBOX_UID=61000
ARG SANDBOX_GID=61000
RUN groupadd --gid "$SANDBOX_GID" sbx_user \
    && useradd --uid "$SANDBOX_UID" --gid sbx_user --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin sbx_user \
    && mkdir -p /var/task /var/runtime
WORKDIR /var/task
