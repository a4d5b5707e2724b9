"""Input conventions: range converters, validators, and PASD's control-image pre-processing on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from skimage import data as skdata

from pasd_verify.errors import ImageInputError
from pasd_verify.models import pasd_forward
from pasd_verify.presets import build_pasd, unet_inputs
from pasd_verify.ranges import (
    check_control_image,
    check_image,
    check_unet_image,
    control_size,
    latent_size,
    prepare_control_image,
    to_controlnet_range,
    to_unet_range,
)

unit_floats = st.floats(0.0, 1.0, allow_nan=False, width=32)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x.abs(), torch.full_like(x, float("inf"))) - x.abs())


@given(values=st.lists(unit_floats, min_size=1, max_size=64))
def test_controlnet_to_unet_to_controlnet_is_within_one_ulp(values):
    x = torch.tensor(values, dtype=torch.float32)
    y = to_unet_range(x)
    assert y.min() >= -1 and y.max() <= 1
    # ulp of the larger of x and 1, since the round trip passes through values near 1
    assert ((to_controlnet_range(y) - x).abs() <= _ulp(torch.maximum(x, torch.ones_like(x)))).all()


@given(values=st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=64))
def test_unet_to_controlnet_to_unet_is_within_one_ulp(values):
    x = torch.tensor(values, dtype=torch.float32)
    y = to_controlnet_range(x)
    assert y.min() >= 0 and y.max() <= 1
    assert ((to_unet_range(y) - x).abs() <= _ulp(torch.ones_like(x))).all()


@given(h=st.integers(1, 400), w=st.integers(1, 400))
def test_latent_size_is_image_size_over_eight_or_an_error(h, w):
    if h % 8 == 0 and w % 8 == 0:
        assert latent_size(h, w) == (h // 8, w // 8)
    else:
        with pytest.raises(ImageInputError, match="multiple of 8"):
            latent_size(h, w)


@st.composite
def good_control_images(draw):
    h, w = 8 * draw(st.integers(1, 6)), 8 * draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    return torch.rand(draw(st.integers(1, 2)), 3, h, w, generator=torch.Generator().manual_seed(seed))


@given(image=good_control_images())
def test_good_images_pass_unchanged(image):
    before = image.clone()
    check_image(image, "x", value_range=(0.0, 1.0))
    check_unet_image(to_unet_range(image))
    assert torch.equal(image, before)


def _bad_inputs():
    good = torch.rand(1, 3, 16, 16)
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    inf = good.clone()
    inf[0, 0, 0, 0] = float("inf")
    return {
        "out of range": (good * 2, "values in"),
        "unet range given to controlnet": (good * 2 - 1, "to_controlnet_range"),
        "uint8": ((good * 255).to(torch.uint8), "divide a uint8 image by 255"),
        "nan": (nan, "NaN or Inf"),
        "inf": (inf, "NaN or Inf"),
        "wrong channels": (torch.rand(1, 4, 16, 16), "expected 3 channels"),
        "nhwc": (good.permute(0, 2, 3, 1).contiguous(), "looks NHWC"),
        "not multiple of 8": (torch.rand(1, 3, 16, 20), "not a multiple of 8"),
        "three dims": (good[0], "expected NCHW"),
        "numpy": (good.numpy(), "expected a torch.Tensor"),
    }


@pytest.mark.parametrize("kind", sorted(_bad_inputs()))
def test_every_documented_bad_control_input_raises(kind):
    image, message = _bad_inputs()[kind]
    with pytest.raises(ImageInputError, match=message):
        check_image(image, "control image", value_range=(0.0, 1.0))


def test_unet_range_rejects_a_0_255_image():
    with pytest.raises(ImageInputError, match="0-255 image"):
        check_unet_image(torch.rand(1, 3, 8, 8) * 255)


def test_small_control_image_is_an_error_unless_allowed():
    image = torch.rand(1, 3, 512, 512)
    with pytest.raises(ImageInputError, match="short side 512 px is below 768"):
        check_control_image(image)
    with pytest.warns(UserWarning, match="below 768"):
        check_control_image(image, allow_small=True)
    check_control_image(torch.rand(1, 3, 768, 776))


@given(h=st.integers(16, 2000), w=st.integers(16, 2000), upscale=st.sampled_from([1, 2, 4]))
def test_control_size_has_short_side_at_least_768_and_multiples_of_8(h, w, upscale):
    ch, cw = control_size(h, w, upscale=upscale)
    assert ch % 8 == 0 and cw % 8 == 0
    assert min(ch, cw) >= 768
    # only as much scaling as needed: the short side is 768 unless the upscaled image was already larger
    if min(h, w) * upscale < 768:
        assert min(ch, cw) == 768
    else:
        assert (ch, cw) == (h * upscale // 8 * 8, w * upscale // 8 * 8)


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_real_photo_prepares_to_a_valid_control_image(photo):
    image = getattr(skdata, photo)()  # astronaut 512x512, coffee 400x600: bundled with scikit-image
    h, w = image.shape[:2]
    prepared = prepare_control_image(image)
    assert prepared.dtype == torch.float32 and prepared.shape[:2] == (1, 3)
    ph, pw = prepared.shape[-2:]
    assert min(ph, pw) == 768 and ph % 8 == 0 and pw % 8 == 0
    assert abs(pw / ph - w / h) < 0.02  # aspect ratio kept up to the flooring to multiples of 8
    check_control_image(prepared)
    # the same photo as a PIL image and as a float tensor gives the same result
    from PIL import Image

    assert torch.allclose(prepare_control_image(Image.fromarray(image)), prepared)
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert torch.allclose(prepare_control_image(as_tensor), prepared, atol=1e-6)


def test_prepare_rejects_bad_arrays():
    with pytest.raises(ImageInputError, match="HWC uint8"):
        prepare_control_image(np.zeros((3, 64, 64), dtype=np.uint8))
    with pytest.raises(ImageInputError, match="values in"):
        prepare_control_image(torch.full((3, 64, 64), 2.0))


def test_real_photo_runs_through_the_tiny_pasd_pair_end_to_end():
    unet, controlnet = build_pasd("tiny", seed=0)
    control = prepare_control_image(skdata.coffee())  # 768 x 1152: a non-square photo
    latent = latent_size(*control.shape[-2:])
    inputs = unet_inputs(unet, batch=1, latent=latent, seed=0)
    with torch.no_grad():
        out, rgbs = pasd_forward(unet, controlnet, controlnet_cond=control, **inputs)
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
    assert [tuple(r.shape[-2:]) for r in rgbs] == [(768 // 2**k, 1152 // 2**k) for k in (1, 2, 3)]


def test_controlnet_refuses_a_unet_range_image():
    unet, controlnet = build_pasd("tiny", seed=0)
    inputs = unet_inputs(unet, batch=1, latent=(8, 8))
    with pytest.raises(ImageInputError, match="controlnet_cond"):
        controlnet(**inputs, controlnet_cond=torch.rand(1, 3, 64, 64) * 2 - 1)


# --- the text encoder's tokens and the VAE decoder's latents ----------------------------------------------------

@pytest.mark.parametrize("ids, message", [
    (torch.zeros(1, 77), r"token ids must be integers, got float32"),
    (torch.zeros(1, 76, dtype=torch.int32), r"expected \(batch, 77\) token ids, got shape \(1, 76\); pad with"),
    (torch.zeros(77, dtype=torch.int64), r"expected \(batch, 77\) token ids, got shape \(77,\)"),
    (torch.full((2, 77), 49407), r"token ids in \[49407, 49407\], the vocabulary holds \[0, 999\]"),
    (torch.full((1, 77), -1), r"token ids in \[-1, -1\]"),
    ([[0] * 77], r"expected a torch.Tensor of token ids, got list"),
])
def test_tokens_outside_the_text_encoders_conventions_are_refused_naming_the_input(ids, message):
    from pasd_verify.errors import TokenInputError
    from pasd_verify.ranges import check_tokens

    with pytest.raises(TokenInputError, match=rf"^prompt.safetensors: input_ids: {message}"):
        check_tokens(ids, "prompt.safetensors: input_ids", vocab_size=1000)
    check_tokens(torch.randint(0, 1000, (3, 77)), "fine", vocab_size=1000)


def test_a_latent_the_loop_did_not_scale_is_told_apart_from_a_scaled_one():
    """SD1.5's real VAE latents have a spread near 1 / 0.18215 unscaled and near 1 scaled; seeded ones of those
    spreads stand for them here: the first is refused with the factor to multiply by, the second accepted."""
    from pasd_verify.errors import LatentInputError
    from pasd_verify.ranges import check_latent

    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(1, 4, 12, 12, generator=g)
    check_latent(scaled, "latent", channels=4, scaling_factor=0.18215)
    with pytest.raises(LatentInputError, match=r"^latent: standard deviation 5\.\d+, that of an unscaled latent.*"
                                               r"multiply by the VAE's scaling_factor 0\.18215$"):
        check_latent(scaled / 0.18215, "latent", channels=4, scaling_factor=0.18215)
    for bad, message in [(scaled[:, :3], r"expected \(B, 4, h, w\), got shape \(1, 3, 12, 12\)"),
                         (scaled.int(), r"expected a float tensor, got torch.int32"),
                         (scaled.clone().fill_(float("nan")), r"576 value\(s\) are NaN or Inf")]:
        with pytest.raises(LatentInputError, match=rf"^latent: {message}"):
            check_latent(bad, "latent", channels=4, scaling_factor=0.18215)


@pytest.mark.parametrize("kind, key, bad, message", [
    ("text-encoder", "input_ids", lambda t: t.float(), r"input_ids has dtype float32; expected floating point|"
                                                       r"input_ids: token ids must be integers"),
    ("text-encoder", "input_ids", lambda t: t + 5000, r"input_ids: token ids in"),
    ("vae-encoder", "image", lambda t: (t + 1) / 2 * 255, r"image: values in \[.*\], expected \[-1.0, 1.0\]"),
    ("vae-decoder", "latent", lambda t: t / 0.18215, r"latent: standard deviation"),
])
def test_a_calibration_sample_of_the_new_kinds_is_checked_by_its_convention(kind, key, bad, message):
    from pasd_verify.kinds import CalibrationError, preset_model

    loaded = preset_model("tiny", kind)
    [sample] = loaded.kind.seeded_samples(loaded.model, 1, seed=5)
    loaded.kind.check_sample(sample, loaded.model, "s.safetensors")
    with pytest.raises(CalibrationError, match=rf"^s.safetensors: ({message})"):
        loaded.kind.check_sample({**sample, key: bad(sample[key])}, loaded.model, "s.safetensors")
