"""Benchmarks (``-m bench``): rewrite time, SHA vs MHA forward time, checkpoint rewrite time and peak memory.

Timings are recorded by pytest-benchmark (compare within one run: its table shows each row relative to the
fastest of its group); nothing here asserts a time. Peak memory is a child process's RSS high-water mark, and
the streaming checkpoint rewrite must stay far below the checkpoint's own size.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from pasd_verify import convert_to_sha
from pasd_verify.checkpoint import save_state_dict_file
from pasd_verify.memory import peak_rss_of
from pasd_verify.presets import build_unet, unet_inputs

pytestmark = pytest.mark.bench

GIB = 2**30


@pytest.fixture(scope="module")
def sd15_unet():
    return build_unet("sd15", seed=0)


def test_bench_sd15_unet_sha_rewrite(benchmark, sd15_unet):
    result = benchmark.pedantic(convert_to_sha, setup=lambda: ((copy.deepcopy(sd15_unet),), {}), rounds=3)
    assert len(result) == 96


@pytest.mark.parametrize("form", ["mha", "sha"])
def test_bench_sd15_unet_forward_cpu(benchmark, sd15_unet, form):
    benchmark.group = "sd15-unet-forward-32x32"
    model = copy.deepcopy(sd15_unet) if form == "sha" else sd15_unet
    if form == "sha":
        convert_to_sha(model)
    inputs = unet_inputs(model, batch=1, latent=(32, 32), seed=0)

    def forward():
        with torch.no_grad():
            return model(**inputs).sample

    out = benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    assert out.shape == inputs["sample"].shape


@pytest.fixture(scope="module")
def sd15_checkpoints(tmp_path_factory, sd15_unet):
    """A folder with the SD1.5 UNet's config; each benchmark writes its own inputs there and removes them after."""
    folder = tmp_path_factory.mktemp("sd15")
    (folder / "config.json").write_text(json.dumps({**sd15_unet.config, "_class_name": "UNet2DConditionModel"}))
    yield folder
    # pytest keeps the last sessions' temporary folders: gigabytes of checkpoints left in each would fill a CI
    # machine's disk (they did: the next run's slow tier failed with ENOSPC)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_bench_sd15_checkpoint_rewrite_peak_memory(benchmark, peak_memory, sd15_checkpoints, sd15_unet, fmt):
    benchmark.group = "sd15-checkpoint-rewrite"
    src, dst = sd15_checkpoints / f"state_dict_mha.{fmt}", sd15_checkpoints / f"state_dict_sha.{fmt}"
    # one format's input and output at a time: 6.6 GiB of disk at the peak, not 13
    save_state_dict_file(sd15_unet.state_dict(), src)
    try:
        measured = benchmark.pedantic(
            peak_rss_of, args=("pasd_verify.convert:convert_checkpoint", str(sd15_checkpoints), str(src), str(dst)),
            rounds=1,
        )
        checkpoint_bytes = src.stat().st_size
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    peak_memory(benchmark, measured)
    benchmark.extra_info.update(
        checkpoint_bytes=checkpoint_bytes,
        peak_rss_growth_over_checkpoint=measured["growth_bytes"] / checkpoint_bytes,
        child_seconds=measured["seconds"],
    )
    print(f"\n{fmt}: checkpoint {checkpoint_bytes / GIB:.2f} GiB, peak RSS growth "
          f"{measured['growth_bytes'] / GIB:.3f} GiB, {measured['seconds']:.1f} s")
    assert measured["result"]["keys_rewritten"] == 96
    # The memory contract: never a second copy. safetensors streams one tensor at a time; .pth is memory-mapped,
    # so its pages count in RSS as they are read, but only once.
    limit = 0.1 if fmt == "safetensors" else 1.2
    assert measured["growth_bytes"] < limit * checkpoint_bytes


def _synthetic_encodings(model, version: str) -> dict:
    """AIMET-shaped per-channel encodings for every weight of ``model`` and an output encoding for every leaf
    module, with seeded scales: SD1.5-size input for the encodings rewrite (AIMET's own export of a full SD1.5
    UNet crashes on protobuf's 2 GB limit, REFERENCE.md section 1)."""
    import random

    rng = random.Random(0)
    params, acts = [], []
    for name, p in model.state_dict().items():
        if p.ndim >= 2:
            params.append((name, [rng.uniform(1e-4, 1e-2) for _ in range(p.shape[0])]))
    from pasd_verify.name_map import onnx_scope

    for name, module in model.named_modules():
        if name and not list(module.children()):
            acts.append((f"{onnx_scope(name)}/{type(module).__name__}_output_0", [rng.uniform(1e-4, 1e-2)]))
    def v1(name, scales, bw, sym):
        return {"bw": bw, "dtype": "INT", "enc_type": "PER_CHANNEL" if len(scales) > 1 else "PER_TENSOR",
                "is_sym": sym, "name": name, "offset": [-(2 ** (bw - 1))] * len(scales),
                "scale": scales}
    encodings = {"version": "1.0.0", "excluded_layers": [], "quantizer_args": {"param_bitwidth": 8},
                 "param_encodings": [v1(n, s, 8, True) for n, s in params],
                 "activation_encodings": [v1(n, s, 16, False) for n, s in acts]}
    if version == "0.6.1":
        from pasd_verify.encodings import convert_version

        encodings = convert_version(encodings, "0.6.1")
    return encodings


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
def test_bench_sd15_encodings_rewrite(benchmark, peak_memory, sd15_checkpoints, sd15_unet, version):
    from pasd_verify.encodings import save_encodings

    benchmark.group = "sd15-encodings-rewrite"
    src, dst = sd15_checkpoints / f"parameters_mha_{version}.encodings", sd15_checkpoints / "parameters_sha.encodings"
    save_encodings(_synthetic_encodings(sd15_unet, version), src)
    measured = benchmark.pedantic(
        peak_rss_of, args=("pasd_verify.convert:convert_encodings_file", str(sd15_checkpoints), str(src), str(dst)),
        rounds=1,
    )
    peak_memory(benchmark, measured)
    benchmark.extra_info.update(encodings_bytes=src.stat().st_size, child_seconds=measured["seconds"], **measured["result"])
    print(f"\n{version}: {src.stat().st_size / 2**20:.1f} MiB of encodings, rewrite {measured['seconds']:.2f} s, "
          f"peak RSS growth {measured['growth_bytes'] / 2**20:.0f} MiB, {measured['result']}")
    assert measured["result"]["param_encodings_split"] == 96
