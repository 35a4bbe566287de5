"""DINO pretraining parts on their own: config checks, schedules, sampler, crops, head, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipt.distributed import detect, first_node, port_for_job
from train.dino.augment import GridMultiCrop, PatchMultiCrop
from train.dino.config import ConfigError, GridCropsConfig, PatchCropsConfig, load_stage_config
from train.dino.data import MultiCropDataset, ResumableBatchSampler, SampleKey, tissue_fraction
from train.dino.model import DinoHead, DinoLoss, DinoNet, build_backbone
from train.dino.schedule import Schedules

FEAT = ["data.features_dir=features"]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("train.batchsize=3", "train.batchsize"),
        ("train.epochs=many", "train.epochs"),
        ("crops.global_tokens=20", "global_tokens"),
        ("model.kwargs={embed_dim: 100}", "embed_dim"),
        ("model.arch=vit256_s16", "stage 2 trains"),
    ],
)
def test_bad_config_is_one_clear_message_naming_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_stage_config("stage2", overrides=[*FEAT, override])
    assert names in str(err.value)


def test_stage1_crop_larger_than_patch_and_missing_source_are_refused():
    with pytest.raises(ConfigError, match="larger than the 256 px patch"):
        load_stage_config("stage1", overrides=["data.tiles_dir=t", "crops.global_px=288"])
    with pytest.raises(ConfigError, match="exactly one of data.tiles_dir and data.image_folder"):
        load_stage_config("stage1", overrides=["data.tiles_dir=t", "data.image_folder=i"])


def test_yaml_paths_resolve_against_the_file_and_set_wins(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {features_dir: feats}\ntrain: {epochs: 3}\n")
    cfg = load_stage_config("stage2", tmp_path / "c.yaml", ["train.epochs=5"])
    assert str(cfg.data.features_dir) == str(tmp_path / "feats")
    assert cfg.train.epochs == 5 and cfg.dino.momentum_teacher == 0.996


# ----------------------------------------------------------------------------- schedules
def test_schedules_follow_dino():
    s = Schedules(
        total_steps=100, steps_per_epoch=10, peak_lr=1.0, min_lr=0.01, warmup_epochs=2,
        wd_start=0.04, wd_end=0.4, momentum_start=0.996, momentum_end=1.0,
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3,
    )  # fmt: skip
    assert s.lr(0) == 0.0 and s.lr(10) == pytest.approx(0.5) and s.lr(20) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert s.weight_decay(50) == pytest.approx(0.22) and s.weight_decay(100) == pytest.approx(0.4)
    assert s.momentum(100) == pytest.approx(1.0) and s.momentum(50) == pytest.approx(0.998)
    assert s.teacher_temperature(15) == pytest.approx(0.055) and s.teacher_temperature(40) == 0.07


# ----------------------------------------------------------------------------- sampler
def test_sampler_shards_are_the_one_process_batch_and_resume_mid_epoch():
    one = list(ResumableBatchSampler(50, 8, seed=3, epoch=2))
    two = [
        list(ResumableBatchSampler(50, 8, seed=3, epoch=2, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(one) == 6  # 50 // 8, the last partial batch dropped
    for step, batch in enumerate(one):
        assert two[0][step] + two[1][step] == batch
    assert list(ResumableBatchSampler(50, 8, seed=3, epoch=2, start_step=4)) == one[4:]
    indices = [k.index for b in one for k in b]
    assert len(set(indices)) == 48  # no sample twice in an epoch
    other = [k.index for b in ResumableBatchSampler(50, 8, seed=3, epoch=3) for k in b]
    assert other != indices


def test_sampler_refuses_a_batch_larger_than_the_data_or_uneven_over_processes():
    with pytest.raises(ValueError, match="larger than the data"):
        ResumableBatchSampler(5, 8, seed=0, epoch=0)
    with pytest.raises(ValueError, match="split evenly"):
        ResumableBatchSampler(50, 9, seed=0, epoch=0, world_size=2)


# ----------------------------------------------------------------------------- tissue + crops
def test_tissue_fraction_rejects_glass_ink_and_dark_debris():
    patch = np.full((16, 16, 3), 235, np.uint8)  # glass
    patch[:8] = (200, 110, 170)  # H&E pink-purple: tissue
    patch[8:12, :8] = (40, 60, 200)  # blue ink
    patch[12:, :8] = (20, 15, 25)  # dark debris
    assert tissue_fraction(patch) == pytest.approx(0.5)


def test_patch_multicrop_sizes_and_same_seed_same_views():
    cfg = PatchCropsConfig(local_crops=3)
    crop = PatchMultiCrop(cfg)
    patch = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    torch.manual_seed(0)
    a = crop(patch)
    torch.manual_seed(0)
    b = crop(patch)
    assert [tuple(v.shape) for v in a] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].dtype == torch.float32 and -1.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    assert not torch.equal(a[2], a[3])  # local crops differ from each other


def test_grid_crops_are_windows_of_the_grid():
    grid = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 16, 16).repeat(3, 1, 1)
    views = GridMultiCrop(GridCropsConfig(local_crops=2, hflip=0.0))(grid)
    g = views[0][0]
    r, c = divmod(int(g[0, 0]), 16)
    assert torch.equal(g, grid[0, r : r + 14, c : c + 14])
    assert tuple(views[-1].shape) == (3, 6, 6)


def test_dataset_views_depend_only_on_the_sample_key(tmp_path):
    from dino_data import write_feature_grids

    from train.dino.data import FeatureGrids

    source = FeatureGrids(write_feature_grids(tmp_path, n_files=2, regions=2))
    assert len(source) == 4
    ds = MultiCropDataset(source, GridMultiCrop(GridCropsConfig(local_crops=1)), seed=5)
    torch.manual_seed(123)
    before = torch.rand(1)
    a = ds[SampleKey(1, 7, 2)]
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's generator is left as it was
    b = ds[SampleKey(1, 7, 2)]
    c = ds[SampleKey(1, 8, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# ----------------------------------------------------------------------------- head + loss
def test_head_has_the_released_key_names_and_a_unit_norm_last_layer():
    head = DinoHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    keys = sorted(head.state_dict())
    assert keys == [
        "last_layer.weight_g", "last_layer.weight_v", "mlp.0.bias", "mlp.0.weight",
        "mlp.2.bias", "mlp.2.weight", "mlp.4.bias", "mlp.4.weight",
    ]  # fmt: skip
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(5, 192)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    expected = F.normalize(head.mlp(x), dim=-1) @ w.T
    torch.testing.assert_close(head(x), expected)


def test_dino_loss_matches_the_formula_and_updates_the_centre():
    torch.manual_seed(0)
    n, dim = 3, 10
    student, teacher = torch.randn(4 * n, dim), torch.randn(2 * n, dim)
    loss_fn = DinoLoss(dim, n_global=2, n_crops=4, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.fill_(0.5)
    got = loss_fn(student, teacher, teacher_temp=0.04)
    t = F.softmax((teacher - 0.5) / 0.04, dim=-1).chunk(2)
    s = F.log_softmax(student / 0.1, dim=-1).chunk(4)
    terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    assert float(got) == pytest.approx(float(sum(terms) / 6), rel=1e-6)
    torch.testing.assert_close(loss_fn.center, 0.45 + 0.1 * teacher.mean(0, keepdim=True))


def test_dinonet_groups_crops_by_size_and_keeps_the_native_grid():
    torch.manual_seed(0)
    net = DinoNet(
        build_backbone("vit4k_xs", {"depth": 1}), out_dim=8, hidden_dim=8, bottleneck_dim=4
    )
    crops = [torch.randn(2, 384, 14, 14), torch.randn(2, 384, 14, 14), torch.randn(2, 384, 6, 6)]
    out = net(crops)
    single = net([crops[2]])
    torch.testing.assert_close(out[4:], single)
    assert tuple(net.backbone.pos_embed.shape) == (1, 257, 192)


# ----------------------------------------------------------------------------- ranks
def test_rank_and_rendezvous_from_torchrun_then_slurm_then_single():
    tr = detect(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    )
    assert (tr.launcher, tr.rank, tr.world_size, tr.master_addr) == ("torchrun", 1, 2, "h")
    slurm = {
        "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "987654", "SLURM_STEP_NODELIST": "gpu-a[012-013]",
    }  # fmt: skip
    env = detect(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 3, 4, 1)
    assert env.master_addr == "gpu-a012" and env.master_port == port_for_job("987654") == 27654
    batch_script = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect(batch_script).launcher == "single"  # the batch shell itself is not a rank
    assert first_node("n1,n2") == "n1" and first_node("x[5,7-9]") == "x5"
    assert math.isfinite(port_for_job("12_3"))
