# The provided runtime: the function's own /var/task/bootstrap, started by Lambent's relay (which
# needs python3). curl is there for bootstraps written in shell, as on Lambda's provided images.
FROM lambent/base:bookworm
ARG SANDBOX_UID=61000
ARG SANDBOX_GID=61000
RUN groupadd --gid "$SANDBOX_GID" sbx_user \
    && useradd --uid "$SANDBOX_UID" --gid sbx_user --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin sbx_user \
    && mkdir -p /var/task /var/runtime
WORKDIR /var/task
