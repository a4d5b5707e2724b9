"""``pasd-verify pipeline`` on the torch backends: its outputs, its exit codes, and bad input refused before work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pasd_verify.cli import main
from helpers import write_folders
from pasd_verify.pipeline.networks import BackendError, parse_backends

SMALL = ["--preset", "tiny", "--process-size", "64", "--steps", "2"]


def test_parse_backends_sets_each_network_and_all():
    backends = parse_backends(["all=sha", "unet=fp32"])
    assert backends == {"text_encoder": "sha", "vae_encoder": "sha", "controlnet": "sha", "unet": "fp32",
                        "vae_decoder": "sha"}
    assert set(parse_backends(None).values()) == {"fp32"}
    for bad in ("unet", "unet=gpu", "decoder=qdq"):
        with pytest.raises(BackendError, match=bad):
            parse_backends([bad])


def test_sha_pipeline_writes_every_output_and_passes(tmp_path, photo, capsys):
    out = tmp_path / "out"
    assert main(["pipeline", *SMALL, "--image", str(photo), "--backend", "all=sha", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["working_size"] == [80, 64]
    # SHA is MHA's function: the picture is fp32's to rounding, far past the thresholds
    assert report["picture"]["psnr_db"] > 60 and report["picture"]["ssim"] > 0.999
    assert sorted(report["networks"]) == ["controlnet", "text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert len(report["networks"]["unet"]["teacher_forced"]["steps"]) == 2
    for name in ("picture_fp32.png", "picture_candidate.png", "picture_unet_alone.png", "comparison.png",
                 "steps.png", "noise.npz", "steps/step_00.npz", "steps/step_01.npz"):
        assert (out / name).is_file(), name
    assert Image.open(out / "picture_candidate.png").size == (80, 64)
    # PASD's saved picture: colour-fixed with the photo; the photo was not resized up, so at the working size
    assert Image.open(out / "pasd_candidate.png").size == (80, 64)
    # the noise written is the noise used: a second run on it gives the same fp32 picture
    again = tmp_path / "again"
    assert main(["pipeline", *SMALL, "--image", str(photo), "--noise", str(out / "noise.npz"), "--out",
                 str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "picture_fp32.png")),
                          np.asarray(Image.open(again / "picture_fp32.png")))
    assert "pipeline PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--backend", "unet=gpu"], "--backend 'unet=gpu'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--process-size", "60"], "--process-size must be a positive multiple of 8"),
    (["--sd-dir", "."], "give either --preset or both --sd-dir and --pasd-dir"),
    (["--backend", "unet=qdq", "--export-dir", "{tmp}/nowhere"], "nowhere/unet/model.qdq.onnx does not exist"),
])
def test_bad_arguments_exit_2_and_leave_nothing(tmp_path, photo, capsys, arguments, message):
    out = tmp_path / "out"
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    assert main(["pipeline", *SMALL, "--image", str(photo), *arguments, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (b"not an image", "not a readable image"),
    (None, "not a readable image"),  # missing file
])
def test_a_bad_photo_is_named(tmp_path, capsys, content, message):
    path = tmp_path / "photo.png"
    if content is not None:
        path.write_bytes(content)
    assert main(["pipeline", *SMALL, "--image", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "out").exists()


def test_a_noise_file_of_another_size_is_refused(tmp_path, photo, capsys):
    noise = tmp_path / "noise.npz"
    np.savez(noise, start="noise", first=np.zeros((1, 4, 16, 16), np.float32))
    assert main(["pipeline", *SMALL, "--image", str(photo), "--noise", str(noise), "--out", str(tmp_path / "o")]) == 2
    assert "first is float32 (1, 4, 16, 16); this run needs float32 (1, 4, 8, 10)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _graph_with_input(path, name, shape):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("noise", TensorProto.FLOAT, list(shape))
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", [name], ["noise"])], "g", [x], [y])),
              str(path))


def test_an_export_of_another_size_or_not_a_graph_is_refused_before_work(tmp_path, photo, capsys):
    exports = tmp_path / "exports"
    _graph_with_input(exports / "unet" / "model.qdq.onnx", "sample", (1, 4, 16, 16))
    (exports / "vae_decoder").mkdir()
    (exports / "vae_decoder" / "model_ctx.onnx").write_bytes(b"\x00garbage")
    common = ["pipeline", *SMALL, "--image", str(photo), "--export-dir", str(exports), "--out", str(tmp_path / "o")]
    assert main([*common, "--backend", "unet=qdq"]) == 2
    assert "unet/model.qdq.onnx: sample was compiled as [1, 4, 16, 16], this photo's working size needs [1, 4, 8, 10]" \
        in capsys.readouterr().err
    assert main([*common, "--backend", "vae_decoder=htp"]) == 2
    assert "vae_decoder/model_ctx.onnx: not a readable ONNX graph" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_local_folders_give_the_presets_picture(tmp_path, photo):
    sd, pasd = write_folders(tmp_path)
    common = ["pipeline", "--process-size", "64", "--steps", "2", "--image", str(photo)]
    assert main([*common, "--preset", "tiny", "--out", str(tmp_path / "preset")]) == 0
    assert main([*common, "--sd-dir", str(sd), "--pasd-dir", str(pasd), "--out", str(tmp_path / "folders")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "preset" / "picture_fp32.png")),
                          np.asarray(Image.open(tmp_path / "folders" / "picture_fp32.png")))


def test_pasds_saved_picture_goes_back_to_the_photos_size(tmp_path, capsys):
    """A photo below process_size is resized up to it; PASD's saved picture goes back to the photo's size."""
    from skimage import data

    path = tmp_path / "small.png"
    Image.fromarray(data.chelsea()).resize((50, 40), Image.BICUBIC).save(path)
    assert main(["pipeline", *SMALL, "--image", str(path), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "picture_fp32.png").size == (80, 64)  # 64 / 40 * 50, floored to 8s
    assert Image.open(tmp_path / "out" / "pasd_fp32.png").size == (50, 40)


def test_a_folder_missing_a_part_is_named(tmp_path, photo, capsys):
    sd, pasd = write_folders(tmp_path)
    import shutil

    shutil.rmtree(pasd / "controlnet")
    (sd / "scheduler" / "scheduler_config.json").write_text("{not json")
    out = tmp_path / "out"
    base = ["pipeline", *SMALL[2:], "--image", str(photo), "--sd-dir", str(sd), "--pasd-dir", str(pasd)]
    assert main([*base, "--out", str(out)]) == 2
    assert f"{pasd}: no controlnet/ folder" in capsys.readouterr().err
    (pasd / "controlnet").mkdir()
    assert main([*base, "--out", str(out)]) == 2
    assert "scheduler_config.json: not a readable scheduler config" in capsys.readouterr().err
    assert not out.exists()


def test_the_fullsize_jobs_run_in_dependency_order_and_an_unknown_job_is_refused_before_any_work(tmp_path):
    from pasd_verify.pipeline.workloads import fullsize_job, fullsize_jobs

    jobs = fullsize_jobs(20)
    assert jobs[0] == "reference" and jobs.index("export:unet") < jobs.index("forced:text_encoder")
    assert [j for j in jobs if j.count(":") == 2] == ["forced:controlnet:0", "forced:unet:0", "forced:controlnet:19",
                                                      "forced:unet:19"]
    for job in ("forced:unet:20", "forced:text_encoder:0", "export:vae", "forced"):
        with pytest.raises(ValueError, match="unknown job"):
            fullsize_job(job, str(tmp_path), preset="no-such-preset")
    assert not any(tmp_path.iterdir())


def test_the_fullsize_reference_job_hands_on_the_fp32_run_whole(tmp_path):
    """The later jobs read the fp32 run from reference.npz instead of rerunning it: every tensor they use must come
    back as the run made it (the run redone here, in this process, is the reference)."""
    import torch

    from pasd_verify.pipeline.check import build_pipeline, run
    from pasd_verify.pipeline.networks import NETWORKS
    from pasd_verify.pipeline.workloads import _fullsize_run, _load_reference, fullsize_job

    fullsize_job("reference", str(tmp_path), preset="tiny", size=64, steps=2)
    components, image, noise, settings = _fullsize_run("tiny", 64, 2, 0)
    expected = run(build_pipeline(components, dict.fromkeys(NETWORKS, "fp32")), image, noise, settings)
    loaded = _load_reference(tmp_path / "reference.npz")
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["step_00.npz", "step_01.npz"]
    assert loaded.trace.timesteps == expected.trace.timesteps
    for name in ("picture", "latents"):
        assert torch.equal(getattr(loaded, name), getattr(expected, name)), name
    assert loaded.noise.tensors().keys() == expected.noise.tensors().keys() == {"posterior", "first", "added"}
    assert all(torch.equal(loaded.noise.tensors()[k], v) for k, v in expected.noise.tensors().items())
    for name in ("embeddings", "encoded_latent", "start_latent"):
        assert torch.equal(getattr(loaded.trace, name), getattr(expected.trace, name)), name
    for name in ("model_inputs", "noise_uncond", "noise_cond", "latents_out"):
        got, want = getattr(loaded.trace, name), getattr(expected.trace, name)
        assert len(got) == len(want) == 2 and all(torch.equal(a, b) for a, b in zip(got, want)), name
