from pathlib import Path

import pytest

from anycast.core.config import ClusterConfig, load_config
from anycast.core.errors import ConfigError, InvalidInput, from_response
from anycast.core.geo import distance_km, estimated_rtt_ms


def test_default_cluster_has_three_regions_with_plausible_round_trips() -> None:
    config = ClusterConfig()
    assert [r.name for r in config.regions] == ["us-east", "eu-west", "ap-southeast"]
    assert config.rtt_ms("us-east", "us-east") == 0
    us_eu = config.rtt_ms("us-east", "eu-west")
    us_ap = config.rtt_ms("us-east", "ap-southeast")
    assert 50 < us_eu < 120
    assert us_ap > us_eu
    assert config.rtt_ms("eu-west", "us-east") == pytest.approx(us_eu)


def test_distance_between_known_cities() -> None:
    london_paris = distance_km(51.5074, -0.1278, 48.8566, 2.3522)
    assert 330 < london_paris < 360
    assert estimated_rtt_ms(0, 0, 0, 0) == 0


def test_config_round_trips_through_its_file(tmp_path: Path) -> None:
    config = ClusterConfig(home=tmp_path, control_port=17070, gateway_port=18080)
    config.save()
    loaded = load_config(tmp_path)
    assert loaded.control_port == 17070
    assert loaded.gateway_url == "http://127.0.0.1:18080"
    assert loaded.region_dir("eu-west") == tmp_path / "regions" / "eu-west"


def test_unknown_region_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="us-east, eu-west, ap-southeast"):
        ClusterConfig().region("mars-1")


def test_broken_config_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text("regions: [{name: 'Bad Name', latitude: 0}]")
    with pytest.raises(ConfigError, match="not a valid cluster configuration"):
        load_config(tmp_path)


def test_region_dir_refuses_path_tricks() -> None:
    with pytest.raises(InvalidInput):
        ClusterConfig().region_dir("../other")


def test_errors_round_trip_through_their_json_body() -> None:
    exc = from_response(409, {"error": {"code": "conflict", "message": "revision moved"}})
    assert exc.status == 409
    assert exc.message == "revision moved"
    unknown = from_response(500, "boom")
    assert "HTTP 500" in unknown.message
