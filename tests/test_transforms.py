"""vgg/data/batches/transforms.py: the training/evaluation geometry on real JPEG files, decode-time downscaling,
mode conversion, and the batch-level mean subtraction and colour shift."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from PIL import Image
from skimage import data as skdata
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from vgg.core.errors import UserError
from vgg.data.batches.transforms import (
    CenterCropTransform,
    EvalTransform,
    TrainTransform,
    color_shift,
    draw_alphas,
    draw_train_crop,
    load_rgb,
    normalize,
    sample_generator,
    scaled_size,
    to_uint8_tensor,
)
from vgg.data.datasets.stats import IMAGENET_STATS, DatasetStats


def save_jpeg(path, array: np.ndarray, mode: str = "RGB", quality: int = 95):
    Image.fromarray(array).convert(mode).save(path, "JPEG", quality=quality)
    return path


def reference_resized_crop(array: np.ndarray, new_h: int, new_w: int, top: int, left: int, crop: int) -> np.ndarray:
    """The textbook order: rescale the whole image with PIL, then crop."""
    whole = Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(whole)[top:top + crop, left:left + crop]


@pytest.fixture(scope="module")
def photo_jpeg(tmp_path_factory):
    return save_jpeg(tmp_path_factory.mktemp("photo") / "coffee.JPEG", skdata.coffee())  # 600x400


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    """2048x1536: libjpeg can decode it at 1/2, 1/4 or 1/8 scale."""
    array = np.asarray(Image.fromarray(skdata.astronaut()).resize((2048, 1536), Image.Resampling.BILINEAR))
    return save_jpeg(tmp_path_factory.mktemp("big") / "big.JPEG", array), array


# --- Training transform (paper §3.1) -------------------------------------------------------------

@pytest.mark.parametrize("size", [(600, 400), (300, 500), (40, 30), (64, 64)])
def test_train_transform_gives_uint8_crops_for_any_shape(tmp_path, size):
    w, h = size
    path = save_jpeg(tmp_path / "x.JPEG", np.asarray(Image.fromarray(skdata.chelsea()).resize((w, h))))
    transform = TrainTransform(crop_size=32, scale_min=36, scale_max=48)
    for _ in range(5):
        with Image.open(path) as image:
            crop = transform(image).image
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8 and crop.is_contiguous()


def test_train_crop_matches_rescale_then_crop(photo_jpeg):
    """Resampling only the crop box gives the pixels of "rescale the whole image, then crop"."""
    with Image.open(photo_jpeg) as image:
        array = np.asarray(image.convert("RGB"))
    transform = TrainTransform(crop_size=96, scale_min=128, scale_max=200)
    for seed in range(8):
        torch.manual_seed(seed)
        new_h, new_w, top, left, flip = draw_train_crop(400, 600, crop_size=96, scale_min=128, scale_max=200)
        expected = reference_resized_crop(array, new_h, new_w, top, left, 96)
        if flip:
            expected = expected[:, ::-1]
        torch.manual_seed(seed)
        with Image.open(photo_jpeg) as image:
            crop = transform(image).image.permute(1, 2, 0).numpy()
        diff = np.abs(crop.astype(int) - expected.astype(int))
        assert diff.mean() < 4, (seed, diff.mean())  # same place and scale (a misplaced crop gives ~30)


def test_scale_jitter_and_flip_are_drawn_as_the_paper_says():
    g = torch.Generator().manual_seed(0)
    sides, flips = set(), []
    for _ in range(2000):
        new_h, new_w, top, left, flip = draw_train_crop(375, 500, crop_size=224, scale_min=256, scale_max=512,
                                                        generator=g)
        assert new_h == min(new_h, new_w) and abs(new_w / new_h - 500 / 375) < 0.01  # isotropic
        assert 0 <= top <= new_h - 224 and 0 <= left <= new_w - 224
        sides.add(new_h)
        flips.append(flip)
    assert sides == set(range(256, 513))  # every S in [S_min, S_max]
    assert 0.45 < np.mean(flips) < 0.55
    for _ in range(50):  # fixed S: S_min == S_max
        assert min(draw_train_crop(500, 375, crop_size=224, scale_min=256, scale_max=256, generator=g)[:2]) == 256


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375)])
def test_crop_positions_are_uniform_over_their_whole_range(height, width):
    """§3.1 "randomly cropped": every top and left offset from 0 to the far edge, none favoured."""
    g = torch.Generator().manual_seed(0)
    draws = [draw_train_crop(height, width, crop_size=224, scale_min=256, scale_max=256, generator=g)
             for _ in range(4000)]
    assert {d[:2] for d in draws} == {scaled_size(height, width, 256)}
    new_h, new_w = draws[0][:2]
    tops, lefts = np.array([d[2] for d in draws]), np.array([d[3] for d in draws])
    assert set(tops.tolist()) == set(range(new_h - 224 + 1))
    assert set(lefts.tolist()) == set(range(new_w - 224 + 1))
    for offsets, span in ((tops, new_h - 224), (lefts, new_w - 224)):
        assert abs(offsets.mean() - span / 2) < 0.05 * span  # centred on the middle
        assert abs(offsets.std() - span / np.sqrt(12)) < 0.05 * span  # spread as a uniform draw
    assert np.corrcoef(tops, lefts)[0, 1] ** 2 < 0.01  # drawn independently


def test_jitter_reaches_both_ends_of_a_narrow_range():
    g = torch.Generator().manual_seed(1)
    sides = [min(draw_train_crop(40, 60, crop_size=32, scale_min=36, scale_max=37, generator=g)[:2])
             for _ in range(200)]
    assert set(sides) == {36, 37} and 60 < sides.count(36) < 140


def test_flip_mirrors_the_same_crop(tmp_path):
    # 80x64 at S=64 with 64x64 crops: top is always 0 and left one of 17 places, so a flipped and an
    # unflipped draw at the same place turn up within a few seeds.
    path = save_jpeg(tmp_path / "x.JPEG", np.asarray(Image.fromarray(skdata.coffee()).resize((80, 64))))
    transform = TrainTransform(crop_size=64, scale_min=64, scale_max=64)
    crops = {}
    for seed in range(1000):
        torch.manual_seed(seed)
        _, _, top, left, flip = draw_train_crop(64, 80, crop_size=64, scale_min=64, scale_max=64)
        if left == 5:
            torch.manual_seed(seed)
            with Image.open(path) as image:
                crops[flip] = transform(image).image
        if len(crops) == 2:
            break
    assert torch.equal(crops[True], crops[False].flip(-1))
    with Image.open(path) as image:
        assert torch.equal(crops[False], torch.from_numpy(np.asarray(image.convert("RGB"))[:, 5:69]).permute(2, 0, 1))


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match=r"^scale_min must be an integer >= 224, got 200$"):
        TrainTransform(crop_size=224, scale_min=200, scale_max=256)
    with pytest.raises(UserError, match=r"^scale_max must be an integer >= 256, got 255$"):
        TrainTransform(crop_size=224, scale_min=256, scale_max=255)
    with pytest.raises(UserError, match=r"^crop_size must be an integer >= 1, got 0$"):
        TrainTransform(crop_size=0, scale_min=256, scale_max=256)
    with pytest.raises(UserError, match=r"^scale must be an integer >= 1, got 0$"):
        EvalTransform(scale=0)
    with pytest.raises(UserError, match=r"^crop_size must be an integer >= 1, got 2.5$"):
        CenterCropTransform(scale=256, crop_size=2.5)
    with pytest.raises(UserError, match=r"^scale must be an integer >= 224, got 200$"):
        CenterCropTransform(scale=200, crop_size=224)  # the crop must fit in the rescaled image
    with pytest.raises(UserError, match=r"^scale must be an integer >= 1, got True$"):
        EvalTransform(scale=True)
    assert EvalTransform(scale=1).scale == 1 and CenterCropTransform(scale=1, crop_size=1).crop_size == 1


def test_draws_come_from_the_given_generator_alone():
    """Seeded per (seed, epoch, rank) by the callers: the global RNG must not leak into the draws."""
    def draws(global_seed):
        torch.manual_seed(global_seed)
        g = torch.Generator().manual_seed(5)
        return [draw_train_crop(375, 500, crop_size=224, scale_min=256, scale_max=512, generator=g) for _ in range(20)]

    assert draws(0) == draws(1)


@pytest.mark.parametrize("height", [1, 2])
def test_thin_images_give_whole_crops_at_every_position(tmp_path, height):
    """A 1- or 2-pixel-high image upsampled 30x or more: the crop box still maps to source pixels."""
    rng = np.random.default_rng(height)
    path = tmp_path / "thin.png"
    Image.fromarray(rng.integers(0, 256, (height, 50, 3), dtype=np.uint8)).save(path)
    transform = TrainTransform(crop_size=32, scale_min=65, scale_max=80)
    for index in range(40):  # 40 different per-sample draws
        with Image.open(path) as image:
            crop = transform(image, index).image
        assert crop.shape == (3, 32, 32), index
        # The crop box is under one source pixel high: it takes one source row, so all rows are equal.
        assert torch.equal(crop, crop[:, :1].expand_as(crop)), index


# --- Decoding: reduced-scale decode, modes ---------------------------------------------------------

def test_decode_time_downscaling_never_goes_below_the_target(big_jpeg):
    path, _ = big_jpeg
    for target, expected_size in [(1536, (2048, 1536)), (700, (1024, 768)), (384, (512, 384)),
                                  (300, (512, 384)), (192, (256, 192)), (100, (256, 192))]:
        with Image.open(path) as image:
            decoded = load_rgb(image, min_side=target)
        assert decoded.size == expected_size, target  # the smallest 1/2^k scale that keeps >= target
        assert decoded.mode == "RGB"


def test_downscaled_decode_gives_the_full_decode_result(big_jpeg):
    path, array = big_jpeg
    with Image.open(path) as image:
        fast = EvalTransform(scale=256)(image)
    with Image.open(path) as image:
        full = np.asarray(image.convert("RGB").resize((341, 256), Image.Resampling.BILINEAR))
    assert fast.shape == (3, 256, 341)
    assert np.abs(fast.permute(1, 2, 0).numpy().astype(int) - full.astype(int)).mean() < 2


@pytest.mark.parametrize("scales", [[192, 384, 768], [768, 1536]])  # first decoded at 1/8, at 1/2
def test_one_opened_file_serves_several_scales(big_jpeg, scales):
    """Evaluation applies EvalTransforms for Q = 256, 384, 512 to one opened image: the later,
    larger scales must not upsample the copy decoded at reduced scale for the first."""
    path, _ = big_jpeg
    with Image.open(path) as image:
        shared = [EvalTransform(scale=q)(image) for q in scales]
    for q, out in zip(scales, shared):
        with Image.open(path) as image:
            alone = EvalTransform(scale=q)(image)
        assert out.shape == alone.shape and min(out.shape[1:]) == q
        assert torch.equal(out, alone), q


def test_eval_and_center_crop_transforms(photo_jpeg):
    with Image.open(photo_jpeg) as image:
        full = EvalTransform(scale=100)(image)
    assert full.shape == (3, 100, 150) and full.dtype == torch.uint8
    with Image.open(photo_jpeg) as image:
        centre = CenterCropTransform(scale=100, crop_size=64)(image)
    assert centre.shape == (3, 64, 64)
    with Image.open(photo_jpeg) as image:
        expected = reference_resized_crop(np.asarray(image.convert("RGB")), 100, 150, 18, 43, 64)
    assert np.abs(centre.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).mean() < 3
    with Image.open(photo_jpeg) as image:  # portrait/landscape: the smallest side becomes Q
        assert EvalTransform(scale=37)(image.transpose(Image.Transpose.ROTATE_90)).shape == (3, 55, 37)
    assert scaled_size(400, 600, 100) == (100, 150) and scaled_size(600, 400, 100) == (150, 100)


def test_transforms_resample_the_reduced_decode(big_jpeg):
    """The documented speed path: a 2048x1536 JPEG for Q=192 is decoded at 1/8 scale (256x192), which
    is already the size asked for, so the result is exactly those pixels, in a contiguous tensor."""
    path, _ = big_jpeg
    with Image.open(path) as image:
        out = EvalTransform(scale=192)(image)
    with Image.open(path) as image:
        reduced = to_uint8_tensor(load_rgb(image, min_side=192))
    assert out.shape == reduced.shape == (3, 192, 256)
    assert torch.equal(out, reduced) and out.is_contiguous()


def test_downscaling_is_antialiased_like_pil(tmp_path):
    """8x down on pixel noise: an antialiased resize gives local means (as PIL's), not sampled pixels."""
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    with Image.open(path) as image:
        out = EvalTransform(scale=50)(image).permute(1, 2, 0).numpy().astype(int)
    expected = np.asarray(Image.fromarray(noise).resize((50, 50), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(out - expected).mean() < 2
    assert out.std() < 0.3 * noise.std()  # smoothed, as a local mean is


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    array = skdata.chelsea()
    image = Image.fromarray(array).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257))
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, fmt)
    with Image.open(path) as opened:
        out = TrainTransform(crop_size=32, scale_min=40, scale_max=40)(opened).image
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    with Image.open(path) as opened:
        assert load_rgb(opened).mode == "RGB"


@pytest.mark.parametrize("scale", [250, 500])  # down (no reduced-scale decode for a 400-px side) and up
def test_loaded_images_and_paths_are_accepted_too(photo_jpeg, scale):
    transform = EvalTransform(scale=scale)
    with Image.open(photo_jpeg) as image:
        lazy = transform(image)
    with Image.open(photo_jpeg) as image:
        converted = transform(image.convert("RGB"))
    with Image.open(photo_jpeg) as image:
        image.load()
        loaded = transform(image)
    assert torch.equal(lazy, converted) and torch.equal(lazy, loaded)
    assert load_rgb(photo_jpeg, min_side=50).mode == "RGB"
    assert load_rgb(str(photo_jpeg)).size == (600, 400)


# --- Batch-level float work ------------------------------------------------------------------------

def test_normalize_subtracts_the_mean_and_keeps_the_layout():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = normalize(images, IMAGENET_STATS.mean_rgb)
    assert out.dtype == torch.float32
    expected = images.float() - torch.tensor(IMAGENET_STATS.mean_rgb).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    cl = normalize(images.contiguous(memory_format=torch.channels_last), IMAGENET_STATS.mean_rgb)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, expected)
    torch.testing.assert_close(normalize(images[0], [1.0, 2.0, 3.0]), images[0].float() - torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1))


class OneDevicePerOp(TorchFunctionMode):
    """Fails any torch op that mixes tensors (other than 0-dim ones) from different devices, as CUDA does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.dim() > 0]
        assert len({t.device for t in tensors}) <= 1, f"{func} mixes devices {[t.device for t in tensors]}"
        return func(*args, **kwargs)


def test_batch_work_stays_on_the_images_device():
    """normalize and color_shift build their small tensors on the images' device (CUDA in training);
    the meta device stands in for it here, and any op that mixes it with the CPU fails."""
    images = torch.empty(2, 3, 4, 4, dtype=torch.uint8, device="meta")
    with OneDevicePerOp():
        out = normalize(images, IMAGENET_STATS.mean_rgb)
        shifted = color_shift(out, IMAGENET_STATS, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.dtype == torch.float32
    assert shifted.device.type == "meta" and shifted.shape == (2, 3, 4, 4)


def test_color_shift_adds_255_alpha_lambda_p_to_each_image():
    """The shift of image b is 255 * sum_i alpha_bi * lambda_i * p_i, alpha_bi ~ N(0, 0.1^2) by default."""
    stats = IMAGENET_STATS
    images = torch.randn(5, 3, 2, 3) * 50
    out = color_shift(images.clone(), stats, generator=torch.Generator().manual_seed(7))
    alphas = torch.randn(5, 3, generator=torch.Generator().manual_seed(7)) * 0.1
    for b in range(5):
        shift = [255 * sum(alphas[b, i].item() * stats.eigval[i] * stats.eigvec[c][i] for i in range(3))
                 for c in range(3)]
        expected = images[b] + torch.tensor(shift).view(3, 1, 1)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-4)
    assert (out - images).abs().max() > 1  # a visible shift


def test_imagenet_eigenvectors_are_the_columns():
    vec = torch.tensor(IMAGENET_STATS.eigvec)
    torch.testing.assert_close(vec.T @ vec, torch.eye(3), atol=2e-3, rtol=0)


def test_color_shift_is_a_per_image_pca_shift():
    stats = IMAGENET_STATS
    images = torch.zeros(4000, 3, 2, 2)
    out = color_shift(images.clone(), stats, std=0.1, generator=torch.Generator().manual_seed(0))
    shift = out[:, :, 0, 0]
    assert torch.equal(out, shift[:, :, None, None].expand_as(out))  # one RGB offset per image
    # In the eigenbasis the shift's coordinates are 255 * alpha_i * lambda_i, alpha_i ~ N(0, 0.1^2).
    coords = shift.double() @ torch.tensor(stats.eigvec, dtype=torch.float64)
    expected_std = 255 * 0.1 * torch.tensor(stats.eigval, dtype=torch.float64)
    torch.testing.assert_close(coords.std(dim=0), expected_std, rtol=0.06, atol=0)
    assert coords.mean(dim=0).abs().max() < 0.1 * expected_std.max()
    corr = torch.corrcoef(coords.T)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 0.06  # independent alphas


def test_color_shift_is_in_place_reproducible_and_keeps_the_layout():
    stats = DatasetStats.from_dict(IMAGENET_STATS.to_dict())
    images = torch.randn(3, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    a = color_shift(images.clone(), stats, generator=torch.Generator().manual_seed(1))
    b = color_shift(images.clone(), stats, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    c = color_shift(images.clone(), stats, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    same = images.clone()
    assert color_shift(same, stats, std=0.0) is same
    torch.testing.assert_close(same, images)


def test_color_shift_applies_given_alphas():
    stats = IMAGENET_STATS
    alphas = torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.5]])
    out = color_shift(torch.zeros(2, 3, 2, 2), stats, std=0.1, alphas=alphas)
    expected = 255 * (0.1 * alphas * torch.tensor(stats.eigval)) @ torch.tensor(stats.eigvec).T
    torch.testing.assert_close(out[:, :, 1, 1], expected)


def test_per_sample_draws_are_independent_standard_normals():
    """Alphas of 3000 samples (consecutive indices, two epochs): N(0, 1), no correlation between
    neighbouring indices or the epochs; and the same (seed, epoch, index) draws the same."""
    alphas = torch.stack([draw_alphas(sample_generator(0, epoch, i)) for epoch in (0, 1) for i in range(3000)])
    a0, a1 = alphas[:3000].flatten(), alphas[3000:].flatten()
    assert alphas.mean().abs() < 0.05 and (alphas.std() - 1).abs() < 0.05
    assert torch.corrcoef(torch.stack([a0[:-3], a0[3:]]))[0, 1].abs() < 0.06  # index i vs i + 1
    assert torch.corrcoef(torch.stack([a0, a1]))[0, 1].abs() < 0.06  # epoch 0 vs 1
    assert torch.equal(draw_alphas(sample_generator(0, 1, 7)), alphas[3007])


def test_png_bytes_decode_like_the_jpeg_path():
    """Transforms work on any PIL-openable file handed over unloaded (PNG named .JPEG)."""
    buf = io.BytesIO()
    Image.fromarray(skdata.rocket()).save(buf, "PNG")
    buf.seek(0)
    with Image.open(buf) as image:
        out = EvalTransform(scale=64)(image)
    assert out.shape == (3, 64, 95)  # 427x640 -> 64 x int(64 * 640 / 427)


def test_transform_benchmark_runs(tmp_path):
    """A smoke run of bench/transforms.py on a few files (speed is measured there, never tested)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "transforms.py"), "--images", "4", "--rounds", "1",
                             "--jpeg-dir", str(tmp_path), "--no-record"],
                            capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ours" in result.stdout and "torchvision v2" in result.stdout and len(list(tmp_path.glob("*.JPEG"))) == 4
    assert "box decode + resampling" in result.stdout and "entropy decoding" in result.stdout
    assert "ours decoding whole files" in result.stdout and "ours checking each file" in result.stdout


def test_the_benchmark_decodes_the_boxes_the_transform_crops(tmp_path):
    """bench/transforms.py splits our time into box decode, resampling and the rest: its boxes must be
    the ones the transform cuts, or the split says nothing about it."""
    sys.path.insert(0, str(ROOT))
    import torch.nn.functional as F

    from bench import transforms as bench_transforms
    from vgg.data.batches import jpeg as vjpeg

    paths = bench_transforms.make_jpegs(tmp_path, 6)
    for scale_max in (256, 512):
        transform = TrainTransform(crop_size=224, scale_min=256, scale_max=scale_max, seed=3)
        boxes = bench_transforms.crop_boxes(paths, transform)
        for index, path in enumerate(paths):
            box = vjpeg.decode_crop(vjpeg.read_jpeg(path.read_bytes()), *boxes[path])
            resampled = F.interpolate(box[None], size=(224, 224), mode="bilinear", antialias=True)[0]
            with Image.open(path) as image:
                crop = transform(image, index).image
            assert torch.equal(crop, resampled) or torch.equal(crop, resampled.flip(-1)), (path.name, scale_max)


def test_32_bit_grey_is_clipped_to_16_bits_before_scaling_to_8():
    """Mode "I" holds 32-bit values: below 0 reads as black, above 65535 as white, not wrapped around;
    in between, v * 255 / 65535 rounded to the nearest 8-bit value."""
    image = Image.fromarray(np.array([[-1000, 0, 128, 129, 257 * 7, 32768, 65406, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(load_rgb(image))[0, :, 0].tolist() == [0, 0, 0, 1, 7, 128, 254, 255, 255]


def test_sample_seeds_are_64_bit():
    """Each sample's generator gets a full 64-bit seed (with 32-bit ones, about 190 pairs of ImageNet's
    1.28 M training images would share their draws in every epoch)."""
    seeds = [sample_generator(seed, epoch, index).initial_seed() for seed in (0, 1) for epoch in (0, 7)
             for index in (0, 1, 1_281_166)]
    assert len(set(seeds)) == len(seeds) and max(seeds) >= 2**32


def test_a_samples_crop_and_alphas_come_from_its_own_generator():
    """TrainTransform draws S, the crop, the flip, then the three alphas from sample_generator(seed,
    epoch, index), whatever torch's global RNG holds; the default seed is 0."""
    image = Image.fromarray(skdata.chelsea()).resize((90, 60))  # width 90, height 60
    transform = TrainTransform(crop_size=32, scale_min=36, scale_max=48)
    transform.set_epoch(2)
    torch.manual_seed(1)
    first = transform(image, index=5)
    torch.manual_seed(2)
    again = transform(image, index=5)
    assert torch.equal(first.image, again.image) and torch.equal(first.alphas, again.alphas)
    g = sample_generator(0, 2, 5)
    draw_train_crop(60, 90, crop_size=32, scale_min=36, scale_max=48, generator=g)
    expected = draw_alphas(g)
    assert expected.shape == (3,) and torch.equal(first.alphas, expected)
