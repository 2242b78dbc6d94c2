"""Arrow schemas of the run's outputs (manifest, images, instances) and their conventions."""

from schemas.tables import (
    IMAGE_STATUSES,
    IMAGES,
    INSTANCES,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    check_version,
    geo_metadata,
    instances_schema,
)

__all__ = [
    "IMAGES",
    "IMAGE_STATUSES",
    "INSTANCES",
    "MANIFEST",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "check_version",
    "geo_metadata",
    "instances_schema",
]
