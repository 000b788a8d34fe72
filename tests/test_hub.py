"""diffusers_innercontrol.hub: the model card (YAML metadata, fields, images) and the upload order/failure."""

import os

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_innercontrol import hub
from diffusers_innercontrol.tasks import get_task


def test_controlnet_card_fields_and_images(tmp_path):
    task = get_task("depth").replace(alpha=0.25, alignment_window=(10, 900))
    images = [Image.new("RGB", (8, 4), "red"), Image.new("RGB", (8, 4), "blue")]
    path = hub.save_model_card(
        str(tmp_path), base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", task=task, probe="me/probe-depth",
        reward_model="Intel/dpt-hybrid-midas", dataset="limingcv/MultiGen-20M_depth", images=images,
        validation_prompts=["a room", "a street"], train_args={"steps": 12, "validation_guidance_scale": None},
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m" and card.data.library_name == "diffusers"
    assert {"controlnet", "innercontrol", "diffusers", "depth"} <= set(card.data.tags)
    assert card.data.datasets == ["limingcv/MultiGen-20M_depth"]
    text = card.text
    for row in ("| alpha (reward weight) | `0.25` |", "| beta (alignment weight) | `1.0` |",
                "| reward window (t) | `[0, 400]` |", "| alignment window (t) | `[10, 900]` |",
                "| readout probe | `me/probe-depth` |", "| reward model | `Intel/dpt-hybrid-midas` |",
                "| steps | `12` |", "| alignment loss | `mse` |"):
        assert row in text, row
    assert "Mode: InnerControl (reward + alignment)." in text
    assert "validation_guidance_scale" not in text  # a setting that did not apply has no row
    assert "guidance_scale=" not in text  # the how-to keeps the pipeline's default guidance
    assert "![a room](./images_0.png)" in text and "![a street](./images_1.png)" in text
    assert Image.open(tmp_path / "images_1.png").getpixel((0, 0)) == (0, 0, 255)


def test_card_how_to_samples_at_the_validation_guidance(tmp_path):
    path = hub.save_model_card(str(tmp_path), base_model="b", task=get_task("hed"),
                               train_args={"validation_guidance_scale": 3.0})
    text = ModelCard.load(path).text
    assert "| validation_guidance_scale | `3.0` |" in text
    assert 'guidance_scale=3.0, generator=torch.Generator("cuda").manual_seed(0)).images[0]' in text


@pytest.mark.parametrize("alpha,beta,mode", [(0, 0, "ControlNet (diffusion loss only)"),
                                             (1, 0, "ControlNet++ (reward, no alignment)"), (0, 1, "alignment only")])
def test_card_names_the_baseline(tmp_path, alpha, beta, mode):
    path = hub.save_model_card(str(tmp_path), base_model="b", task=get_task("hed").replace(alpha=alpha, beta=beta))
    assert f"Mode: {mode}." in open(path).read()


def test_probe_card_and_local_base_model(tmp_path):
    path = hub.save_model_card(str(tmp_path), base_model=str(tmp_path), model_kind="probe", task=get_task("segmentation"))
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local path is not valid Hub metadata; it is in the table
    assert {"readout-probe", "innercontrol", "segmentation"} <= set(card.data.tags)
    assert "ReadoutProbe" in card.text and "| feature kind | `resnet` |" in card.text
    assert "alpha" not in card.text
    with pytest.raises(ValueError, match="model_kind must be one of"):
        hub.save_model_card(str(tmp_path), base_model="b", model_kind="vae")


def test_push_writes_the_card_before_the_upload(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    seen = {}

    class Repo:
        repo_id = "me/model"

    def fake_upload(repo_id, folder_path, **kwargs):
        seen["card"] = open(os.path.join(folder_path, "README.md")).read()
        seen["ignore"] = kwargs.get("ignore_patterns")

        class Info:
            commit_url = "https://hf.co/me/model/commit/1"

        return Info()

    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    url = hub.push_folder(str(tmp_path), "me/model", card_kwargs=dict(base_model="b", task=get_task("lineart")))
    assert url.endswith("/commit/1")
    assert "task **lineart**" in seen["card"]
    assert "checkpoint-*" in seen["ignore"]


def test_failed_upload_keeps_the_local_save_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    hub.save_model_card(str(tmp_path), base_model="b", task=get_task("hed"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(hub.HubUploadError, match=r"to the Hub repo 'me/x' failed .*saved locally in .*hf upload me/x"):
        hub.push_folder(str(tmp_path), "me/x")
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"


def test_card_license_follows_a_local_base_model(tmp_path):
    """A model trained from a local base model (the bundled toy SD) inherits its card's license; a Hub id or a
    folder without a card gets SD1.5's."""
    base = tmp_path / "toy-sd"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n\n# toy\n")
    path = hub.save_model_card(str(tmp_path / "cn"), base_model=str(base), task=get_task("hed"))
    assert ModelCard.load(path).data.license == "apache-2.0"
    assert hub.base_model_license(str(tmp_path / "no-card")) == "creativeml-openrail-m"
    assert hub.base_model_license("stable-diffusion-v1-5/stable-diffusion-v1-5") == "creativeml-openrail-m"
    explicit = hub.save_model_card(str(tmp_path / "cn2"), base_model=str(base), task=get_task("hed"), license="mit")
    assert ModelCard.load(explicit).data.license == "mit"


def _code_blocks(text):
    return [block.split("\n", 1)[1] for block in text.split("```py")[1:] for block in [block.split("```")[0]]]


def test_card_of_a_toy_model_names_no_machine_path_and_its_code_runs_as_written(tmp_path):
    """A ControlNet of the bundled toy SD: the card says it is a toy, names folders (not paths), has a
    limitations section, valid Hub metadata, and How-to-use code in which every name is defined."""
    import ast

    from huggingface_hub import metadata_load

    toy = tmp_path / "somewhere" / "toy-sd"
    toy.mkdir(parents=True)
    (toy / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- toy\n- shapesworld\n---\n# toy\n")
    out = tmp_path / "out"
    path = hub.save_model_card(str(out), base_model=str(toy), task=get_task("hed"), probe=str(tmp_path / "p" / "probe-hed"),
                               dataset=str(tmp_path), train_args={"steps": 3, "data": str(tmp_path / "cache" / "x")})
    text = open(path).read()
    assert str(tmp_path) not in text  # no machine paths, anywhere
    assert "A ShapesWorld toy." in text and "## Limitations" in text and "| base model | `toy-sd` |" in text
    assert "| readout probe | `probe-hed` |" in text and "| data | `x` |" in text
    meta = metadata_load(path)
    assert meta["pipeline_tag"] == "text-to-image" and "base_model" not in meta and {"toy", "shapesworld"} <= set(meta["tags"])
    assert ModelCard.load(path).data.license == "apache-2.0"
    (code,) = _code_blocks(text)
    tree = ast.parse(code)  # valid Python
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in ast.walk(node.targets[0])
                if isinstance(t, ast.Name)}
    assert {"prompt", "control_image", "pipe", "controlnet"} <= assigned
    assert 'bundled_path("toy-sd")' in code and 'validation_pairs("hed", n=1)' in code


def test_card_of_a_hub_base_model_has_runnable_code_and_hub_metadata(tmp_path):
    import ast

    from huggingface_hub import metadata_load

    path = hub.save_model_card(str(tmp_path), base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                               task=get_task("depth"), dataset="limingcv/MultiGen-20M_depth", validation_prompts=['a "room"'])
    text = open(path).read()
    meta = metadata_load(path)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and meta["pipeline_tag"] == "text-to-image"
    assert meta["datasets"] == ["limingcv/MultiGen-20M_depth"] and "toy" not in meta["tags"]
    (code,) = _code_blocks(text)
    ast.parse(code)
    assert "prompt = \"a 'room'\"" in code and 'load_image("control.png")' in code
    assert "A ShapesWorld toy" not in text and "## Limitations" in text
