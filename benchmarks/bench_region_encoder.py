"""Region encoder throughput against the original one-region-per-call fp32 loop, in one run.

Self-contained: random weights, random uint8 regions. It times

* ``baseline``: the way the original HIPT_4K code runs, one region per call in fp32: normalise the
  whole region on the CPU, move it, cut it with ``unfold``/``unfold`` and a reshape, ViT-256 in
  minibatches of 256 with attention written out (no fused kernel), reshape/transpose the
  features into the grid, ViT-4K;
* ``hipt``: :class:`hipt.models.region_encoder.RegionEncoder`, ``--batch`` regions per call,
  patches batched across regions in chunks of ``--patch-batch``, fused attention; fp32, and on
  CUDA also bf16 autocast.

``--compile`` adds rows with both ViTs under ``torch.compile``. Modes run interleaved, batch by
batch, and every region's embedding is compared with the baseline's.

It prints regions/s, the speed-up over the baseline and the achieved TFLOP/s (FLOPs counted
analytically from the architecture); on CUDA also the measured bf16 matmul rate of the card.

Usage::

    python benchmarks/bench_region_encoder.py --regions 2            # CPU, fp32
    python benchmarks/bench_region_encoder.py --device cuda --regions 32 --batch 8 --patch-batch 1024
    python benchmarks/bench_region_encoder.py --smoke --regions 1 --batch 1   # depth-1 models
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable

import torch

from hipt.models.region_encoder import RegionEncoder, build_region_encoder

PATCHES = 256


def vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: int = 4) -> float:
    """Multiply-adds ×2 of a ViT's blocks over ``tokens`` tokens (qkv, attention, proj, MLP)."""
    dense = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attention = 2 * 2 * tokens * tokens * dim  # q·kᵀ and attn·v
    return depth * (dense + attention)


def region_flops() -> float:
    """FLOPs to encode one 4096 px region (256 ViT-256 patches + one ViT-4K pass)."""
    n = 257  # 16×16 tokens + [CLS], for both ViTs
    patch = 2 * 256 * (3 * 16 * 16) * 384 + vit_flops(n, 384, 12)
    vit4k = 2 * 256 * 384 * 192 + vit_flops(n, 192, 6)
    return PATCHES * patch + vit4k


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_encode(vit256, vit4k, region_u8: torch.Tensor, device: torch.device):
    """One region, fp32, shaped as the original HIPT_4K.forward does it."""
    x = region_u8.float().div(255.0).sub(0.5).div(0.5)  # ToTensor + Normalize, on the CPU
    x = x.unsqueeze(0).to(device)  # [1, 3, W, H]
    w256, h256 = x.shape[2] // 256, x.shape[3] // 256
    batch = x.unfold(2, 256, 256).unfold(3, 256, 256)  # [1, 3, p1, p2, 256, 256]
    batch = batch.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 256, 256)  # (b p1 p2) c w h
    feats = torch.cat([vit256(mb) for mb in batch.split(256)])  # minibatches of 256
    grid = feats.reshape(w256, h256, -1).transpose(0, 1).transpose(0, 2).unsqueeze(0)
    return feats, vit4k(grid)


def explicit_attention(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn.fused_attn = False  # the original computes softmax(q kᵀ) v by hand
    return model


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--regions", type=int, default=2, help="regions timed per mode")
    parser.add_argument("--batch", type=int, default=2, help="regions per RegionEncoder call")
    parser.add_argument("--patch-batch", type=int, default=256, help="patches per ViT-256 call")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (CUDA default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--smoke", action="store_true", help="depth-1 models: checks the script runs"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time RegionEncoder with torch.compile'd ViTs"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    if args.regions % args.batch:
        parser.error("--regions must be a multiple of --batch")

    tiny = dict(vit256_kwargs={"depth": 1}, vit4k_kwargs={"depth": 1}) if args.smoke else {}
    encoder, prov = build_region_encoder(
        None, None, random_weights=True, device=device, patch_batch=args.patch_batch, **tiny
    )
    base256 = explicit_attention(encoder.vit256).eval()
    base4k = explicit_attention(encoder.vit4k).eval()
    gen = torch.Generator().manual_seed(0)
    regions = torch.randint(0, 256, (args.regions, 3, 4096, 4096), dtype=torch.uint8, generator=gen)
    if device.type == "cuda":
        regions = regions.pin_memory()
    flops = region_flops() if not args.smoke else float("nan")

    modes = [("fp32", False)] + ([("bf16", True)] if device.type == "cuda" else [])
    if args.compile:
        modes += [(f"{label}+compile", amp) for label, amp in modes]
    encoders: dict[str, RegionEncoder] = {}
    for label, amp in modes:
        vit256, vit4k = encoder.vit256, encoder.vit4k
        if label.endswith("+compile"):
            vit256, vit4k = torch.compile(vit256), torch.compile(vit4k)
        enc = RegionEncoder(vit256, vit4k, prov["mean"], prov["std"], args.patch_batch, amp=amp)
        encoders[label] = enc.to(device)
        # A compiled model compiles on its first call: keep that out of the timing.
        for _ in range(max(warmup, 1) if label.endswith("+compile") else warmup):
            encoders[label].encode(regions[: args.batch])
    for _ in range(warmup):
        with torch.no_grad():
            baseline_encode(base256, base4k, regions[0], device)

    # Interleaved, batch by batch, so a change in machine load hits every mode alike.
    seconds = {"baseline": 0.0} | {label: 0.0 for label in encoders}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in seconds}
    for start in range(0, args.regions, args.batch):
        chunk = regions[start : start + args.batch]

        def run_baseline(chunk: torch.Tensor = chunk) -> None:
            with torch.no_grad():
                for region in chunk:
                    out = baseline_encode(base256, base4k, region, device)[1]
                    outputs["baseline"].append(out.float().cpu())

        seconds["baseline"] += timed(run_baseline, device)
        for label, enc in encoders.items():

            def run(enc: RegionEncoder = enc, label: str = label, chunk=chunk) -> None:
                outputs[label].append(enc.encode(chunk)[1].float().cpu())

            seconds[label] += timed(run, device)

    rows = [("baseline (original loop)", "fp32", 1, args.regions, seconds["baseline"])]
    rows += [
        (f"hipt RegionEncoder ({label})", label, args.batch, args.regions, seconds[label])
        for label in encoders
    ]
    # The numbers must agree, or the speed means nothing.
    ref = torch.cat(outputs["baseline"])
    diffs = {label: (torch.cat(outputs[label]) - ref).abs().max().item() for label in encoders}

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"analytic cost: {flops / 1e12:.3f} TFLOP per 4096 px region")
    base_rate = rows[0][3] / rows[0][4]
    header = f"{'mode':<36} {'dtype':<12} {'batch':>5} {'regions':>7} {'seconds':>9} {'regions/s':>10} {'TFLOP/s':>8} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for mode, dtype, batch, n, seconds in rows:
        rate = n / seconds
        print(
            f"{mode:<36} {dtype:<12} {batch:>5} {n:>7} {seconds:>9.2f} {rate:>10.4f} "
            f"{rate * flops / 1e12:>8.3f} {rate / base_rate:>7.2f}x"
        )
    for label, diff in diffs.items():
        print(f"max |region embedding - baseline| ({label}): {diff:.2e}")
    if device.type == "cuda":
        peak = matmul_tflops(device)
        best = max(n / s for _, dtype, _, n, s in rows if dtype.startswith("bf16"))
        print(
            f"measured bf16 matmul: {peak:.1f} TFLOP/s; hipt bf16 reaches "
            f"{100 * best * flops / 1e12 / peak:.1f}% of it"
        )


if __name__ == "__main__":
    main()
