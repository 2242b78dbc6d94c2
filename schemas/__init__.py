"""Arrow schemas of the run's outputs (manifest, images, instances) and their conventions."""

from schemas.tables import (
    ADDED_IN_VERSION_2,
    IMAGE_STATUSES,
    IMAGES,
    INSTANCES,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    at_version,
    check_version,
    geo_metadata,
    instances_schema,
)

__all__ = [
    "ADDED_IN_VERSION_2",
    "IMAGES",
    "IMAGE_STATUSES",
    "INSTANCES",
    "MANIFEST",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "at_version",
    "check_version",
    "geo_metadata",
    "instances_schema",
]
