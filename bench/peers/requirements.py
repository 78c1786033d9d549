"""Pinned requirements of each peer's venv (torch==2.13.0 is always installed first)."""

SHARED = ["numpy==2.4.6", "pillow==13.0.0", "safetensors==0.8.0"]

PEERS: dict[str, list[str]] = {
    "litserve": ["litserve==0.2.19", *SHARED],
    "bentoml": ["bentoml==1.4.40", *SHARED],
    "ray-serve": ["ray[serve]==2.60.0", *SHARED],
    "lepton-photon": ["leptonai==0.27.3", "fastapi<0.137", *SHARED],
}
