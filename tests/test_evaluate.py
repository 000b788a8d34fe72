"""Evaluation: generation with resume, evaluator models, Table-1 reports, and the whole script on tiny models."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusers_innercontrol import get_task
from diffusers_innercontrol.evaluation import (
    EvalSample,
    annotator_from_evaluator,
    generate_images,
    image_path,
    load_control_evaluator,
    load_generation_pipeline,
    missing_seeds,
    table1_markdown,
    write_results,
)
from diffusers_innercontrol.hub_utils import OfflineModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "innercontrol", "evaluate_innercontrol.py")


# --- generation with resume -----------------------------------------------------------------------
class FakePipe:
    """Records every call; returns one grey image per generator, its level set by the generator's seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, *, prompt, negative_prompt, image, height, width, generator, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append(dict(prompt=prompt, negative_prompt=negative_prompt, seeds=seeds, size=(height, width), **kwargs))
        images = [Image.new("RGB", (width, height), (10 * s, 0, 0)) for s in seeds]
        return type("Out", (), {"images": images})()


class FakeData:
    def __getitem__(self, index):
        return EvalSample(index, f"caption {index}", torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_generate_images_saves_by_group_and_resumes(tmp_path):
    out = str(tmp_path)
    assert image_path(out, 7, 3) == os.path.join(out, "images", "000007_3.png")
    # a stopped run left condition 0 complete and condition 1 with seed 2 only
    pipe = FakePipe()
    generate_images(pipe, FakeData(), [0], out, seeds=[0, 2], num_inference_steps=3, resolution=8, progress=False)
    Image.new("RGB", (8, 8)).save(image_path(out, 1, 2))
    assert missing_seeds(out, 1, [0, 2]) == [0]

    pipe = FakePipe()
    stats = generate_images(pipe, FakeData(), [0, 1, 2], out, seeds=[0, 2], num_inference_steps=3, guidance_scale=7.5,
                            resolution=8, progress=False)
    assert (stats.generated, stats.skipped) == (3, 3)
    assert [c["seeds"] for c in pipe.calls] == [[0], [0, 2]]  # condition 1: seed 0 only; condition 2: both
    call = pipe.calls[1]
    assert call["prompt"] == ["caption 2"] * 2 and call["negative_prompt"] == ["worst quality, low quality"] * 2
    assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 7.5 and call["size"] == (8, 8)
    assert Image.open(image_path(out, 2, 2)).getpixel((0, 0)) == (20, 0, 0)
    assert not [f for f in os.listdir(os.path.join(out, "images")) if ".tmp" in f]  # no temporary files left

    pipe = FakePipe()
    stats = generate_images(pipe, FakeData(), [0, 1, 2], out, seeds=[0, 2], num_inference_steps=3, resolution=8, progress=False)
    assert (stats.generated, stats.skipped) == (0, 6) and pipe.calls == []


def test_a_folder_serves_only_the_scenes_and_settings_its_images_were_made_with(tmp_path):
    """Images are named by position and seed: another eval set or other settings in the same folder are refused
    (DataError, one line naming what differs) before anything is made; a folder from before records is adopted."""
    from diffusers_innercontrol.data import DataError
    from diffusers_innercontrol.evaluation import IMAGES_RECORD
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    class Scenes(FakeData):
        def __init__(self, start):
            self.fingerprint = {"start": start}

    out = str(tmp_path / "a")
    generate_images(FakePipe(), Scenes(100), [0], out, seeds=[0], num_inference_steps=3, resolution=8, progress=False)
    for kwargs, what in ((dict(data=Scenes(2000)), "conditions = {'start': 100}, not {'start': 2000}"),
                         (dict(num_inference_steps=4), "num_inference_steps = 3, not 4"),
                         (dict(guidance_scale=1.0), "guidance_scale = 7.5, not 1.0"),
                         (dict(negative_prompt=None), "negative_prompt"), (dict(resolution=16), "resolution = 8"),
                         (dict(with_control=False), "with_control = True, not False")):
        pipe = FakePipe()
        call = dict(dict(data=Scenes(100), num_inference_steps=3, resolution=8), **kwargs)
        with pytest.raises(DataError, match="holds images made with " + re.escape(what)):
            generate_images(pipe, call.pop("data"), [0, 1], out, seeds=[0], progress=False, **call)
        assert pipe.calls == [] and not os.path.exists(image_path(out, 1, 0))
    stats = generate_images(FakePipe(), Scenes(100), [0, 1], out, seeds=[0], num_inference_steps=3, resolution=8, progress=False)
    assert (stats.generated, stats.skipped) == (1, 1)  # more conditions of the same scenes: served
    old = str(tmp_path / "old")  # images without a record: taken as they are, and recorded
    os.makedirs(os.path.join(old, "images"))
    Image.new("RGB", (8, 8)).save(image_path(old, 0, 0))
    stats = generate_images(FakePipe(), Scenes(5), [0], old, seeds=[0], resolution=8, progress=False)
    assert stats.skipped == 1 and os.path.isfile(os.path.join(old, IMAGES_RECORD))
    with pytest.raises(DataError):
        generate_images(FakePipe(), Scenes(6), [0], old, seeds=[0], resolution=8, progress=False)
    # scoring without generating (evaluate_innercontrol.py --skip_generation) compares and writes nothing
    from diffusers_innercontrol.evaluation import check_images_record, images_record

    record = images_record(Scenes(100), 3, 7.5, "worst quality, low quality", 8)
    check_images_record(out, record, write=False)
    with pytest.raises(DataError, match="guidance_scale = 7.5, not 2.0"):
        check_images_record(out, dict(record, guidance_scale=2.0), write=False)
    check_images_record(str(tmp_path / "new"), record, write=False)
    assert not os.path.exists(tmp_path / "new")
    # ShapesWorld eval sets name their first scene, not their length (position i is scene start + i)
    a, b = ShapesWorldEvalSet("depth", 64, 0, 100000, 64), ShapesWorldEvalSet("depth", 64, 0, 100000, 256)
    assert a.fingerprint == b.fingerprint
    for other in (ShapesWorldEvalSet("depth", 64, 0, 2000, 64), ShapesWorldEvalSet("hed", 64, 0, 100000, 64),
                  ShapesWorldEvalSet("depth", 32, 0, 100000, 64), ShapesWorldEvalSet("depth", 64, 1, 100000, 64)):
        assert other.fingerprint != a.fingerprint


def test_generate_images_groups_conditions_per_call(tmp_path):
    out = str(tmp_path)
    os.makedirs(os.path.dirname(image_path(out, 1, 0)))
    Image.new("RGB", (8, 8)).save(image_path(out, 1, 0))  # condition 1 has seed 0 already
    pipe = FakePipe()
    stats = generate_images(pipe, FakeData(), [0, 1, 2, 3, 4], out, seeds=[0, 1], resolution=8, progress=False,
                            conditions_per_call=2)
    assert (stats.generated, stats.skipped) == (9, 1)
    # conditions 0+1 (3 images), 2+3 (4 images), 4 (2 images); each image with its condition's caption and seed
    assert [c["seeds"] for c in pipe.calls] == [[0, 1, 1], [0, 1, 0, 1], [0, 1]]
    assert pipe.calls[0]["prompt"] == ["caption 0", "caption 0", "caption 1"]
    assert Image.open(image_path(out, 3, 1)).getpixel((0, 0)) == (10, 0, 0)
    with pytest.raises(ValueError, match="conditions_per_call"):
        generate_images(pipe, FakeData(), [0], out, conditions_per_call=0)


def test_generation_protocol_and_seed_batching_is_resume_safe(tiny_pipeline_path, tmp_path):
    from diffusers import UniPCMultistepScheduler

    pipe = load_generation_pipeline(tiny_pipeline_path, os.path.join(tiny_pipeline_path, "controlnet"))
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.safety_checker is None
    sample = EvalSample(0, "a toy", torch.rand(3, 32, 32), torch.rand(3, 32, 32))

    class Data:
        def __getitem__(self, index):
            return sample

    together, alone = str(tmp_path / "together"), str(tmp_path / "alone")
    generate_images(pipe, Data(), [0], together, seeds=[0, 1], num_inference_steps=2, resolution=32, progress=False)
    generate_images(pipe, Data(), [0], alone, seeds=[1], num_inference_steps=2, resolution=32, progress=False)
    a = torch.tensor(list(Image.open(image_path(together, 0, 1)).getdata()))
    b = torch.tensor(list(Image.open(image_path(alone, 0, 1)).getdata()))
    assert (a - b).abs().max() <= 1  # the same image whether made with the other seeds or alone
    c = torch.tensor(list(Image.open(image_path(together, 0, 0)).getdata()))
    assert (a - c).abs().max() > 5  # and the seeds differ


def _save(tensor01, path):
    from diffusers_innercontrol.evaluation import save_image_atomic, tensor_to_pil

    save_image_atomic(tensor_to_pil(tensor01), path)


def test_compute_metrics_segmentation_plumbing_by_hand(tmp_path):
    from diffusers_innercontrol.evaluation import compute_metrics

    out = str(tmp_path)
    target = torch.tensor([[0, 0], [1, 1]])

    class Data:
        def __getitem__(self, index):
            return EvalSample(index, "c", torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), control_classes=target)

    class Evaluator:
        num_classes = 2
        sizes = []

        def __call__(self, images, target_size):
            self.sizes.append(tuple(target_size))
            return torch.tensor([[0, 1], [1, 1]]).expand(images.shape[0], -1, -1)  # one error per image

    for seed in (0, 1):
        _save(torch.zeros(3, 2, 2), image_path(out, 0, seed))
    m = compute_metrics(get_task("segmentation"), Data(), [0], out, seeds=[0, 1], control_evaluator=Evaluator(),
                        progress=False)
    assert abs(m["miou"] - 7 / 12) < 1e-6 and m["num_images"] == 2 and m["num_conditions"] == 1
    assert Evaluator.sizes == [(2, 2)] and m["fid"] is None and m["clip_score"] is None
    with pytest.raises(FileNotFoundError, match="missing"):
        compute_metrics(get_task("segmentation"), Data(), [0], out, seeds=[0, 1, 2], control_evaluator=Evaluator())


def test_compute_metrics_edges_and_fid_plumbing(tmp_path):
    from diffusers_innercontrol.evaluation import compute_metrics
    from diffusers_innercontrol.metrics import build_fid

    out = str(tmp_path)
    control = (torch.rand(1, 16, 16) > 0.5).float().expand(3, -1, -1)
    real = torch.rand(3, 16, 16)

    class Data:
        def __getitem__(self, index):
            return EvalSample(index, "c", real, control)

    for index in (0, 1):
        for seed in (0, 1):
            _save(control, image_path(out, index, seed))  # "generated" images that are the control itself

    class Means(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.float().mean((2, 3))

    fid = build_fid(Means())
    m = compute_metrics(get_task("hed"), Data(), [0, 1], out, seeds=[0, 1], fid=fid,
                        control_evaluator=lambda x: x.mean(1, keepdim=True), progress=False)
    assert abs(m["ssim"] - 1.0) < 1e-5 and m["ms_ssim"] is None  # 16 px: too small for MS-SSIM
    assert int(fid.real_features_num_samples) == 2 and int(fid.fake_features_num_samples) == 4  # real once per condition
    assert m["fid"] is not None and m["num_images"] == 4
    with pytest.warns(UserWarning, match="at least 2"):
        m = compute_metrics(get_task("hed"), Data(), [0], out, seeds=[0, 1], fid=build_fid(Means()),
                            control_evaluator=lambda x: x.mean(1, keepdim=True), progress=False)
    assert m["fid"] is None


# --- evaluator models -----------------------------------------------------------------------------
def save_tiny_mask2former(path: str, num_labels: int = 150) -> str:
    """A ~0.4 M-parameter Mask2Former (tiny Swin backbone) with its image processor, saved with save_pretrained."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    # feature sizes stay multiples of 32: the pixel decoder uses GroupNorm(32, .)
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=8,
        id2label={i: f"class{i}" for i in range(num_labels)}, label2id={f"class{i}": i for i in range(num_labels)},
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}, ignore_index=255,
                              do_reduce_labels=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_depth_path(tmp_path_factory):
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    return save_tiny_reward_model("depth", str(tmp_path_factory.mktemp("tiny_dpt")))


def test_depth_evaluator(tiny_depth_path):
    evaluator = load_control_evaluator(get_task("depth"), tiny_depth_path)
    depth = evaluator(torch.rand(2, 3, 40, 40))
    assert depth.ndim == 3 and depth.shape[0] == 2 and torch.isfinite(depth).all() and (depth >= 0).all()


def test_mask2former_evaluator(tmp_path):
    path = save_tiny_mask2former(str(tmp_path / "m2f"))
    evaluator = load_control_evaluator(get_task("segmentation"), path)
    classes = evaluator(torch.rand(2, 3, 32, 32), target_size=(24, 40))
    assert classes.shape == (2, 24, 40) and classes.dtype == torch.long
    assert classes.min() >= 0 and classes.max() < 150
    small = save_tiny_mask2former(str(tmp_path / "m2f_5"), num_labels=5)
    with pytest.raises(ValueError, match="150"):
        load_control_evaluator(get_task("segmentation"), small)


def test_upernet_evaluator_without_processor(tmp_path):
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    path = save_tiny_reward_model("segmentation", str(tmp_path / "upernet"))  # a model folder without processor
    classes = load_control_evaluator(get_task("segmentation"), path)(torch.rand(1, 3, 32, 32), target_size=(32, 32))
    assert classes.shape == (1, 32, 32) and classes.max() < 150


def test_lineart_evaluator_and_annotator(tmp_path):
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    path = save_tiny_reward_model("lineart", str(tmp_path / "lineart"))
    evaluator = load_control_evaluator(get_task("lineart"), path)
    lines = evaluator(torch.rand(1, 3, 32, 32))
    assert lines.shape == (1, 1, 32, 32) and lines.min() >= 0 and lines.max() <= 1
    control = annotator_from_evaluator(evaluator)(Image.new("RGB", (36, 28), (200, 100, 50)))
    assert control.mode == "RGB" and control.size == (36, 28)


def test_offline_evaluator_ids_fail_fast():
    with pytest.raises(OfflineModelError, match="--depth_model_name_or_path"):
        load_control_evaluator(get_task("depth"))
    with pytest.raises(OfflineModelError, match="--seg_model_name_or_path"):
        load_control_evaluator(get_task("segmentation"))


# --- reports --------------------------------------------------------------------------------------
def test_table1_markdown_on_hand_values(tmp_path):
    seg = {"method": "ours", "t2i_model": "SD1.5", "task": "segmentation",
           "metrics": {"miou": 0.40221, "fid": 37.651, "clip_score": 30.5}}
    depth = {"method": "ours", "t2i_model": "SD1.5", "task": "depth",
             "metrics": {"rmse": 26.094, "fid": None, "clip_score": 31.0}}
    table = table1_markdown([seg, depth]).splitlines()
    # tasks in the paper's order (HED, LineArt, depth, segmentation), mIoU in percent
    assert table[0] == "| Method | T2I Model | Depth RMSE ↓ | Seg. mIoU (%) ↑ | Depth FID ↓ | Seg. FID ↓ | Depth CLIP ↑ | Seg. CLIP ↑ |"
    assert table[2] == "| ours | SD1.5 | 26.09 | 40.22 | - | 37.65 | 31.00 | 30.50 |"
    assert len(table) == 3

    hed = {"method": "ours", "t2i_model": "SD1.5", "task": "hed", "metrics": {"ssim": 0.8264, "fid": 13.04}}
    table = table1_markdown([hed], include_paper=True).splitlines()
    assert table[0] == "| Method | T2I Model | HED SSIM ↑ | HED FID ↓ | HED CLIP ↑ |"
    assert "| ControlNet (paper) | SD1.5 | 0.762 | - | - |" in table
    assert "| InnerControl (paper) | SD1.5 | 0.826 | 13.00 | - |" in table
    assert table[-1] == "| ours | SD1.5 | 0.826 | 13.04 | - |"

    json_path, md_path = write_results({**hed, "protocol": {"num_inference_steps": 20}}, str(tmp_path), include_paper=False,
                                       probe_markdown="| t | mse | samples |")
    assert json.load(open(json_path))["metrics"]["ssim"] == 0.8264
    md = open(md_path).read()
    assert "| ours | SD1.5 | 0.826 | 13.04 | - |" in md and "num_inference_steps=20" in md and "| t | mse |" in md


# --- the whole script -----------------------------------------------------------------------------
@pytest.mark.e2e
def test_evaluate_script_end_to_end_and_resume(tiny_pipeline_path, tiny_depth_path, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from _data_fixtures import write_toy_dataset
    from diffusers import UNet2DConditionModel
    from test_metrics import save_tiny_clip

    from diffusers_innercontrol import ReadoutProbe

    data = write_toy_dataset(str(tmp_path / "data"), "depth", num_samples=3, size=40)
    clip = save_tiny_clip(str(tmp_path / "clip"))
    task = get_task("depth")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    probe_path = str(tmp_path / "probe")
    ReadoutProbe.from_unet(unet, **task.probe_kwargs(), projection_dim=32, norm_num_groups=8).save_pretrained(probe_path)
    out = str(tmp_path / "eval")
    args = [
        "--task", "depth", "--method_name", "tiny", "--output_dir", out,
        "--pretrained_model_name_or_path", tiny_pipeline_path,
        "--controlnet_model_name_or_path", os.path.join(tiny_pipeline_path, "controlnet"),
        "--eval_data_dir", data, "--num_samples", "2", "--seeds", "0", "1", "--num_inference_steps", "2",
        "--resolution", "32", "--depth_model_name_or_path", tiny_depth_path, "--fid_feature_extractor", clip,
        "--clip_model_name_or_path", clip, "--no_progress",
    ]
    probe_args = ["--probe_model_name_or_path", probe_path, "--probe_num_buckets", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", SCRIPT, *args, *probe_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    names = sorted(os.listdir(os.path.join(out, "images")))
    assert names == ["000000_0.png", "000000_1.png", "000001_0.png", "000001_1.png"]
    assert Image.open(os.path.join(out, "images", names[0])).size == (32, 32)
    result = json.load(open(os.path.join(out, "results.json")))
    m = result["metrics"]
    assert result["generation"] == {"generated": 4, "skipped": 0}
    assert m["num_conditions"] == 2 and m["num_images"] == 4
    assert 0 <= m["rmse"] <= 255 and m["fid"] is not None and m["clip_score"] is not None
    assert result["protocol"]["negative_prompt"] == "worst quality, low quality"
    buckets = result["probe_error"]["buckets"]
    assert len(buckets) == 2 and all(b["count"] == 2 for b in buckets)
    md = open(os.path.join(out, "results.md")).read()
    assert "| tiny | tiny_pipeline" in md and "Depth RMSE ↓" in md and "InnerControl (paper)" in md

    # resume: a second run generates nothing new and leaves the images untouched
    mtimes = {n: os.path.getmtime(os.path.join(out, "images", n)) for n in names}
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import evaluate_innercontrol

    second = evaluate_innercontrol.main(evaluate_innercontrol.parse_args(args + ["--skip_fid", "--skip_clip_score"]))
    assert second["generation"] == {"generated": 0, "skipped": 4}
    assert {n: os.path.getmtime(os.path.join(out, "images", n)) for n in names} == mtimes
    assert abs(second["metrics"]["rmse"] - m["rmse"]) < 1e-9 and second["metrics"]["fid"] is None
    assert second["probe_error"] is None


def test_script_rejects_bad_arguments(tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import evaluate_innercontrol

    with pytest.raises(SystemExit):
        evaluate_innercontrol.parse_args(["--task", "depth", "--output_dir", "x", "--seeds", "0", "0"])
    with pytest.raises(SystemExit):
        evaluate_innercontrol.parse_args(["--task", "depth", "--output_dir", "x", "--eval_data_dir", str(tmp_path)])
