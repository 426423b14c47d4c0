"""Function packages: validating and unpacking zip files, spooling uploads, storing blobs."""
