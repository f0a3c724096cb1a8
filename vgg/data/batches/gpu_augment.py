"""The GPU data path's training augmentation (paper §3.1), on whole decoded images or on the decoded crop
regions: the CPU path's draws (`vgg.data.batches.transforms.draw_train_crop`), only the boxes resampled, a batch at
once, on the device the images are on (vgg.data.batches.gpu runs it)."""

import math

import torch
import torch.nn.functional as F

from vgg.core.errors import UserError
from vgg.data.batches.transforms import draw_train_crop


def gpu_train_augment(images: list[torch.Tensor], *, crop_size: int, scale_min: int, scale_max: int,
                      generator: torch.Generator | None = None,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """uint8 [3, H, W] images (any sizes, on one device) -> uint8 [B, 3, crop, crop] on that device.

    Per image: draw (S, crop box, flip) with `vgg.data.batches.transforms.draw_train_crop`, the CPU path's own
    draw; the crop is the crop_size x crop_size box at (top, left) of the image rescaled isotropically
    (smallest side S) with antialiased bilinear interpolation (the triangle filter PIL and
    F.interpolate(antialias=True) use, the CPU path's), flipped if drawn so. The random draws use
    `generators` (one per image: in training each sample's `sample_generator`) or else `generator`
    for all (CPU generators, so the draws do not depend on the device).

    Only the box is resampled, for the whole batch at once (`_resample_boxes`): a few dozen kernels
    a batch, where rescaling each whole image in turn took ~800 and a float copy of every rescaled
    image. Its pixels are those of rescaling the whole image and cutting the box (the filter reaches
    past the box's edge, into the image, as it would there); the CPU path instead snaps the box to
    whole source pixels and filters inside it (moving it by under a source pixel, scaling it by under
    1 %), and decodes JPEGs at a reduced scale where it can: the same distribution of crops.
    """
    _check_scales(crop_size, scale_min, scale_max)
    if not images:
        return torch.empty(0, 3, crop_size, crop_size, dtype=torch.uint8)
    boxes = [_draw_box(*image.shape[-2:], generator if generators is None else generators[i], crop_size=crop_size,
                       scale_min=scale_min, scale_max=scale_max) for i, image in enumerate(images)]
    return _resample_boxes(images, boxes, crop_size)


def _resample_boxes(images: list[torch.Tensor], boxes: list[tuple], size: int,
                    limits: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """uint8 [3, H_b, W_b] images and per image (y0, y_scale, x0, x_scale, flip) -> uint8 [B, 3, size, size]:
    output pixel (i, j) of image b samples source position (y0 + (i + 0.5) y_scale, x0 + (j + 0.5) x_scale)
    with the antialiased bilinear (triangle) filter, mirrored left-right where flip. limits: each image's
    rows and columns that are pixels (its edge, where the filter is cut); the rest is padding (default: none).

    The filter is separable, so each image's crop is Wy_b @ image_b @ Wx_b^T with weight matrices
    [size, H_b] and [size, W_b] that are zero outside the box and its filter margin. Images of one
    shape (ImageNet has few: most are 500 x 375 or 375 x 500) go through two batched matmuls
    together, on the band of rows and columns their boxes need; all weights are built at once on
    the device from one small copy of the boxes. The flip is a mirrored Wx. The matmuls run at the
    device's float32 matmul precision: with TF32 allowed (CUDA), a pixel may round one level off.
    """
    device = images[0].device
    order = sorted(range(len(images)), key=lambda b: tuple(images[b].shape[-2:]))  # same shapes together
    groups = []  # [first, end) in `order`, (H, W), band: rows/columns [y_lo, y_hi) x [x_lo, x_hi) any box reaches
    for rank, b in enumerate(order):
        shape = tuple(images[b].shape[-2:])
        if not groups or groups[-1]["shape"] != shape:
            groups.append({"first": rank, "shape": shape, "band": [shape[0], 0, shape[1], 0]})
        groups[-1]["end"] = rank + 1
        y0, y_scale, x0, x_scale, _ = boxes[b]
        band = groups[-1]["band"]
        for axis, (start, scale, limit) in enumerate(((y0, y_scale, shape[0]), (x0, x_scale, shape[1]))):
            lo, hi = _reach(start, scale, size, limit)
            band[2 * axis], band[2 * axis + 1] = min(band[2 * axis], lo), max(band[2 * axis + 1], hi)
    # One row per image, in `order`: its box, its image's size and its group's band start (where its
    # weights begin), the flip, and the image's place in the batch.
    params = []
    for group in groups:
        y_lo, x_lo = group["band"][0], group["band"][2]
        for b in order[group["first"]:group["end"]]:
            y0, y_scale, x0, x_scale, flip = boxes[b]
            height, width = limits[b] if limits is not None else images[b].shape[-2:]
            params.append([y0, y_scale, height, y_lo, x0, x_scale, width, x_lo, float(flip), b])
    params = torch.tensor(params, dtype=torch.float32)  # (exact for the integers: all below 2^24)
    if device.type == "cuda":  # one asynchronous copy for the whole batch
        params = params.pin_memory()
    params = params.to(device, non_blocking=True)
    rows = _filter_weights(params[:, 0], params[:, 1], params[:, 2], params[:, 3], size,
                           max(g["band"][1] - g["band"][0] for g in groups))
    cols = _filter_weights(params[:, 4], params[:, 5], params[:, 6], params[:, 7], size,
                           max(g["band"][3] - g["band"][2] for g in groups), flip=params[:, 8] > 0)
    crops = []
    for group in groups:
        first, end, (y_lo, y_hi, x_lo, x_hi) = group["first"], group["end"], group["band"]
        n, h, w = end - first, y_hi - y_lo, x_hi - x_lo
        # [n, h, 3, w]: rows outermost, so both products below are batched matmuls of plain views
        band = torch.stack([images[b][:, y_lo:y_hi, x_lo:x_hi].permute(1, 0, 2) for b in order[first:end]])
        part = torch.bmm(rows[first:end, :, :h], band.float().view(n, h, 3 * w))  # [n, size, 3 w]
        part = torch.bmm(part.view(n, size * 3, w), cols[first:end, :, :w].transpose(1, 2))  # [n, 3 size, size]
        crops.append(part.view(n, size, 3, size).permute(0, 2, 1, 3))
    crops = torch.cat(crops)  # in `order`: back to the images' order
    batch = torch.empty_like(crops).index_copy_(0, params[:, 9].long(), crops)
    return batch.round_().clamp_(0, 255).to(torch.uint8)


def _filter_weights(start: torch.Tensor, scale: torch.Tensor, limit: torch.Tensor, offset: torch.Tensor,
                    size: int, length: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per image b (float32 [B] each, on the device): the antialiased bilinear weights [B, size, length]
    of output pixel i over source pixels offset_b .. offset_b + length - 1 along one axis (of
    `limit` pixels), the output pixel sampling source position start + (i + 0.5) * scale. As in
    F.interpolate(antialias=True) and PIL: a triangle of half-width max(scale, 1) source pixels,
    cut at the image's edge and normalised to sum 1. flip [B] (bool): mirror the output axis."""
    device = start.device
    center = start[:, None] + scale[:, None] * (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    pixel = offset[:, None] + torch.arange(length, device=device, dtype=torch.float32)  # [B, length]
    support = scale.clamp(min=1.0)[:, None, None]
    weights = (1 - (pixel[:, None, :] + 0.5 - center[:, :, None]).abs_() / support).clamp_(min=0)
    weights *= (pixel < limit[:, None])[:, None, :]  # past the edge of an image (band of a larger one)
    weights /= weights.sum(dim=2, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights


def _check_scales(crop_size: int, scale_min: int, scale_max: int) -> None:
    if scale_min < crop_size or scale_max < scale_min:
        raise UserError(f"need crop_size <= scale_min <= scale_max, got crop_size={crop_size}, "
                        f"scale_min={scale_min}, scale_max={scale_max}")


def _draw_box(height: int, width: int, generator, *, crop_size: int, scale_min: int, scale_max: int) -> tuple:
    """One image's draws as source-pixel box (y0, y_scale, x0, x_scale, flip): its start and the source pixels
    per output pixel, as F.interpolate maps a rescaled image's pixel k to source position
    (k + 0.5) * height / new_h - 0.5."""
    new_h, new_w, top, left, flip = draw_train_crop(height, width, crop_size=crop_size, scale_min=scale_min,
                                                    scale_max=scale_max, generator=generator)
    return top * height / new_h, height / new_h, left * width / new_w, width / new_w, flip


def _reach(start: float, scale: float, size: int, limit: int) -> tuple[int, int]:
    """The source pixels [lo, hi) inside [0, limit) that `size` output pixels from `start` (scale source
    pixels each) reach with the triangle filter (half-width max(scale, 1); one more each side: rounding)."""
    support = max(scale, 1.0)
    return max(0, math.floor(start - support) - 1), min(limit, math.ceil(start + size * scale + support) + 1)


def region_train_augment(decoder, encoded: list[torch.Tensor], generators: list[torch.Generator], *,
                         crop_size: int, scale_min: int, scale_max: int, decode_whole) -> tuple[torch.Tensor, list]:
    """`gpu_train_augment` on the crop regions only: each JPEG's header gives its size, the draws give its
    box, and `decoder` (vgg.data.batches.gpu_decode.RegionDecoder) decodes the rows and columns the box's filter
    reaches, for the whole batch in one call; then the boxes are resampled as from the whole images (the
    same pixels: the filter reaches nothing outside the region). The regions are one size (the batch's
    largest), so they resample together; an image smaller than that is padded (and masked).

    decode_whole(i) -> uint8 [3, H, W] on the device, or None: for a file the decoder cannot read
    (the caller's CPU decode). Returns (uint8 [B', 3, crop, crop], the positions of the B' images kept)."""
    _check_scales(crop_size, scale_min, scale_max)
    sizes = decoder.sizes(encoded)
    boxes = [None if hw is None else _draw_box(*hw, g, crop_size=crop_size, scale_min=scale_min, scale_max=scale_max)
             for hw, g in zip(sizes, generators)]
    reach = [None if box is None else (*_reach(box[0], box[1], crop_size, hw[0]), *_reach(box[2], box[3], crop_size, hw[1]))
             for hw, box in zip(sizes, boxes)]
    high = max([r[1] - r[0] for r in reach if r] or [1])
    wide = max([r[3] - r[2] for r in reach if r] or [1])
    regions = {}  # i -> (top, left, bottom, right), the same size for all but images smaller than it
    for i, (hw, r) in enumerate(zip(sizes, reach)):
        if r is not None:
            top, left = max(0, min(r[0], hw[0] - high)), max(0, min(r[2], hw[1] - wide))
            regions[i] = (top, left, min(hw[0], top + high), min(hw[1], left + wide))
    decoded = dict(zip(regions, decoder.decode([encoded[i] for i in regions], list(regions.values()))))
    images, kept_boxes, keep = [], [], []
    for i in range(len(encoded)):
        image, top, left = decoded.get(i), *regions.get(i, (0, 0))[:2]
        box = boxes[i]
        if image is None:  # whole, on the CPU (its box drawn above, or now where the header was unreadable)
            image = decode_whole(i)
            if image is None:
                continue
            if box is None:
                box = _draw_box(*image.shape[-2:], generators[i], crop_size=crop_size, scale_min=scale_min,
                                scale_max=scale_max)
            (top, bottom), (left, right) = (_reach(box[0], box[1], crop_size, image.shape[-2]),
                                            _reach(box[2], box[3], crop_size, image.shape[-1]))
            image = image[:, top:bottom, left:right]
        images.append(image)
        kept_boxes.append((box[0] - top, box[1], box[2] - left, box[3], box[4]))
        keep.append(i)
    if not images:
        return torch.empty(0, 3, crop_size, crop_size, dtype=torch.uint8), keep
    limits = [tuple(image.shape[-2:]) for image in images]
    high, wide = max(h for h, _ in limits), max(w for _, w in limits)
    images = [image if image.shape[-2:] == (high, wide) else
              F.pad(image, (0, wide - image.shape[-1], 0, high - image.shape[-2])) for image in images]
    return _resample_boxes(images, kept_boxes, crop_size, limits), keep
