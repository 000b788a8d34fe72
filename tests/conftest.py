import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models run fastest on one thread (and script subprocesses inherit OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory):
    """A tiny SD1.5-shaped ControlNet pipeline saved with save_pretrained (built once per session)."""
    from diffusers_innercontrol.toy.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_pipeline")))


@pytest.fixture(scope="session")
def tiny_components_session():
    from diffusers_innercontrol.toy.tiny import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture
def tiny_components(tiny_components_session):
    """The session's tiny models, reset to eval mode and with gradients enabled as built."""
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        m = tiny_components_session[name]
        m.eval()
        m.requires_grad_(True)
        m.zero_grad(set_to_none=True)
    return tiny_components_session


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
