# lambent-init alone (see lambent-init.c). Workers copy it out of this image once, at start, and
# mount it into every container they run.
FROM scratch
COPY lambent-init /lambent-init
