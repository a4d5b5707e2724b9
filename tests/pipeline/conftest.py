"""Fixtures the pipeline command's tests share."""

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-image's cat at 80 x 64: a small photo whose sides are not a multiple of 8."""
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(data.chelsea()).resize((80, 64), Image.BICUBIC).save(path)
    return path
