"""DINO pretraining throughput: the stage-1 input pipeline, and one training step, in one run.

Input pipeline (stage 1, one DataLoader worker process, the original's crops: 2 x 224 px global
+ 8 x 96 px local, flips, colour jitter, grayscale, blur, solarisation):

* ``slides``: 256 px patches read from a generated, tiled pyramidal TIFF at 0.5 µm/px with the
  project's reader (fast JPEG reader where it applies), tissue test, multi-crop;
* ``decoded``: the same crops from patches already decoded in memory: the ceiling of the pipeline
  (what the crops alone cost);
* ``read only``: the slide reads and tissue test without the crops.

Training step (``--device``): the engine's step (:meth:`train.dino.engine.Run.train_step`) on
random crops, against a plain fp32 loop of the same step (no fused or foreach kernels, eager
attention, an EMA over the parameters one by one) as the baseline. FLOPs are counted from the
architecture (teacher on the global crops, student forward + backward on all crops, heads) and
divided by the measured matmul rate of the same device, measured in the same run.

Usage::

    python benchmarks/bench_pretrain.py                        # CPU: tiny model (depth 2), batch 8
    python benchmarks/bench_pretrain.py --device cuda --depth 12 --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hipt.distributed import DistEnv
from train.dino.config import PatchCropsConfig, TissueConfig, load_stage_config
from train.dino.data import MultiCropDataset, ResumableBatchSampler, SlidePatches
from train.dino.engine import Run


def vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: int = 4) -> float:
    """Forward FLOPs (2 per multiply-add) of a ViT's blocks over ``tokens`` tokens."""
    dense = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    return depth * (dense + 2 * 2 * tokens * tokens * dim)


def step_flops(batch: int, depth: int, crops: PatchCropsConfig, head: dict) -> float:
    """FLOPs of one DINO step: teacher forward (globals), student forward + backward (all)."""

    def encoder(px: int) -> float:
        tokens = (px // 16) ** 2 + 1
        embed = 2 * (px // 16) ** 2 * (3 * 16 * 16) * 384
        return embed + vit_flops(tokens, 384, depth)

    h = head["hidden_dim"]
    head_f = 2 * (
        384 * h + h * h + h * head["bottleneck_dim"] + head["bottleneck_dim"] * head["out_dim"]
    )
    global_f = crops.global_crops * (encoder(crops.global_px) + head_f)
    local_f = crops.local_crops * (encoder(crops.local_px) + head_f)
    return batch * (global_f + 3 * (global_f + local_f))  # backward ≈ 2 x forward


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- input pipeline
class DecodedPatches:
    """Patches decoded once, served from memory: the pipeline without any slide reading."""

    def __init__(self, patches: list[np.ndarray]) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def read(self, index: int) -> np.ndarray:
        return self.patches[index]


def time_loader(dataset, n: int, batch: int) -> float:
    """Samples/s of one DataLoader worker process over ``n`` samples (after one warm-up batch)."""
    sampler = ResumableBatchSampler(len(dataset), batch, seed=0, epoch=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=1, prefetch_factor=4)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    seen = 0
    while seen < n:
        seen += len(next(it)[0])
    return seen / (time.perf_counter() - t)


def pipeline_rows(work: Path, n: int) -> list[tuple[str, float]]:
    from hipt.synthetic import write_generic_tiff
    from preprocessing.tiler import TileSettings, tile_slide

    slide = write_generic_tiff(work / "bench.tiff", 8192, 8192, mpp=0.5, seed=5).path
    tile_slide(slide, work / "out", TileSettings())
    source = SlidePatches(work / "out" / "tiles")
    crops = load_stage_config("stage1", overrides=["data.tiles_dir=x"]).crops
    from train.dino.augment import PatchMultiCrop

    tissue = TissueConfig()
    full = MultiCropDataset(source, PatchMultiCrop(crops), seed=0, tissue=tissue)
    read_only = MultiCropDataset(source, lambda p: [p], seed=0, tissue=tissue)
    # The ceiling: the very patches the slide rows train on, decoded beforehand.
    decoded = [
        full._pixels(int(i), np.random.default_rng(int(i)))
        for i in np.random.default_rng(1).permutation(len(source))[: n + 32]
    ]
    ceiling = MultiCropDataset(DecodedPatches(decoded), PatchMultiCrop(crops), seed=0)
    return [
        ("slides: read + tissue test + multi-crop", time_loader(full, n, 16)),
        ("decoded patches: multi-crop (ceiling)", time_loader(ceiling, n, 16)),
        ("slides: read + tissue test only", time_loader(read_only, n, 16)),
    ]


# ----------------------------------------------------------------------------- training step
class PlainRun(Run):
    """The same step written as a plain fp32 loop: the baseline row."""

    def train_step(self, crops: list[torch.Tensor]) -> float:
        s, sched = self.step, self.sched
        for group in self.optimizer.param_groups:
            group["lr"] = sched.lr(s)
        crops = [c.to(self.device) for c in crops]
        n_global = self.cfg.crops.global_crops
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_global])
        loss = self.loss_fn(self.student(crops), teacher_out, sched.teacher_temperature(s))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        m = sched.momentum(s)
        with torch.no_grad():
            for pt, ps in zip(self.teacher_params, self.student_params, strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        self.step += 1
        return float(loss.detach())


def make_run(cls, work: Path, args, precision: str, fused: str, plain_attention: bool) -> Run:
    cfg = load_stage_config(
        "stage1",
        overrides=[
            f"data.image_folder={work}", f"out={work / 'run'}", f"model.kwargs={{depth: {args.depth}}}",
            f"train.batch_size={args.batch}", f"train.device={args.device}",
            f"train.precision={precision}", f"optim.fused={fused}", "train.progress=false",
            "optim.freeze_last_layer_epochs=0", "optim.warmup_epochs=0",
        ],
    )  # fmt: skip
    run = cls(cfg, DistEnv("single"))
    if plain_attention:  # the baseline: eager attention, per-tensor AdamW
        for group in run.optimizer.param_groups:
            group["foreach"] = False
        for model in (run.student, run.teacher):
            for block in model.backbone.blocks:
                block.attn.fused_attn = False
    return run


def time_steps(run: Run, args) -> float:
    device = run.device
    c = run.cfg.crops
    crops = [torch.randn(args.batch, 3, c.global_px, c.global_px, device=device) for _ in range(2)]
    crops += [torch.randn(args.batch, 3, c.local_px, c.local_px, device=device) for _ in range(8)]
    run.total_steps = args.steps + 2  # the schedules' horizon: any length works for timing
    run.train_step(crops)  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        run.train_step(crops)
    sync(device)
    return args.batch * args.steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=2, help="ViT-256 blocks (12 = ViT-S/16)")
    p.add_argument("--batch", type=int, default=8, help="images per step (per device)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--samples", type=int, default=96, help="samples timed per pipeline row")
    p.add_argument("--skip-pipeline", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_pipeline:
            rows = pipeline_rows(work, args.samples)
            print("\nstage-1 input pipeline, 1 worker process, 2x224 + 8x96 crops")
            print(f"{'source':<42} {'samples/s':>10} {'vs ceiling':>11}")
            for name, rate in rows:
                print(f"{name:<42} {rate:>10.1f} {rate / rows[1][1]:>10.0%}")
        from PIL import Image

        img_dir = work / "imgs"
        img_dir.mkdir()
        Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(img_dir / "0.png")
        for i in range(1, args.batch):
            (img_dir / f"{i}.png").write_bytes((img_dir / "0.png").read_bytes())
        cuda = device.type == "cuda"
        rate32 = matmul_rate(device, torch.float32)
        rate16 = matmul_rate(device, torch.bfloat16) if cuda else rate32
        head = {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 65536}
        flops = step_flops(1, args.depth, PatchCropsConfig(), head)
        modes = [("plain fp32 loop (baseline)", PlainRun, "fp32", "false", True, rate32)]
        modes.append(("hipt engine fp32", Run, "fp32", "auto", False, rate32))
        if cuda:
            modes.append(
                ("hipt engine bf16 autocast, fused AdamW", Run, "bf16", "auto", False, rate16)
            )
        print(f"\ntraining step: ViT-256 depth {args.depth}, batch {args.batch}, 2x224 + 8x96 crops, "
              f"head 65536; {flops / 1e9:.1f} GFLOP per image")  # fmt: skip
        print(f"matmul rate: fp32 {rate32 / 1e12:.3f} TFLOP/s" + (f", bf16 {rate16 / 1e12:.1f} TFLOP/s" if cuda else ""))  # fmt: skip
        print(f"{'mode':<42} {'images/s':>9} {'TFLOP/s':>8} {'of matmul':>10} {'speed-up':>9}")
        base = None
        for name, cls, precision, fused, plain, peak in modes:
            run = make_run(cls, img_dir, args, precision, fused, plain)
            rate = time_steps(run, args)
            base = base or rate
            achieved = rate * flops
            print(
                f"{name:<42} {rate:>9.2f} {achieved / 1e12:>8.3f} {achieved / peak:>9.0%} {rate / base:>8.2f}x"
            )
            del run


if __name__ == "__main__":
    main()
