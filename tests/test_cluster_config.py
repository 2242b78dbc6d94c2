"""ray_cluster.yaml is a valid Ray cluster config with the promised shape."""

from __future__ import annotations

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


def load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_validates_against_rays_own_schema():
    # prepare_config fills Ray's defaults, as `ray up` does, before its schema check.
    validate_config(prepare_config(load()))


def test_head_takes_no_work_and_gpu_workers_are_spot():
    config = load()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers, "no worker node type"
    gpu_types = [t for t in workers if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types and all(
        t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in gpu_types
    )
    assert all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)


def test_setup_installs_this_project_from_the_mounted_checkout():
    config = load()
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert any(f"pip install -e {mount}" in c for c in config["setup_commands"])
