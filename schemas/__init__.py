"""Arrow schemas of the run's outputs (manifest, images, instances, slides) and their conventions."""

from schemas.tables import (
    ADDED_IN_VERSION_2,
    ADDED_IN_VERSION_3,
    ADDED_IN_VERSION_4,
    IMAGE_STATUSES,
    IMAGES,
    INSTANCES,
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    SLIDE_STATUSES,
    SLIDES,
    at_version,
    check_version,
    geo_metadata,
    instances_schema,
)

__all__ = [
    "ADDED_IN_VERSION_2",
    "ADDED_IN_VERSION_3",
    "ADDED_IN_VERSION_4",
    "IMAGES",
    "IMAGE_STATUSES",
    "INSTANCES",
    "MANIFEST",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "SLIDES",
    "SLIDE_STATUSES",
    "at_version",
    "check_version",
    "geo_metadata",
    "instances_schema",
]
