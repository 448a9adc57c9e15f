"""Torch CUDA latency of a paper-style double-masking network (random weights: latency does not depend on them).

Times what one certified 32x32 frame costs the engine: the one-mask round (K masked copies) and the two-mask
round (K (K + 1) / 2 copies) of one frame, and the one-mask round of a batch of 64 frames, synchronizing the device around each run.
Run by ``bench/gpu.sh`` where a GPU is present: ``python -m certinfer.bench.gpu_paper OUT.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from certinfer.runtime.defenses.doublemask import mask_set
from certinfer.runtime.engines.torch_engine import strict_fp32
from certinfer.threat import parse
from certinfer.train.doublemask import PRESETS
from certinfer.train.models.doublemask import classifier


def _ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after three warm-ups (the device synchronized)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(preset: str = "paper", threat: str = "5x5", device: str = "cuda", frames: int = 64,
            repeats: int = 20) -> dict:
    """Milliseconds per round of the preset's network (one frame's rounds, and ``frames`` frames' first round)."""
    cfg, dev = PRESETS[preset], torch.device(device)
    strict_fp32()  # as the runtime runs it
    net = classifier(10, cfg.model).to(dev).eval()
    masks = torch.from_numpy(mask_set(cfg.input_hw, parse(threat, input_hw=cfg.input_hw), cfg.stride)).to(dev)
    k = len(masks)
    i, j = torch.triu_indices(k, k)
    pairs = masks[i] | masks[j]
    frame = torch.randn(1, 3, *cfg.input_hw, device=dev)

    def run(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return net(torch.where(m[:, None], cfg.mask_value, x)).argmax(-1)

    batch = torch.randn(frames, 3, *cfg.input_hw, device=dev)
    with torch.inference_mode():
        one, two = _ms(lambda: run(frame, masks), dev, repeats), _ms(lambda: run(frame, pairs), dev, repeats)
        many = _ms(lambda: run(batch.repeat_interleave(k, 0), masks.repeat(frames, 1, 1)), dev, repeats)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "precision": "fp32 (TF32 off)", "preset": preset,
            "model": cfg.model, "threat": threat, "stride": cfg.stride, "masks": k, "pairs": len(pairs),
            "ms_one_mask_round_1_frame": one, "ms_two_mask_round_1_frame": two,
            "ms_certified_frame": one + two, "frames": frames, "ms_one_mask_round_frames": many}


if __name__ == "__main__":
    result = measure()
    Path(sys.argv[1]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
