"""The shared training skeleton (`training_utils`): step plan, batches with resume, optimizer step, non-finite check."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from diffusers_innercontrol.checkpointing import ResumeState
from diffusers_innercontrol.training_utils import (
    STREAMED_EPOCHS,
    NonFiniteLossError,
    StepPlan,
    first_nonfinite,
    move_frozen,
    nonfinite_message,
    optimizer_step,
    plan_steps,
    setup_accelerator,
    step_generator,
    train_batches,
    weight_dtype_of,
    where_saved,
)


class EpochDataset(torch.utils.data.Dataset):
    """Items 100 * epoch + i: the batches show which epoch the dataset was set to."""

    def __init__(self, n):
        self.n, self.epoch, self.epochs_set = n, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(100 * self.epoch + i)


def _args(**kw):
    base = dict(train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=None, num_train_epochs=1,
                max_grad_norm=0.0, set_grads_to_none=True, output_dir="unused")
    base.update(kw)
    return SimpleNamespace(**base)


def test_plan_steps_by_hand():
    ds = EpochDataset(10)
    # 10 samples, batch 2 -> 5 batches; 2 processes -> 3 per process; accumulation 2 -> 2 optimizer steps an epoch
    plan = plan_steps(ds, _args(gradient_accumulation_steps=2, num_train_epochs=3), num_processes=2)
    assert plan == StepPlan(max_train_steps=6, num_train_epochs=3, num_update_steps_per_epoch=2)
    plan = plan_steps(ds, _args(max_train_steps=7))  # 5 steps an epoch: 7 steps take 2 epochs
    assert plan == StepPlan(7, 2, 5) and not plan.streaming
    plan = plan_steps(ds, _args(train_batch_size=3, max_train_steps=8))  # ceil(10 / 3) = 4 a epoch
    assert (plan.num_update_steps_per_epoch, plan.num_train_epochs) == (4, 2)


def test_plan_steps_streamed():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    plan = plan_steps(Stream(), _args(max_train_steps=5))
    assert plan == StepPlan(5, STREAMED_EPOCHS, None) and plan.streaming
    with pytest.raises(ValueError, match="--max_train_steps"):
        plan_steps(Stream(), _args())


def _loader(accelerator, ds, batch_size=2):
    return accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False))


def test_train_batches_sets_every_epoch_and_counts_batches():
    accelerator = Accelerator(cpu=True)
    ds = EpochDataset(4)
    loader = _loader(accelerator, ds)
    got = [(e, i, b.tolist()) for e, i, b in train_batches(accelerator, loader, StepPlan(6, 3, 2), ResumeState())]
    assert got == [(0, 0, [0, 1]), (0, 1, [2, 3]), (1, 0, [100, 101]), (1, 1, [102, 103]),
                   (2, 0, [200, 201]), (2, 1, [202, 203])]


def test_train_batches_sets_the_epoch_of_a_plain_loader_s_dataset():
    ds = EpochDataset(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    got = [b.tolist() for _, _, b in train_batches(Accelerator(cpu=True), loader, StepPlan(2, 2, 1), ResumeState())]
    assert got == [[0, 1], [100, 101]]


def test_train_batches_resumes_inside_an_epoch_with_the_same_batch_indices():
    """Resumed at step 3 of 2-step epochs with accumulation 2: epoch 1 from its 3rd batch, indices 2 and 3 (as an
    uninterrupted run numbers them), and the dataset at epoch 1, not the 0 of the skipping loader's own counter."""
    accelerator = Accelerator(cpu=True)
    ds = EpochDataset(8)
    loader = _loader(accelerator, ds)
    state = ResumeState(global_step=3, first_epoch=1, skip_batches_in_epoch=1, path="checkpoint-3")
    got = [(e, i, b.tolist()) for e, i, b in train_batches(accelerator, loader, StepPlan(4, 2, 2), state, 2)]
    assert got == [(1, 2, [104, 105]), (1, 3, [106, 107])]
    fresh = [(e, i) for e, i, _ in train_batches(accelerator, loader, StepPlan(4, 2, 2), ResumeState(), 2)]
    assert fresh[-2:] == [(1, 2), (1, 3)]


def test_step_generator_is_a_function_of_seed_process_epoch_and_batch():
    draw = lambda *a: torch.rand(3, generator=step_generator(*a)).tolist()  # noqa: E731
    assert draw(0, "cpu", 0, 1, 2) == draw(0, "cpu", 0, 1, 2)
    others = [draw(1, "cpu", 0, 1, 2), draw(0, "cpu", 1, 1, 2), draw(0, "cpu", 0, 2, 2), draw(0, "cpu", 0, 1, 3)]
    assert all(o != draw(0, "cpu", 0, 1, 2) for o in others)
    g = step_generator(5, "cpu", 2, 3, 4)
    assert g.initial_seed() == (5 * 1_000_003 + 2 * 100_003 + 3 * 10_007 + 4) % (2**63 - 1)
    assert step_generator(None, "cpu", 0, 0, 0) is None


def test_first_nonfinite_names_the_first_bad_term(tmp_path):
    ok, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert first_nonfinite({"diffusion": ok, "reward": inf, "alignment": nan, "total": nan}) == "reward"
    assert first_nonfinite({"diffusion": ok, "reward": None, "alignment": ok}) is None
    assert first_nonfinite({"a": torch.tensor([1.0, float("-inf")])}) == "a"
    terms = {"diffusion": ok, "alignment": nan}
    msg = nonfinite_message(terms, "alignment", 7, 1, str(tmp_path), "lowering --learning_rate.")
    assert msg == ("The alignment loss is nan at step 7 (epoch 1); training stopped. No checkpoint was written yet; "
                   "start again after lowering --learning_rate.")
    os.makedirs(tmp_path / "checkpoint-5")
    msg = nonfinite_message(terms, "alignment", 7, 1, str(tmp_path), "x")
    assert f"The last checkpoint, {tmp_path / 'checkpoint-5'}, is kept: resume from it with --resume_from_checkpoint latest after x" in msg
    assert nonfinite_message(terms, None, 7, 1, str(tmp_path), "x").startswith("A loss on another process is not finite at step 7")


def _linear_setup(max_grad_norm=0.0, lr=0.1):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def test_optimizer_step_by_hand():
    """loss = w . x with x = (3, 4): the gradient is x; SGD lr 0.1 -> w - 0.1 x; the scheduler halves the lr; the
    gradient is zeroed (None). With --max_grad_norm 1 the gradient (norm 5) is scaled to (0.6, 0.8) first."""
    for max_grad_norm, expected in ((0.0, [0.7, 1.6]), (1.0, [0.94, 1.92])):
        accelerator, model, optimizer, scheduler = _linear_setup()
        params = list(model.parameters())
        with accelerator.accumulate(model):
            loss = model(torch.tensor([3.0, 4.0])).sum()
            optimizer_step(accelerator, loss, params, optimizer, scheduler, _args(max_grad_norm=max_grad_norm),
                           terms={"total": loss}, step=1, epoch=0, hint="x")
        assert model.weight.detach().flatten().tolist() == pytest.approx(expected)
        assert scheduler.get_last_lr()[0] == pytest.approx(0.05)
        assert model.weight.grad is None


def test_optimizer_step_refuses_a_nonfinite_term_before_changing_the_weights(tmp_path):
    accelerator, model, optimizer, scheduler = _linear_setup()
    loss = model(torch.tensor([3.0, 4.0])).sum()
    with pytest.raises(NonFiniteLossError, match=r"^The reward loss is inf at step 4 \(epoch 2\).*after check it\.$"):
        optimizer_step(accelerator, loss, list(model.parameters()), optimizer, scheduler,
                       _args(output_dir=str(tmp_path)), terms={"reward": torch.tensor(math.inf), "total": loss},
                       step=4, epoch=2, hint="check it.")
    assert model.weight.detach().flatten().tolist() == [1.0, 2.0] and model.weight.grad is None
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_setup_accelerator_and_weight_dtype(tmp_path):
    args = SimpleNamespace(gradient_accumulation_steps=3, mixed_precision="no", report_to="none",
                           output_dir=str(tmp_path / "out"), logging_dir="logs", seed=11, allow_tf32=False)
    accelerator = setup_accelerator(args)
    assert accelerator.gradient_accumulation_steps == 3 and os.path.isdir(tmp_path / "out")
    assert accelerator.project_configuration.logging_dir == str(tmp_path / "out" / "logs")
    a = torch.rand(2)
    setup_accelerator(args)
    assert torch.equal(torch.rand(2), a)  # seeded
    assert weight_dtype_of(SimpleNamespace(mixed_precision="fp16")) is torch.float16
    assert weight_dtype_of(SimpleNamespace(mixed_precision="bf16")) is torch.bfloat16
    assert weight_dtype_of(SimpleNamespace(mixed_precision="no")) is torch.float32


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import diffusers_innercontrol.training_utils as tu

    monkeypatch.setattr(tu, "_has_accelerator_device", lambda: False)
    args = SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="fp16", report_to="none",
                           output_dir=str(tmp_path / "out"), logging_dir="logs", seed=0, allow_tf32=False)
    with pytest.raises(ValueError, match=r"^--mixed_precision fp16 needs a GPU.*--mixed_precision no"):
        setup_accelerator(args)
    assert not os.path.exists(tmp_path / "out")


def test_where_saved_names_what_is_there(tmp_path):
    out = tmp_path / "run"
    assert where_saved(str(out), "The probe") == f"The probe saved in {out}: nothing."
    out.mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "config.json", "README.md", "images_0.png", "images_1.png"):
        (out / name).write_text("x")
    (out / "logs").mkdir()
    assert where_saved(str(out), "The ControlNet", "logs") == (
        f"The ControlNet saved in {out}: diffusion_pytorch_model.safetensors, config.json; model card README.md; "
        f"grids images_0.png, images_1.png; logs in {out / 'logs'}.")


def test_move_frozen_casts_only_when_the_dtype_differs(tiny_components, caplog):
    import copy

    vae = copy.deepcopy(tiny_components["vae"])
    with caplog.at_level("WARNING"):
        assert move_frozen(vae, "cpu", torch.float32) is vae and vae.dtype == torch.float32
    assert "should be kept in float32" not in caplog.text
    move_frozen(vae, "cpu", torch.bfloat16)
    assert vae.dtype == torch.bfloat16
