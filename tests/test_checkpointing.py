"""diffusers_innercontrol.checkpointing: atomic save, latest, pruning, resume of step/epoch, skipped batches."""

import os

import pytest
import torch

from diffusers_innercontrol import checkpointing as ck


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _prepared(accelerator, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator.prepare(model, opt)


def _train_step(model, opt):
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_latest_ignores_tmp_and_other_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-7", "checkpoint-12.tmp", "checkpoint-x", "logs"):
        os.makedirs(tmp_path / name)
    (tmp_path / "checkpoint-99").write_text("a file, not a folder")
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [2, 7, 10]  # numeric order, not lexical
    assert ck.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert ck.latest_checkpoint(str(tmp_path / "missing")) is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    removed = ck.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [3, 4]
    assert ck.prune_checkpoints(str(tmp_path), None) == []


def test_save_is_atomic_and_prunes(tmp_path, accelerator):
    model, opt = _prepared(accelerator)
    os.makedirs(tmp_path / "checkpoint-3.tmp")  # left by a run killed while writing
    (tmp_path / "checkpoint-3.tmp" / "partial").write_text("x")
    for step in (1, 2, 3):
        _train_step(model, opt)
        path = ck.save_checkpoint(accelerator, str(tmp_path), step, total_limit=2)
        assert path == str(tmp_path / f"checkpoint-{step}")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert "model.safetensors" in os.listdir(tmp_path / "checkpoint-3")
    assert not (tmp_path / "checkpoint-3" / "partial").exists()


def test_a_failed_write_leaves_no_complete_looking_checkpoint(tmp_path, accelerator, monkeypatch):
    model, opt = _prepared(accelerator)

    def dies_midway(output_dir, **kwargs):
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(accelerator, "save_state", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(accelerator, str(tmp_path), 5)
    assert not (tmp_path / "checkpoint-5").exists()
    assert ck.latest_checkpoint(str(tmp_path)) is None


def test_resume_restores_weights_and_step(tmp_path, accelerator):
    model, opt = _prepared(accelerator)
    _train_step(model, opt)
    ck.save_checkpoint(accelerator, str(tmp_path), 7)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt)
    assert not torch.equal(saved["weight"], model.state_dict()["weight"])
    state = ck.resume_from_checkpoint(accelerator, "latest", str(tmp_path), num_update_steps_per_epoch=3)
    assert (state.global_step, state.first_epoch, state.skip_batches_in_epoch) == (7, 2, 1)  # 7 = 2 * 3 + 1
    assert state.path == str(tmp_path / "checkpoint-7")
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v)
    # by name, by path; errors
    assert ck.resolve_resume_path("checkpoint-7", str(tmp_path)) == str(tmp_path / "checkpoint-7")
    assert ck.resolve_resume_path(str(tmp_path / "checkpoint-7"), "elsewhere") == str(tmp_path / "checkpoint-7")
    with pytest.raises(ValueError, match=r"'checkpoint-9': no such complete checkpoint \(found: \['checkpoint-7'\]\)"):
        ck.resolve_resume_path("checkpoint-9", str(tmp_path))


def test_latest_without_checkpoint_starts_fresh(tmp_path, accelerator):
    state = ck.resume_from_checkpoint(accelerator, "latest", str(tmp_path), 4)
    assert state == ck.ResumeState()
    assert ck.resume_from_checkpoint(accelerator, None, str(tmp_path), 4) == ck.ResumeState()


def test_resume_dataloader_skips_the_batches_seen_in_the_resumed_epoch(accelerator):
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(10)), batch_size=2, shuffle=False))
    state = ck.ResumeState(global_step=7, first_epoch=1, skip_batches_in_epoch=2, path="checkpoint-7")
    # gradient accumulation 2: 2 optimisation steps = 4 batches already seen in epoch 1
    resumed = ck.resume_dataloader(accelerator, loader, 1, state, gradient_accumulation_steps=2)
    assert [b.tolist() for b in resumed] == [[8, 9]]
    # other epochs, or no resume: the full loader
    assert len(list(ck.resume_dataloader(accelerator, loader, 2, state, 2))) == 5
    assert len(list(ck.resume_dataloader(accelerator, loader, 1, ck.ResumeState(), 2))) == 5


def test_resume_dataloader_sets_the_epoch_of_a_resumed_loader(accelerator):
    class Epochs(torch.utils.data.Dataset):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([self.epoch * 100 + i])

    ds = Epochs()
    loader = accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=1))
    state = ck.ResumeState(global_step=5, first_epoch=1, skip_batches_in_epoch=1, path="checkpoint-5")
    # a fresh process: accelerate's loader counter is 0, the resumed epoch is 1
    assert [b.item() for b in ck.resume_dataloader(accelerator, loader, 1, state)] == [101, 102, 103]
    assert [b.item() for b in ck.resume_dataloader(accelerator, loader, 2, state)] == [200, 201, 202, 203]
