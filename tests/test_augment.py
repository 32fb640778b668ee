"""Invariants of the UniMatch / MSPL augmentation: sizes, padding, alignment, box laws, views (on the
seed's per-sample reference; tests/test_fast_path.py shows the batched views equal it)."""

import random

import pytest
import torch
from PIL import Image

from trainers import augment
from trainers import augment_reference as reference
from trainers.augment import Box, Jitter, Photometric
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec

PALETTE = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [40, 220, 220]])
MEAN = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def seeded():
    random.seed(0)
    torch.manual_seed(0)


def block_pair(height: int, width: int, block: int = 12) -> tuple[Image.Image, Image.Image]:
    """A mask of random class blocks and an image whose colour is the palette colour of its class."""
    cells = torch.randint(0, len(PALETTE), ((height + block - 1) // block, (width + block - 1) // block))
    mask = cells.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width]
    image = PALETTE[mask].to(torch.uint8)
    return Image.fromarray(image.numpy()), Image.fromarray(mask.to(torch.uint8).numpy(), mode="L")


def tensors(image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    return augment.image_to_tensor(image).long(), augment.mask_to_tensor(mask)


def assert_aligned(image: torch.Tensor, mask: torch.Tensor, margin: int = 0, tolerance: float = 1.5) -> int:
    """Where the mask is one class within `margin` pixels, the colour is that class's palette colour;
    padding (255) is black. margin 0 checks every pixel (ops without resampling)."""
    size = 2 * margin + 1
    padded = torch.nn.functional.pad(mask[None, None].float(), (margin,) * 4, value=-1)
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)[0, 0]
    uniform = (windows == mask[..., None, None]).all(-1).all(-1)
    labeled = mask < len(PALETTE)
    expected = PALETTE[mask.clamp(max=len(PALETTE) - 1)].permute(2, 0, 1)
    error = (image.float() - expected.float()).abs().amax(0)
    assert (error[uniform & labeled] <= tolerance).all()
    assert (image[:, uniform & (mask == reference.IGNORE)].abs() <= tolerance).all()
    return int((uniform & labeled).sum())


def unnormalize(image: torch.Tensor) -> torch.Tensor:
    return (image * STD + MEAN) * 255


# ---- geometry ----


@pytest.mark.parametrize("size", [(20, 14), (97, 61), (33, 33)])
def test_labeled_output_is_crop_sized(size):
    out = reference.labeled_transform(33)(*block_pair(size[1], size[0]))
    assert out["image"].shape == (3, 33, 33) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (33, 33) and out["mask"].dtype == torch.int64


def test_resize_keeps_aspect_and_scale_range():
    image, mask = block_pair(40, 80)
    longs = set()
    for _ in range(60):
        big, small = augment.resize(image, mask)
        assert big.size == small.size
        w, h = big.size
        assert 40 <= w <= 160 and h == int(40 * w / 80 + 0.5)
        longs.add(w)
    assert min(longs) < 60 and max(longs) > 130


def test_crop_pads_image_with_zero_and_mask_with_fill():
    image = Image.new("RGB", (5, 4), (9, 9, 9))
    mask = Image.new("L", (5, 4), 3)
    for fill in (reference.IGNORE, augment.UNLABELED_PAD):
        out_image, out_mask = tensors(*augment.crop(image, mask, 8, fill))
        assert out_image.shape == (3, 8, 8)
        assert (out_image[:, :4, :5] == 9).all() and (out_image[:, 4:] == 0).all()
        assert (out_image[:, :, 5:] == 0).all()
        assert (
            (out_mask[:4, :5] == 3).all() and (out_mask[4:] == fill).all() and (out_mask[:, 5:] == fill).all()
        )


def test_labeled_padding_is_ignore_where_image_is_zero():
    image, mask = Image.new("RGB", (6, 5), (200, 100, 50)), Image.new("L", (6, 5), 3)
    out = reference.labeled_transform(33)(image, mask)
    raw = unnormalize(out["image"])
    padding = out["mask"] == reference.IGNORE
    assert 0 < padding.sum() < 33 * 33 and set(out["mask"].unique().tolist()) == {3, 255}
    assert (raw[:, padding].abs() < 1e-3).all()
    assert torch.allclose(raw[:, ~padding], torch.tensor([200.0, 100.0, 50.0])[:, None], atol=1e-3)


def test_unlabeled_ignore_marks_exactly_the_padding():
    image, mask = Image.new("RGB", (6, 5), (200, 100, 50)), Image.new("L", (6, 5), 3)
    out = reference.unlabeled_transform(33, ViewSpec(strong_views=2))(image, mask)
    raw = unnormalize(out["weak"])
    padding = out["ignore"] == 255
    assert set(out["ignore"].unique().tolist()) == {0, 255} and out["ignore"].dtype == torch.int64
    assert (raw[:, padding].abs() < 1e-3).all()
    assert torch.allclose(raw[:, ~padding], torch.tensor([200.0, 100.0, 50.0])[:, None], atol=1e-3)


def test_unlabeled_mask_values_other_than_padding_are_not_ignored():
    # Long side >= 0.5 x 80 = 40 > 33 after any rescale: no padding.
    image, mask = block_pair(80, 80)
    for _ in range(5):
        out = reference.unlabeled_transform(33, ViewSpec(strong_views=1))(image, mask)
        assert out["ignore"].sum() == 0


@pytest.mark.parametrize(
    "op, margin",
    [
        (augment.resize, 2),
        (lambda i, m: augment.crop(i, m, 60, reference.IGNORE), 0),
        (lambda i, m: augment.hflip(i, m, p=1.0), 0),
        (lambda i, m: augment.geometry(i, m, 40, reference.IGNORE), 2),
    ],
    ids=["resize", "crop", "hflip", "geometry"],
)
def test_geometric_ops_keep_image_and_mask_aligned(op, margin):
    checked = 0
    for _ in range(8):
        image, mask = op(*block_pair(48, 72))
        assert image.size == mask.size
        checked += assert_aligned(*tensors(image, mask), margin=margin)
    assert checked > 1000


def test_hflip_mirrors_both():
    image, mask = block_pair(10, 16, block=3)
    flipped = tensors(*augment.hflip(image, mask, p=1.0))
    original = tensors(image, mask)
    assert torch.equal(flipped[0], original[0].flip(-1)) and torch.equal(flipped[1], original[1].flip(-1))
    assert augment.hflip(image, mask, p=0.0) == (image, mask)


def test_labeled_transform_keeps_alignment_end_to_end():
    transform = reference.labeled_transform(40)
    checked = 0
    for _ in range(8):
        out = transform(*block_pair(48, 72))
        checked += assert_aligned(unnormalize(out["image"]), out["mask"], margin=2, tolerance=2.0)
    assert checked > 1000


def test_palette_mask_keeps_class_ids():
    image, mask = block_pair(40, 50)
    palette_mask = mask.convert("P")
    palette_mask.putpalette([7, 7, 7] * 256)
    out = reference.labeled_transform(33)(image, palette_mask)
    assert set(out["mask"].unique().tolist()) <= set(range(len(PALETTE))) | {255}


# ---- boxes ----


def test_cutmix_box_is_one_rectangle_inside_the_crop():
    nonempty = 0
    for _ in range(300):
        box = reference.cutmix_box(33)
        assert box.shape == (33, 33) and box.dtype == torch.int64
        assert set(box.unique().tolist()) <= {0, 1}
        if box.any():
            nonempty += 1
            rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
            assert len(rows) == rows[-1] - rows[0] + 1 and len(cols) == cols[-1] - cols[0] + 1
            assert box.sum() == len(rows) * len(cols) <= 0.4 * 33 * 33
    assert 120 < nonempty < 180


def test_cutmix_box_probability_extremes():
    assert all(reference.cutmix_box(17, p=1.0).any() for _ in range(30))
    assert not any(reference.cutmix_box(17, p=0.0).any() for _ in range(30))


@pytest.mark.parametrize("redraw_area", [False, True], ids=["cutmix", "cutout"])
def test_box_area_and_aspect_law(redraw_area):
    size = 321
    areas, aspects = [], []
    for _ in range(2000):
        box = augment.draw_box(size, size, redraw_area=redraw_area)
        assert box.top >= 0 and box.left >= 0
        assert box.top + box.height <= size and box.left + box.width <= size
        areas.append(box.height * box.width / size**2)
        aspects.append(box.height / box.width)
    # Sides are truncated to ints: at the smallest area (0.02 x 321^2 = 2061 px, sides about 83 x 25)
    # that loses at most 83 + 25 px (area > 0.0185) and moves the aspect to within [0.288, 3.47].
    assert 0.0185 < min(areas) < 0.03 and 0.37 < max(areas) <= 0.4
    assert 0.288 < min(aspects) < 0.35 and 2.9 < max(aspects) < 3.47


def test_box_mask():
    mask = Box(top=1, left=2, height=2, width=3).mask(4, 6)
    expected = torch.zeros(4, 6, dtype=torch.int64)
    expected[1:3, 2:5] = 1
    assert torch.equal(mask, expected)


# ---- photometric ops ----


def test_cutout_fills_only_its_box_with_uniform_values():
    image = torch.full((3, 40, 40), 255, dtype=torch.uint8)
    box = Box(top=5, left=7, height=20, width=24)
    out = reference.cutout(image, box)
    inside = box.mask(40, 40).bool()
    assert (image == 255).all(), "cutout must not modify its input"
    assert (out[:, ~inside] == 255).all()
    values = out[:, inside]
    assert values.max() <= 254 and values.min() < 10 and values.max() > 245
    assert 117 < values.float().mean() < 137
    assert not torch.equal(values[0], values[1]), "values are drawn per channel"


def test_cutout_on_float_images_stays_in_unit_range():
    out = reference.cutout(torch.zeros(2, 3, 16, 16), Box(0, 0, 16, 16))
    assert 0.0 <= out.min() and out.max() <= 254 / 255 and out.std() > 0.2


def test_identity_parameters_leave_the_image_unchanged():
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    params = Photometric(
        Jitter((3, 1, 0, 2), 1.0, 1.0, 1.0, 0.0), grayscale=False, blur_sigma=None, cutout=None
    )
    assert torch.equal(reference.photometric(image, params), image)


def test_grayscale_equalizes_channels_and_ops_accept_batches():
    batch = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    params = Photometric(Jitter((0, 1, 2, 3), 1.3, 0.7, 1.2, 0.1), True, 1.5, Box(2, 2, 5, 5))
    out = reference.photometric(batch, params)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    gray = reference.photometric(batch, Photometric(None, True, None, None))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_draw_photometric_probabilities():
    draws = [augment.draw_photometric(33, 33, cutout=True) for _ in range(1000)]
    share = lambda hit: sum(map(hit, draws)) / len(draws)  # noqa: E731
    assert 0.75 < share(lambda d: d.jitter is not None) < 0.85
    assert 0.16 < share(lambda d: d.grayscale) < 0.24
    assert 0.45 < share(lambda d: d.blur_sigma is not None) < 0.55
    assert 0.45 < share(lambda d: d.cutout is not None) < 0.55
    sigmas = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    jitters = [d.jitter for d in draws if d.jitter is not None]
    assert all(sorted(j.order) == [0, 1, 2, 3] for j in jitters)
    assert all(0.5 <= j.brightness <= 1.5 and -0.25 <= j.hue <= 0.25 for j in jitters)
    assert all(augment.draw_photometric(33, 33, cutout=False).cutout is None for _ in range(50))


# ---- views ----


@pytest.mark.parametrize(
    "views",
    [
        ViewSpec(strong_views=1),
        ViewSpec(strong_views=2),
        ViewSpec(strong_views=2, cutout=True, cutout_view=True),
    ],
    ids=["fixmatch", "unimatch", "mspl"],
)
def test_unlabeled_views_follow_the_view_spec(views):
    out = reference.unlabeled_transform(33, views)(*block_pair(40, 50))
    assert out["weak"].shape == (3, 33, 33)
    assert len(out["strong"]) == len(out["boxes"]) == views.strong_views
    assert all(s.shape == (3, 33, 33) and s.dtype == torch.float32 for s in out["strong"])
    assert all(b.shape == (33, 33) and b.dtype == torch.int64 for b in out["boxes"])
    assert (out["cutout_view"] is not None) == views.cutout_view


def test_cutout_view_quirk_is_unit_range_and_switch_normalizes():
    pair = block_pair(40, 50)
    quirk = ViewSpec(strong_views=2, cutout=True, cutout_view=True)
    fixed = ViewSpec(strong_views=2, cutout=True, cutout_view=True, cutout_view_normalized=True)
    random.seed(3)
    torch.manual_seed(3)
    raw = reference.unlabeled_transform(33, quirk)(*pair)
    random.seed(3)
    torch.manual_seed(3)
    normalized = reference.unlabeled_transform(33, fixed)(*pair)
    assert 0.0 <= raw["cutout_view"].min() and raw["cutout_view"].max() <= 1.0
    assert torch.allclose(normalized["cutout_view"], (raw["cutout_view"] - MEAN) / STD, atol=1e-6)
    assert torch.equal(raw["weak"], normalized["weak"])


def test_strong_views_are_photometric_copies_of_the_weak_view():
    # Strong views share the weak view's geometry: with a constant image they stay constant off cutouts.
    image, mask = Image.new("RGB", (70, 70), (120, 60, 30)), Image.new("L", (70, 70), 1)
    for _ in range(5):
        out = reference.unlabeled_transform(33, ViewSpec(strong_views=2))(image, mask)
        for strong in out["strong"]:
            flat = strong.reshape(3, -1)
            assert (flat.amax(1) - flat.amin(1)).max() < 0.05


def test_eval_transform_keeps_the_whole_image():
    image, mask = block_pair(37, 53)
    out = augment.eval_transform()(image, mask)
    expected_image, expected_mask = tensors(image, mask)
    assert out["image"].shape == (3, 37, 53)
    assert torch.equal(out["mask"], expected_mask)
    assert torch.allclose(unnormalize(out["image"]), expected_image.float(), atol=1e-3)


# ---- collation ----


def test_collate_labeled_shapes():
    transform = reference.labeled_transform(33)
    batch = augment.collate_labeled([transform(*block_pair(40, 50)) for _ in range(3)])
    assert isinstance(batch, LabeledBatch)
    assert batch.image.shape == (3, 3, 33, 33) and batch.image.dtype == torch.float32
    assert batch.mask.shape == (3, 33, 33) and batch.mask.dtype == torch.int64


@pytest.mark.parametrize("cutout_view", [False, True])
def test_collate_unlabeled_shapes(cutout_view):
    views = ViewSpec(strong_views=2, cutout=cutout_view, cutout_view=cutout_view)
    transform = reference.unlabeled_transform(33, views)
    batch = reference.collate_unlabeled([transform(*block_pair(40, 50)) for _ in range(2)])
    assert isinstance(batch, UnlabeledBatch)
    assert batch.weak.shape == (2, 3, 33, 33)
    assert [s.shape for s in batch.strong] == [(2, 3, 33, 33)] * 2
    assert [b.shape for b in batch.boxes] == [(2, 33, 33)] * 2 and batch.boxes[0].dtype == torch.int64
    assert batch.ignore.shape == (2, 33, 33) and batch.ignore.dtype == torch.int64
    if cutout_view:
        assert batch.cutout_view.shape == (2, 3, 33, 33)
    else:
        assert batch.cutout_view is None


@pytest.mark.parametrize("decoded", ["pil", "tensor"])
def test_scale_range_one_keeps_the_pixels(decoded):
    """data.scale_range [1, 1]: no rescale, so every crop is a window of the original pixels (or its
    mirror), on both decoders' geometry."""
    random.seed(3)
    ids = torch.arange(40 * 50).reshape(40, 50)
    image = torch.stack([ids % 256, ids // 256, torch.zeros_like(ids)]).to(torch.uint8)
    mask = (ids % 7).to(torch.uint8)
    for _ in range(10):
        if decoded == "pil":
            pil = Image.fromarray(image.permute(1, 2, 0).numpy()), Image.fromarray(mask.numpy(), mode="L")
            out, out_mask = augment.crop_pair(*pil, 33, reference.IGNORE, (1.0, 1.0))
        else:
            out, out_mask = augment.crop_pair(image, mask, 33, reference.IGNORE, (1.0, 1.0))
        found = out[0].long() + 256 * out[1].long()
        if found[0, 0] > found[0, 1]:
            found, out_mask = found.flip(-1), out_mask.flip(-1)
        top, left = divmod(int(found[0, 0]), 50)
        assert torch.equal(found, ids[top : top + 33, left : left + 33])
        assert torch.equal(out_mask, mask[top : top + 33, left : left + 33].long())
