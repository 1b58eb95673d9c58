"""The origin: an S3-compatible object store under the SSD tier, shared by a fleet (docs/origin.md)."""
