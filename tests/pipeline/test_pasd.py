"""The PASD pipeline against independent references: diffusers' own ControlNet pipeline for the loop, the
untouched MHA networks for SHA, PASD's documented draws and pre-processing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image

from pasd_verify.models import PASDControlNetModel
from pasd_verify.pipeline import (PASDPipeline, StartNoise, parse_backends, pasd_prompt, pipeline_components,
                                  preprocess, preset_components, sd15_scheduler, to_tensor)
from pasd_verify.pipeline.pasd import NEGATIVE_PROMPT, PipelineInputError, wavelet_color_fix, working_size
from pasd_verify.sha import SingleHeads

PROMPT = pasd_prompt("a portrait of an astronaut")
SIZE = 256  # the working size of these tests: PASD's 768 costs 9x the time and proves nothing more about the loop


@pytest.fixture(scope="module")
def components():
    return preset_components("tiny", seed=0)


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return to_tensor(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC))


def _pipeline(components, backends=None):
    pipe = PASDPipeline(tokenizer=components.tokenizer, scheduler=sd15_scheduler(),
                        **pipeline_components(parse_backends(backends), components))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _DiffusersCall(PASDControlNetModel):
    """The same ControlNet with diffusers' return convention, ``(down, mid)``, for diffusers' own pipeline."""

    def forward(self, *args, **kwargs):
        _, down, mid = super().forward(*args, **kwargs)
        return down, mid


def _without_pixel_attentions(components):
    """The PASD UNet with every pixel attention's output projection zeroed (each is then the identity), and the
    stock diffusers UNet holding the same weights: the reference for the loop."""
    unet = copy.deepcopy(components.unet)
    with torch.no_grad():
        for block in unet.up_blocks:
            for attention in block.pixel_attentions:
                attention.proj_out.weight.zero_()
                attention.proj_out.bias.zero_()
    stock = UNet2DConditionModel.from_config(unet.config)
    stock.load_state_dict({k: v for k, v in unet.state_dict().items() if ".pixel_attentions." not in k}, strict=True)
    return unet, stock.eval()


def test_the_fp32_loop_is_diffusers_controlnet_pipeline(components, photo):
    """With the pixel attentions zeroed and a pure-noise start, PASD's pipeline gives the picture of diffusers'
    StableDiffusionControlNetPipeline on the same components, prompt and noise (same guidance, scheduler, steps)."""
    unet, stock = _without_pixel_attentions(components)
    ours = PASDPipeline(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                        unet=unet, controlnet=components.controlnet, scheduler=sd15_scheduler())
    ours.set_progress_bar_config(disable=True)
    noise = StartNoise.draw("noise", ours.latent_shape(photo), torch.Generator().manual_seed(3))
    result = ours(PROMPT, photo, num_inference_steps=4, noise=noise)

    controlnet = copy.deepcopy(components.controlnet)
    controlnet.__class__ = _DiffusersCall
    reference = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=stock,
        controlnet=controlnet, scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, photo, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=9.0,
                         negative_prompt=NEGATIVE_PROMPT, latents=noise.first.clone(), output_type="pt").images
    assert result.picture.shape == expected.shape
    # the picture moved away from the start (a loop that did nothing would not be compared)
    assert (result.latents - noise.first).abs().max() > 0.1
    torch.testing.assert_close(result.picture, expected, rtol=0, atol=1e-5)


def test_sha_pipeline_gives_the_mha_picture(components, photo):
    """SHA is the same function as MHA: every network rewritten, the whole 20-step run from the photo gives the
    same picture to fp32 rounding (far below one 8-bit grey level, 1/255)."""
    mha, sha = _pipeline(components), _pipeline(components, ["all=sha"])
    heads = sum(isinstance(m, SingleHeads) for net in (sha.unet, sha.controlnet, sha.text_encoder, sha.vae)
                for m in net.modules())
    assert heads > 0, "nothing was rewritten: the comparison would be of one model with itself"
    reference = mha(PROMPT, photo, generator=torch.Generator().manual_seed(0))
    result = sha(PROMPT, photo, noise=reference.noise)
    torch.testing.assert_close(result.picture, reference.picture, rtol=0, atol=1e-4)


def test_photo_start_is_pasds_draws_and_noise_levels(components, photo):
    """From a photo, the start is PASD's prepare_latents written out with diffusers' own calls: the posterior
    sampled by DiagonalGaussianDistribution.sample, noised at the first timestep, then at the schedule's LAST
    timestep (UniPC does not find 900 among 4 inference steps), all three draws from one generator in that order."""
    pipe = _pipeline(components)
    ours = pipe.prepare_latents(photo, StartNoise.draw("photo", pipe.latent_shape(photo),
                                                       torch.Generator().manual_seed(5)), 4)
    generator = torch.Generator().manual_seed(5)
    vae = components.vae
    with torch.no_grad():
        latent = vae.encode(photo * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
    scheduler = sd15_scheduler()
    scheduler.set_timesteps(4)
    first, last = int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])
    assert (first, last) == (999, 250)
    alphas = scheduler.alphas_cumprod.double()
    for t in (first, last):
        noise = torch.randn(latent.shape, generator=generator)
        latent = (alphas[t].sqrt() * latent + (1 - alphas[t]).sqrt() * noise).float()
    torch.testing.assert_close(ours, latent, rtol=1e-5, atol=1e-5)


def test_pure_noise_start_is_the_first_draw(components, photo):
    pipe = _pipeline(components)
    noise = StartNoise.draw("noise", pipe.latent_shape(photo), torch.Generator().manual_seed(1))
    expected = torch.randn(pipe.latent_shape(photo), generator=torch.Generator().manual_seed(1))
    assert noise.posterior is None and noise.added is None
    assert torch.equal(pipe.prepare_latents(photo, noise, 4), expected * pipe.scheduler.init_noise_sigma)


@pytest.mark.parametrize("size,upscale,expected", [
    ((451, 300), 1, (1152, 768)),   # measured by running PASD's test_pasd.py (REFERENCE section 11)
    ((512, 512), 1, (768, 768)),
    ((1000, 800), 1, (1000, 800)),  # already large enough: only floored to multiples of 8
    ((1003, 801), 1, (1000, 800)),
    ((300, 200), 2, (1152, 768)),
])
def test_preprocess_gives_pasds_working_size(size, upscale, expected):
    assert preprocess(Image.new("RGB", size), upscale=upscale).size == expected
    assert working_size(*size, upscale=upscale) == expected


def test_color_fix_of_a_picture_by_itself_keeps_it():
    """The wavelet levels telescope: the picture's detail plus its own low frequencies is the picture (up to the
    truncation to uint8 that PASD's ToPILImage makes)."""
    from skimage import data

    picture = Image.fromarray(data.chelsea()).resize((128, 96))
    fixed = np.asarray(wavelet_color_fix(picture, picture), dtype=int)
    assert np.abs(fixed - np.asarray(picture, dtype=int)).max() <= 1


def test_noise_file_round_trips_and_bad_files_name_the_fault(tmp_path):
    shape = (1, 4, 8, 8)
    noise = StartNoise.draw("photo", shape, torch.Generator().manual_seed(0))
    noise.save(tmp_path / "noise.npz")
    loaded = StartNoise.load(tmp_path / "noise.npz", shape)
    assert loaded.start == "photo"
    assert all(torch.equal(loaded.tensors()[k], v) for k, v in noise.tensors().items())

    with pytest.raises(PipelineInputError, match=r"noise.npz: posterior is float32 \(1, 4, 8, 8\)"):
        StartNoise.load(tmp_path / "noise.npz", (1, 4, 16, 16))
    arrays = {k: v.numpy() for k, v in noise.tensors().items()}
    arrays["added"][0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", start="photo", **arrays)
    with pytest.raises(PipelineInputError, match="nan.npz: added holds 1 NaN"):
        StartNoise.load(tmp_path / "nan.npz", shape)
    np.savez(tmp_path / "partial.npz", start="photo", first=arrays["first"])
    with pytest.raises(PipelineInputError, match=r"partial.npz: .*missing \['posterior', 'added'\]"):
        StartNoise.load(tmp_path / "partial.npz", shape)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "noise.npz").read_bytes()[:100])
    with pytest.raises(PipelineInputError, match="cut.npz: not a readable noise file"):
        StartNoise.load(tmp_path / "cut.npz", shape)
