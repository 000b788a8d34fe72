"""A small writer of random toy `--train_data_dir` datasets (metadata.jsonl + PNG files) for tests."""

import json
import os
from typing import Optional

import numpy as np
from PIL import Image

CONTROL_COLUMNS = {"hed": "hed", "lineart": "lineart", "depth": "control_depth", "segmentation": "control_seg"}
CAPTION_COLUMNS = {"hed": "text", "lineart": "text", "depth": "text", "segmentation": "prompt"}


def _seg_colours(k: int = 4):
    try:
        from diffusers_innercontrol.palette import ade20k_palette

        pal = np.asarray(ade20k_palette(), dtype=np.uint8).reshape(-1, 3)
        return pal[1 : k + 1]
    except ImportError:
        return np.array([[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]], dtype=np.uint8)[:k]


def write_toy_dataset(
    folder: str,
    task_name: str,
    num_samples: int = 4,
    size: int = 40,
    seed: int = 0,
    with_control: bool = True,
    control_mode: Optional[str] = None,
    broken_index: Optional[int] = None,
    caption_column: Optional[str] = None,
    control_column: Optional[str] = None,
) -> str:
    """Write `num_samples` random images, controls and captions for `task_name` under `folder`.

    control_mode: PIL mode of the controls (default RGB); "RGBA" makes 4-channel controls.
    broken_index: that sample's image file holds bytes that are not an image.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "controls"), exist_ok=True)
    caption_column = caption_column or CAPTION_COLUMNS[task_name]
    control_column = control_column or CONTROL_COLUMNS[task_name]
    rows = []
    colours = _seg_colours()
    for i in range(num_samples):
        name = f"{i:03d}.png"
        path = os.path.join(folder, name)
        if i == broken_index:
            with open(path, "wb") as f:
                f.write(b"this is not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        row = {"file_name": name, caption_column: f"a toy picture number {i}"}
        if with_control:
            if task_name == "segmentation":
                labels = rng.integers(0, len(colours), (size // 8, size // 8))
                arr = colours[np.kron(labels, np.ones((8, 8), dtype=int))]
            elif task_name == "depth":
                ramp = np.linspace(0, 255, size, dtype=np.float32)[None, :].repeat(size, 0)
                arr = np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)
            else:
                edges = (rng.random((size, size)) > 0.8).astype(np.uint8) * 255
                arr = np.repeat(edges[..., None], 3, axis=2)
            image = Image.fromarray(arr.astype(np.uint8), "RGB")
            if control_mode:
                image = image.convert(control_mode)
            cname = os.path.join("controls", name)
            image.save(os.path.join(folder, cname))
            row[control_column] = cname
        rows.append(row)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def toy_depth_experiment(tmp_path, tiny_pipeline_path):
    """What the ShapesWorld experiment scripts' quick runs need for depth on the tiny pipeline: 8 ShapesWorld scenes
    at 32 px, a tiny depth model (reward and evaluator) and a probe of the tiny UNet. Returns (data, model, probe)."""
    from diffusers import UNet2DConditionModel

    from diffusers_innercontrol.models.readout_probe import ReadoutProbe
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.shapesworld import ShapesWorld
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    data = ShapesWorld(size=32).save_imagefolder(str(tmp_path / "data"), 8)
    depth_model = save_tiny_reward_model("depth", str(tmp_path / "depth"))
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    probe_dir = str(tmp_path / "probe")
    ReadoutProbe.from_unet(unet, **get_task("depth").probe_kwargs(), projection_dim=32, norm_num_groups=8).save_pretrained(probe_dir)
    return data, depth_model, probe_dir


SHAPESWORLD_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "innercontrol",
                                   "shapesworld")


def load_shapesworld_script(name: str):
    """A script of examples/innercontrol/shapesworld as a module (its functions, for the tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_sw_{name}", os.path.join(SHAPESWORLD_SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
