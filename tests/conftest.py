import os
import pathlib

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Beam's multi-process workers unpickle test functions by module name: let them import `tests.*`.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
SHARED = pathlib.Path(os.environ.get("MMCORPUS_SHARED", ROOT.parent / "shared")) / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def coco(shared_data) -> pathlib.Path:
    return shared_data / "coco-mini"


@pytest.fixture(scope="session")
def s3_endpoint():
    """One moto S3 server on 127.0.0.1 for the whole session (AWS_ENDPOINT_URL + dummy keys set while it runs)."""
    from tests.remote_servers import moto_s3

    with moto_s3() as endpoint:
        yield endpoint
