# The nodejs20.x runtime. Debian bookworm packages Node.js 18, so the build copies in the Node.js
# 20 binary of the machine that builds the image (`lambent images build` puts it in the build
# context as `node`); it needs only libc and libstdc++, which the base has.
FROM lambent/base:bookworm
ARG SANDBOX_UID=61000
ARG SANDBOX_GID=61000
COPY node /usr/bin/node
RUN groupadd --gid "$SANDBOX_GID" sbx_user \
    && useradd --uid "$SANDBOX_UID" --gid sbx_user --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin sbx_user \
    && mkdir -p /var/task /var/runtime \
    && node --version
WORKDIR /var/task
