"""The GPU data path (vgg/data/batches/gpu.py) run on the CPU: same training-image distribution as the CPU
path, awkward files decoded or skipped but never fatal; plus the benchmarks' FLOP count and a smoke
run of bench/train_step.py."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, subprocess_env
from PIL import Image
from skimage import data as skdata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vgg.data.batches import jpeg as vjpeg
from vgg.data.batches.decode import Unreadable
from vgg.data.batches.gpu import (
    build_gpu_train_loader,
    collate_encoded,
    decode_batch,
    decode_on_cpu,
    gpu_train_augment,
    jpeg_components,
    split_encoded,
)
from vgg.data.batches.transforms import TrainTransform, color_shift, draw_train_crop, normalize, sample_generator
from vgg.data.datasets import folders as vfolders
from vgg.data.datasets import stats as vstats
from vgg.training.step import BatchAugment

CROP, S_MIN, S_MAX = 64, 72, 128
DRAWS = 300


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def as_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def coordinate_image(height: int = 300, width: int = 400) -> np.ndarray:
    """R encodes x and G encodes y (0..255 across the image): a crop's R/G values tell where it came
    from, how much of the image it covers, and whether it was flipped."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def awkward_dir(tmp_path_factory):
    """A class folder of good photos and the files ImageNet is known for: CMYK, PNG-as-JPEG, grey,
    plus an empty file and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("awkward") / "train" / "n00000001"
    folder.mkdir(parents=True)
    photos = {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee(),
              "rocket": skdata.rocket()}
    for name, array in photos.items():
        (folder / f"{name}.JPEG").write_bytes(jpeg_bytes(array))
    (folder / "cmyk.JPEG").write_bytes(jpeg_bytes(photos["chelsea"], mode="CMYK"))
    (folder / "grey.JPEG").write_bytes(jpeg_bytes(photos["coffee"], mode="L"))
    png = io.BytesIO()
    Image.fromarray(photos["rocket"]).save(png, "PNG")
    (folder / "png_named.JPEG").write_bytes(png.getvalue())
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "truncated.JPEG").write_bytes(jpeg_bytes(photos["astronaut"])[:2000])
    return folder.parent


def test_jpeg_components_reads_the_frame_header():
    photo = skdata.chelsea()
    assert jpeg_components(as_tensor(jpeg_bytes(photo))) == 3
    assert jpeg_components(as_tensor(jpeg_bytes(photo, mode="L"))) == 1
    assert jpeg_components(as_tensor(jpeg_bytes(photo, mode="CMYK"))) == 4
    png = io.BytesIO()
    Image.fromarray(photo).save(png, "PNG")
    assert jpeg_components(as_tensor(png.getvalue())) == 0
    assert jpeg_components(as_tensor(b"\xff\xd8\xff")) == 0


def test_collate_packs_bytes_and_split_recovers_them():
    b = Unreadable("b", "PermissionError")
    items = [(b"abc", 0, "a", 7, 1), (None, 1, b, 5, 3), (b"", 2, "c", 0, 2), (b"defg", 3, "d", 9, 0)]
    flat, sizes, labels, names, unreadable, indices, checks = collate_encoded(items)
    assert checks.tolist() == [1, 3, 2, 0]
    parts = split_encoded(flat, sizes)
    assert [None if p is None else bytes(p.tolist()) for p in parts] == [b"abc", None, b"", b"defg"]
    assert labels.tolist() == [0, 1, 2, 3] and names == ["a", "b", "c", "d"] and unreadable == [b]
    assert indices.tolist() == [7, 5, 0, 9]


@pytest.mark.parametrize("batched", [True, False])
def test_decode_batch_matches_pil_and_falls_back(awkward_dir, batched, caplog):
    """batched=True is the CUDA code path (one batched call, then per-file retry, then the CPU
    decoder) run with TorchCodec's CPU decoder; awkward files must not fail the good ones."""
    paths = sorted((awkward_dir / "n00000001").iterdir())
    encoded = [as_tensor(p.read_bytes()) for p in paths]
    decoded = decode_batch(encoded, "cpu", [str(p) for p in paths], batched=batched)
    assert "empty.JPEG (empty file)" in caplog.text and "truncated.JPEG" in caplog.text
    for path, image in zip(paths, decoded):
        if path.name in ("empty.JPEG", "truncated.JPEG"):
            continue
        assert image is not None, path.name
        with Image.open(path) as pil:
            expected = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        assert image.shape == expected.shape and image.dtype == torch.uint8
        if path.name != "cmyk.JPEG":  # libjpeg's and PIL's CMYK->RGB conversions differ slightly
            assert (image.int() - expected.int()).abs().float().mean() < 1.0, path.name
    assert decoded[[p.name for p in paths].index("empty.JPEG")] is None


def test_loader_skips_the_same_files_as_the_cpu_path(awkward_dir):
    cpu_set = vfolders.ImageFolder(awkward_dir, TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX))
    cpu_skipped = sum(cpu_set[i][0] is None for i in range(len(cpu_set)))
    loader = build_gpu_train_loader(cpu_set, batch_size=4, device="cpu", crop_size=CROP, scale_min=S_MIN,
                                    scale_max=S_MAX, workers=1, drop_last=False)
    seen, skipped = 0, 0
    named = set()
    for (images, alphas), labels, unreadable in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, CROP, CROP)
        assert images.shape[0] == labels.shape[0] and alphas.shape == (labels.shape[0], 3)
        seen, skipped = seen + labels.shape[0], skipped + len(unreadable)
        named |= {f.path for f in unreadable}
    assert seen + skipped == len(cpu_set)
    assert skipped == cpu_skipped >= 1  # the empty file at least
    assert named == {path for i, (path, _) in enumerate(cpu_set.samples) if cpu_set[i][0] is None}


def test_loader_workers_persist_across_epochs_and_draws_follow_the_epoch(awkward_dir):
    """Workers are started once for the run (they only read files); each epoch's draws still follow
    the epoch set on the loader (the main process draws them)."""
    folder = vfolders.ImageFolder(awkward_dir, None)
    loader = build_gpu_train_loader(folder, batch_size=4, device="cpu", crop_size=CROP, scale_min=S_MIN,
                                    scale_max=S_MAX, workers=1, drop_last=False, prefetch=False)
    pids, epochs = [], []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append(torch.cat([images for (images, _), _, _ in loader]))
        pids.append({w.pid for w in loader.loader._iterator._workers})
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 1
    assert torch.equal(epochs[0], epochs[2]) and not torch.equal(epochs[0], epochs[1])


def crop_statistics(crops: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per crop of the coordinate image: centre (x, y), covered fraction of the height, flipped?"""
    r, g = crops[:, 0].float() / 255, crops[:, 1].float() / 255
    return {"x": r.mean(dim=(1, 2)), "y": g.mean(dim=(1, 2)),
            "cover": g[:, -1, :].mean(dim=1) - g[:, 0, :].mean(dim=1),
            "flip": (r[:, :, 0].mean(dim=1) > r[:, :, -1].mean(dim=1)).float()}


def test_crops_have_the_cpu_path_distribution(tmp_path):
    """Where crops come from, how much they cover and how often they flip: CPU path (TrainTransform
    on a PIL image) vs GPU path (decode + gpu_train_augment), over many draws of one image."""
    path = tmp_path / "coord.JPEG"
    path.write_bytes(jpeg_bytes(coordinate_image(), quality=98))
    transform = TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX)
    torch.manual_seed(0)
    with Image.open(path) as pil:
        pil = pil.convert("RGB")
        cpu = torch.stack([transform(pil).image for _ in range(DRAWS)])
    decoded = decode_batch([as_tensor(path.read_bytes())], "cpu")[0]
    gpu = gpu_train_augment([decoded] * DRAWS, crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX,
                            generator=torch.Generator().manual_seed(1))
    assert gpu.shape == cpu.shape == (DRAWS, 3, CROP, CROP) and gpu.dtype == cpu.dtype == torch.uint8
    a, b = crop_statistics(cpu), crop_statistics(gpu)
    # The height covered is CROP/S with S uniform in [S_MIN, S_MAX]: known exactly.
    s = torch.arange(S_MIN, S_MAX + 1).float()
    expected_cover = (CROP / s).mean().item()
    for stats in (a, b):
        assert abs(stats["cover"].mean().item() - expected_cover) < 0.02
    for key in ("x", "y", "cover", "flip"):
        tolerance = 4 * ((a[key].var() + b[key].var()) / DRAWS).sqrt().item() + 0.01
        assert abs(a[key].mean().item() - b[key].mean().item()) < tolerance, key
        assert abs(a[key].std().item() - b[key].std().item()) < 0.25 * a[key].std().item() + 0.01, key
    assert 0.4 < b["flip"].mean().item() < 0.6


def rescale_then_crop(images, generators, *, crop_size, scale_min, scale_max) -> torch.Tensor:
    """The augmentation as the paper words it, image by image: rescale the whole image (antialiased
    bilinear, float), cut the crop, flip (the GPU path's former code, kept here as the reference)."""
    crops = []
    for image, generator in zip(images, generators):
        new_h, new_w, top, left, flip = draw_train_crop(image.shape[-2], image.shape[-1], crop_size=crop_size,
                                                        scale_min=scale_min, scale_max=scale_max, generator=generator)
        rescaled = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                 align_corners=False)[0]
        crop = rescaled[:, top:top + crop_size, left:left + crop_size]
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops).round_().clamp_(0, 255).to(torch.uint8)


def mixed_images(count: int = 12) -> list[torch.Tensor]:
    """Noise images of five shapes, interleaved (landscape, portrait, square, odd, large), so the
    batched path must group them and put each crop back in its place."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(60, 80), (80, 60), (60, 80), (70, 70), (33, 47), (160, 110)]
    return [torch.randint(0, 256, (3, *shapes[i % len(shapes)]), dtype=torch.uint8, generator=generator)
            for i in range(count)]


@pytest.mark.parametrize("crop_size,scale_min,scale_max", [(32, 32, 64), (32, 40, 200), (24, 24, 24)])
def test_box_resampling_gives_the_pixels_of_rescale_then_crop(crop_size, scale_min, scale_max):
    """Resampling only the boxes, batched, gives each image's crop of its rescaled whole image (to a
    rounding tie), in the images' order; S up to 200 makes the 33 x 47 image upsampled."""
    images = mixed_images()

    def generators():
        return [sample_generator(3, 1, i) for i in range(len(images))]

    expected = rescale_then_crop(images, generators(), crop_size=crop_size, scale_min=scale_min, scale_max=scale_max)
    batched = gpu_train_augment(images, crop_size=crop_size, scale_min=scale_min, scale_max=scale_max,
                                generators=generators())
    assert batched.shape == expected.shape == (len(images), 3, crop_size, crop_size) and batched.dtype == torch.uint8
    difference = (batched.int() - expected.int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01
    flips = [draw_train_crop(*im.shape[-2:], crop_size=crop_size, scale_min=scale_min, scale_max=scale_max,
                             generator=g)[4] for im, g in zip(images, generators())]
    assert 0 < sum(flips) < len(images)  # both kinds were compared


class OpCount(TorchDispatchMode):
    """Counts the ops that would be kernels on the device: not views (metadata only), not ops on
    single numbers, not random draws from a generator passed in (each image's draws: the CPU path's
    own, from CPU generators in both paths)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        drawn = any(isinstance(leaf, torch.Generator) for leaf in tree_leaves((args, kwargs)))
        self.count += not func.is_view and not drawn and any(t.numel() > 1 for t in tensors)
        return out


def augment_ops(images) -> int:
    """Device ops (kernels, roughly) that gpu_train_augment runs for a batch."""
    with OpCount() as ops:
        gpu_train_augment(images, crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX,
                          generators=[sample_generator(0, 0, i) for i in range(len(images))])
    return ops.count


def test_augmentation_work_is_per_batch_and_image_shape_not_per_image():
    """The op count does not grow with the number of images of a shape, only a few ops per shape."""
    photo = mixed_images(1)[0]
    one_shape = augment_ops([photo] * 4)
    assert augment_ops([photo] * 32) == one_shape
    two_shapes = augment_ops([photo, photo.transpose(1, 2)] * 16)
    assert one_shape < two_shapes <= one_shape + 6


def test_normalized_mean_and_colour_shift_match_the_cpu_path(awkward_dir, tmp_path):
    stats = vstats.IMAGENET_STATS
    paths = [awkward_dir / "n00000001" / f"{n}.JPEG" for n in ("astronaut", "chelsea", "coffee", "rocket")]
    transform = TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX)
    torch.manual_seed(0)
    pils = []
    for p in paths:
        with Image.open(p) as im:
            pils.append(im.convert("RGB"))
    cpu = normalize(torch.stack([transform(pils[i % 4]).image for i in range(DRAWS)]), stats.mean_rgb)
    decoded = decode_batch([as_tensor(p.read_bytes()) for p in paths], "cpu")
    gpu = normalize(gpu_train_augment([decoded[i % 4] for i in range(DRAWS)], crop_size=CROP, scale_min=S_MIN,
                                      scale_max=S_MAX, generator=torch.Generator().manual_seed(1)),
                    stats.mean_rgb)
    assert gpu.dtype == cpu.dtype == torch.float32
    assert torch.allclose(cpu.mean(dim=(0, 2, 3)), gpu.mean(dim=(0, 2, 3)), atol=3.0)
    assert torch.allclose(cpu.std(dim=(0, 2, 3)), gpu.std(dim=(0, 2, 3)), rtol=0.05)

    # Colour shift: on a flat grey image every crop is the same, so the spread of the per-image
    # channel means is the shift alone. CPU path: TrainTransform -> normalize -> color_shift in
    # BatchAugment; GPU path: the loader's uint8 crops and per-sample alphas -> the same BatchAugment.
    grey = tmp_path / "grey" / "n00000001"
    grey.mkdir(parents=True)
    for i in range(8):
        (grey / f"{i}.JPEG").write_bytes(jpeg_bytes(np.full((90, 120, 3), 128, np.uint8)))
    flat = torch.stack([transform(Image.open(grey / "0.JPEG").convert("RGB")).image for _ in range(DRAWS)])
    cpu_shift = color_shift(normalize(flat, stats.mean_rgb), stats, std=0.1,
                            generator=torch.Generator().manual_seed(2)).mean(dim=(2, 3))
    loader = build_gpu_train_loader(vfolders.ImageFolder(grey.parent, None), batch_size=4, device="cpu",
                                    crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX, workers=0,
                                    shuffle=True, seed=3)
    augment = BatchAugment(stats, torch.device("cpu"), color_shift_std=0.1)
    passes = -(-DRAWS // len(loader.loader.dataset))  # enough epochs of the 8 files for DRAWS images
    gpu_shift = []
    for epoch in range(passes):  # each epoch draws new alphas for the same files
        loader.set_epoch(epoch)
        gpu_shift += [augment(images, train=True).mean(dim=(2, 3)) for images, _, _ in loader]
    gpu_shift = torch.cat(gpu_shift)[:DRAWS]
    assert gpu_shift.dtype == torch.float32 and gpu_shift.shape == (DRAWS, 3)
    cpu_std, gpu_std = cpu_shift.std(dim=0), gpu_shift.std(dim=0)
    assert (cpu_std > 0.5).all()  # the shift is really there
    assert torch.allclose(cpu_std, gpu_std, rtol=0.25), (cpu_std, gpu_std)
    assert torch.allclose(cpu_shift.mean(dim=0), gpu_shift.mean(dim=0), atol=4 * cpu_std.max().item() / DRAWS**0.5)


def test_prefetch_thread_gives_the_same_batches_and_stops_early(awkward_dir):
    folder = vfolders.ImageFolder(awkward_dir, None)

    def batches(prefetch, limit=None):
        loader = build_gpu_train_loader(folder, batch_size=3, device="cpu", crop_size=CROP, scale_min=S_MIN,
                                        scale_max=S_MAX, workers=0, seed=5, shuffle=True, prefetch=prefetch)
        out = []
        for i, batch in enumerate(loader):
            if limit is not None and i == limit:
                break  # the background thread must wind down, not hang
            out.append(batch)
        return out

    plain, prefetched = batches(False), batches(True)
    assert len(plain) == len(prefetched) == len(folder) // 3
    for (a, la, sa), (b, lb, sb) in zip(plain, prefetched):
        assert torch.equal(a.image, b.image) and torch.equal(a.alphas, b.alphas)
        assert torch.equal(la, lb) and sa == sb
    assert len(batches(True, limit=1)) == 1


def test_undecodable_bytes_give_none_with_a_warning(caplog):
    assert decode_on_cpu(as_tensor(b"not an image at all"), "bad.JPEG") is None
    assert "skipping unreadable image bad.JPEG" in caplog.text
    assert decode_on_cpu(None, "unreadable.JPEG") is None


def test_count_macs_gives_the_papers_15_5_g_for_net_d():
    from bench.common import count_macs
    from vgg.models.vgg import build_vgg

    with torch.device("meta"):
        model = build_vgg("D")
    macs = count_macs(model, 224)
    assert abs(macs - 15.47e9) < 0.01e9, macs
    with torch.device("meta"):
        assert count_macs(build_vgg("A"), 224) < count_macs(build_vgg("E"), 224)


def test_train_step_bench_runs_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--device", "cpu", "--nets", "A",
         "--width", "0.0625", "--fc-width", "32", "--image-size", "32", "--batch", "2", "--steps", "1",
         "--warmup", "1", "--matmul-size", "128", "--no-record"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    figures = result.stdout.strip().splitlines()[-1]
    assert figures.startswith("train step (batch 2, 32px")
    assert "net A:" in figures and "img/s" in figures and "MFU" in figures
    assert "plain torchvision vgg16 fp32" in figures


@pytest.mark.skipif(not vjpeg.available(), reason="nvImageCodec has no wheel for this platform")
def test_nvimagecodec_region_decode_gives_the_whole_image_decodes_crops(awkward_dir):
    """decoder="nvimgcodec" (its CPU backend here: the GPU code path on CPU tensors) decodes the regions the
    crop boxes reach only: the crops of TorchCodec's whole-image decode (to a rounding tie: the resampling's
    float sums run over a different band), the same files skipped, and the CPU path's crops of the same
    draws within the resize tolerance (it snaps each box to whole source pixels)."""
    folder = vfolders.ImageFolder(awkward_dir, TrainTransform(crop_size=CROP, scale_min=S_MIN, scale_max=S_MAX))
    out = {}
    for decoder in ("torchcodec", "nvimgcodec"):
        loader = build_gpu_train_loader(folder, batch_size=5, device="cpu", crop_size=CROP, scale_min=S_MIN,
                                        scale_max=S_MAX, workers=0, drop_last=False, prefetch=False, decoder=decoder)
        batches = list(loader)
        out[decoder] = (torch.cat([b[0].image for b in batches]), torch.cat([b[0].alphas for b in batches]),
                        torch.cat([b[1] for b in batches]), sorted(u.path for b in batches for u in b[2]))
    (whole, alphas, labels, skipped), (regions, region_alphas, region_labels, region_skipped) = out.values()
    assert skipped == region_skipped and len(skipped) == 2  # the empty and the truncated file
    assert torch.equal(labels, region_labels) and torch.equal(alphas, region_alphas)
    assert (whole.int() - regions.int()).abs().max() <= 1
    kept = [i for i in range(len(folder)) if folder[i][0] is not None]
    cpu = torch.stack([folder[i][0].image for i in kept]).int()
    assert regions.shape == cpu.shape
    assert (regions.int() - cpu).abs().float().mean() < 4.0
