"""SD1.5 size, end to end (``-m fullsize``): the whole ``pasd-verify export`` pipeline on the SD1.5-size PASD UNet
and PASD ControlNet (64x64 latent), CLIP text encoder (77 tokens) and VAE encoder and decoder (a 16 x 16 latent, a
128 x 128 image), each in its SHA and MHA form (seeded random weights, one calibration sample, W8A16 per-channel,
the default rewrites): float export, AIMET calibration, encodings and QDQ graph, HTP compile and the emulated HTP
run.

The VAE is not run at PASD's working size (a 768 x 768 image, a 96 x 96 latent): the encoder's HTP step there did
not end within the hour the export gives it, and the decoder's emulated run took 1,808 s at a 32 x 32 latent, about
4.5 hours at 96 x 96 by its pixels; at 32 x 32 the decoder's HTP output is also 20.8 dB from the CPU's on the same
graph, under the 30 dB the export holds it to (README: Export, at SD1.5 size, with the command that shows it).

Not in CI: the emulated HTP run of one SD1.5-size UNet alone takes longer than CI's whole budget allows beside the
other tiers (README: Full size, with the measured durations). Each export is a fresh child process
(:func:`pasd_verify.export.workloads.export_run`) whose peak RSS growth goes through the memory gate like every
memory benchmark; each stage's time, the HTP child's own peak (compile and run happen in a grandchild) and every
step's agreement go to ``extra_info`` and are printed. What is asserted is what the figures mean: the export passes
its own checks, each at the threshold the report states; and the MHA and SHA forms of one model, each exported in
its own child, saw the same check input, compute the same function in fp32 and agree with each other on the HTP.
"""

from __future__ import annotations

import numpy as np
import pytest

from pasd_verify.export.htp import htp_available
from pasd_verify.export.agreement import FLOAT_TOLERANCE, HTP_SQNR_DB, QDQ_SQNR_DB, relative_error, sqnr_db
from pasd_verify.memory import peak_rss_of

pytestmark = [pytest.mark.fullsize,
              pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]

TARGETS = ("pasd_unet", "pasd_controlnet", "text_encoder", "vae_encoder", "vae_decoder")
LATENT = {"vae_encoder": [16, 16], "vae_decoder": [16, 16]}  # else SD1.5's 64 x 64 (the text encoder has none)
CASES = [(target, form) for target in TARGETS for form in ("sha", "mha")]
# Measured, not fixed: the SD1.5-size VAE decoder's HTP output on its seeded check latent is 29.5 dB from the CPU's on
# the same QDQ graph at 16 x 16 (20.8 dB at 32 x 32), under HTP_SQNR_DB, while on the pipeline's own final latent it
# is 40.5 dB (README: Export, at SD1.5 size, with the command that shows it). Strict: the day it agrees, this fails.
KNOWN_DIVERGENT = {"vae_decoder": "the SD1.5-size VAE decoder's HTP output is under 30 dB from the CPU's on a seeded "
                                  "latent (README: Export, at SD1.5 size)"}


def _case(target: str, form: str):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_DIVERGENT[target])] if target in KNOWN_DIVERGENT else []
    return pytest.param(target, form, marks=marks, id=f"{target}-{form}")
GIB = 2**30


@pytest.fixture(scope="module")
def check_outputs(tmp_path_factory):
    """Where each export keeps its check input and outputs, for the MHA-against-SHA comparison after it."""
    return tmp_path_factory.mktemp("check-outputs")


@pytest.mark.parametrize("target,form", [_case(t, f) for t, f in CASES])
def test_sd15_size_export_passes_every_step(benchmark, peak_memory, check_outputs, target, form):
    benchmark.group = f"export-sd15-{target}"
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.export.workloads:export_run", target, form, None, 1,
                                                LATENT.get(target, [64, 64]), 0, "sd15",
                                                str(check_outputs / f"{target}-{form}.npz")),
                             rounds=1)
    result = run["result"]
    peak_memory(benchmark, run)
    benchmark.extra_info.update(result)
    stages = "; ".join(f"{name} {s['seconds']:.0f} s, peak {s['peak_rss_bytes'] / GIB:.1f} GiB"
                       for name, s in result["stages"].items())
    print(f"\nSD1.5-size {target} {form}: {run['seconds']:.0f} s, peak RSS growth {run['growth_bytes'] / GIB:.1f} GiB "
          f"(HTP child {(result['htp_child_peak_rss_bytes'] or 0) / GIB:.1f} GiB); {stages}; HTP {result['htp_status']}, "
          f"compile {result['htp_compile_seconds']} s, run {result['htp_run_seconds']} s, "
          f"binary {(result['context_binary_bytes'] or 0) / GIB:.2f} GiB, {result['htp_ops']} HTP ops, "
          f"{result['htp_execute_cycles']} cycles ({result['htp_attention_cycles']} in attention); float rel. error "
          f"{result['float_relative_error']:.2e}, sim vs QDQ {result['sim_vs_qdq_sqnr_db']:.1f} dB, CPU vs HTP "
          f"{result['cpu_vs_htp_sqnr_db']} dB, fp32 vs HTP {result['fp32_vs_htp_sqnr_db']} dB")
    assert result["htp_status"] == "passed", f"the HTP did not run the SD1.5-size {target}: {result}"
    assert result["float_relative_error"] <= FLOAT_TOLERANCE
    assert result["sim_vs_qdq_sqnr_db"] >= QDQ_SQNR_DB
    assert result["cpu_vs_htp_sqnr_db"] >= HTP_SQNR_DB
    assert result["passed"], f"the export of the SD1.5-size {target} did not pass its own checks: {result}"


@pytest.mark.parametrize("target", TARGETS)
def test_sd15_size_mha_and_sha_agree_with_each_other_on_the_htp(check_outputs, target):
    """SHA is the same function as MHA: on the same check input the two forms' fp32 outputs agree to fp32
    rounding and their HTP outputs as closely as one graph's CPU and HTP runs must (each form was quantized on
    its own: the SHA graph's per-head activations have encodings of their own)."""
    paths = {form: check_outputs / f"{target}-{form}.npz" for form in ("mha", "sha")}
    missing = [str(p.name) for p in paths.values() if not p.exists()]
    if missing:
        pytest.skip(f"needs both forms of {target} exported in this session; missing {missing}")
    mha, sha = (dict(np.load(paths[form])) for form in ("mha", "sha"))
    assert sorted(mha) == sorted(sha)
    for key in (k for k in mha if k.startswith("input/")):
        assert np.array_equal(mha[key], sha[key]), f"the two exports saw different check inputs: {key}"
    outputs = sorted(k.removeprefix("fp32/") for k in mha if k.startswith("fp32/"))
    assert all(f"htp/{name}" in mha for name in outputs), "an HTP run of these exports did not pass"
    fp32 = {name: relative_error(mha[f"fp32/{name}"], sha[f"fp32/{name}"]) for name in outputs}
    qdq = {name: sqnr_db(mha[f"qdq_cpu/{name}"], sha[f"qdq_cpu/{name}"]) for name in outputs}
    htp = {name: sqnr_db(mha[f"htp/{name}"], sha[f"htp/{name}"]) for name in outputs}
    print(f"\nSD1.5-size {target}, MHA vs SHA over {len(outputs)} outputs: fp32 relative error at most "
          f"{max(fp32.values()):.2e}, QDQ on the CPU at least {min(qdq.values()):.1f} dB, HTP at least "
          f"{min(htp.values()):.1f} dB (worst {min(htp, key=htp.get)})")
    assert max(fp32.values()) <= FLOAT_TOLERANCE, fp32
    assert min(htp.values()) >= HTP_SQNR_DB, htp
