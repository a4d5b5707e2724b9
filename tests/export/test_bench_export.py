"""QNN export time and memory (``-m bench``): the whole ``pasd-verify export`` pipeline (float ONNX, AIMET
calibration, encodings and QDQ graph, HTP compile and run), MHA against SHA, on the tiny PASD pair, the tiny text
encoder and VAE halves, and on the tiny UNet as its heads grow (1, 2, 4, 8) at a fixed width.

Each run is a fresh child process (:func:`pasd_verify.export.workloads.export_run`); its peak RSS growth goes through
the memory gate, each stage's time and the HTP child's own peak go to ``extra_info``. pytest-benchmark groups MHA
and SHA of one model together, so its table shows their time ratio. Nothing here asserts a time. What is asserted
is what the figures mean: every export passes its own checks on the HTP, and the SHA graph's HTP op count grows
with the number of heads (one set of q/k/v convs, matmuls and softmax per head) while the MHA graph's does not.
The SD1.5-size export, whose HTP run alone takes longer than CI allows, is the ``fullsize`` tier
(``tests/test_fullsize.py``).
"""

from __future__ import annotations

import pytest

from pasd_verify.export.htp import htp_available
from pasd_verify.memory import peak_rss_of

pytestmark = [pytest.mark.bench,
              pytest.mark.skipif(htp_available() is not None, reason=str(htp_available()))]

HEADS = (1, 2, 4, 8)
CASES = [("unet", form, heads) for heads in HEADS for form in ("mha", "sha")]
CASES += [(target, form, None) for target in ("pasd_unet", "pasd_controlnet", "text_encoder", "vae_encoder",
                                              "vae_decoder") for form in ("mha", "sha")]
MIB = 2**20

measured: dict[tuple[str, str, int | None], dict] = {}


@pytest.mark.parametrize("target,form,heads", CASES,
                         ids=[f"{t}-{f}" + (f"-heads{h}" if h else "") for t, f, h in CASES])
def test_bench_export(benchmark, peak_memory, target, form, heads):
    benchmark.group = f"export-{target}" + (f"-heads{heads}" if heads else "")
    run = benchmark.pedantic(peak_rss_of, args=("pasd_verify.export.workloads:export_run", target, form, heads),
                             rounds=1)
    result = run["result"]
    peak_memory(benchmark, run)
    benchmark.extra_info.update(result)
    measured[target, form, heads] = {"growth": run["held_growth_bytes"], **result}
    stages = ", ".join(f"{name} {s['seconds']:.1f} s" for name, s in result["stages"].items())
    print(f"\n{target} {form} heads={heads}: held growth {run['held_growth_bytes'] / MIB:.0f} MiB (RSS growth "
          f"{run['growth_bytes'] / MIB:.0f}; HTP child "
          f"{(result['htp_child_peak_rss_bytes'] or 0) / MIB:.0f} MiB); {stages}; {result['htp_ops']} HTP ops, "
          f"binary {(result['context_binary_bytes'] or 0) / MIB:.2f} MiB, CPU vs HTP {result['cpu_vs_htp_sqnr_db']} dB")
    assert result["passed"], f"the export of {target} {form} did not pass its own checks: {result}"


def test_export_sha_ops_grow_with_heads_and_mha_ops_do_not():
    runs = {(form, heads): measured.get(("unet", form, heads)) for heads in HEADS for form in ("mha", "sha")}
    if not all(runs.values()):
        pytest.skip("needs every unet run of test_bench_export in the same session")
    print("\ntiny UNet as heads grow: HTP ops / compile s / binary MiB / CPU vs HTP dB")
    for heads in HEADS:
        print(f"  heads={heads}  " + "  ".join(
            f"{form} {runs[form, heads]['htp_ops']} / {runs[form, heads]['htp_compile_seconds']:.1f} / "
            f"{runs[form, heads]['context_binary_bytes'] / MIB:.2f} / {runs[form, heads]['cpu_vs_htp_sqnr_db']:.1f}"
            for form in ("mha", "sha")))
    sha = [runs["sha", h]["htp_ops"] for h in HEADS]
    mha = [runs["mha", h]["htp_ops"] for h in HEADS]
    assert sha == sorted(set(sha)), f"SHA op counts {sha} should grow strictly with heads {HEADS}"
    assert len(set(mha)) == 1, f"MHA op counts {mha} should not depend on the number of heads"
