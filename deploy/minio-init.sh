#!/bin/sh
# One-shot set-up of MinIO for Lambent, run by the compose file's minio-init service (image
# minio/mc): the packages bucket, and a MinIO user that may use that bucket and nothing else,
# so the root credentials stay with MinIO. Safe to run again on every `up`.
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$LAMBENT_S3_BUCKET"

policy=/tmp/lambent-packages.json
printf '%s\n' "{
  \"Version\": \"2012-10-17\",
  \"Statement\": [
    {\"Effect\": \"Allow\", \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\"],
     \"Resource\": [\"arn:aws:s3:::$LAMBENT_S3_BUCKET\"]},
    {\"Effect\": \"Allow\",
     \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\",
                \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"],
     \"Resource\": [\"arn:aws:s3:::$LAMBENT_S3_BUCKET/*\"]}
  ]
}" >"$policy"
mc admin policy create local lambent-packages "$policy"
mc admin user add local "$LAMBENT_S3_ACCESS_KEY_ID" "$LAMBENT_S3_SECRET_ACCESS_KEY"
# mc refuses to attach a policy that is already attached, so a re-run detaches it first.
mc admin policy detach local lambent-packages --user "$LAMBENT_S3_ACCESS_KEY_ID" >/dev/null 2>&1 \
    || true
mc admin policy attach local lambent-packages --user "$LAMBENT_S3_ACCESS_KEY_ID"
