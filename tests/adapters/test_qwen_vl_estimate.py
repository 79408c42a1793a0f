"""LlavaDataset.estimate predicts the processed sample exactly, from image headers and text."""

import os

import numpy as np
import pytest
import qwen_vl_tiny
import qwen_vl_utils
from PIL import Image, ImageFile

import odb
from odb.adapters import qwen_vl
from odb.estimate import count_steps

# (width, height): tiny, square-ish, extreme aspect ratios (up to 200:1), and big photos.
FIXED_SIZES = [
    (1, 1),
    (3, 7),
    (10, 10),
    (13, 27),
    (27, 29),
    (28, 28),
    (29, 57),
    (56, 55),
    (150, 1),
    (1, 150),
    (399, 2),
    (2, 399),
    (4000, 20),
    (25, 4000),
    (640, 480),
    (480, 640),
    (1024, 1024),
    (4000, 3000),
    (3000, 4000),
]


def _random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(np.log(8), np.log(900), (count, 2))).astype(int)
    return [(int(w), int(h)) for w, h in sides if max(w, h) / min(w, h) < 200]


@pytest.fixture(scope="module")
def real_tokenizer():
    return qwen_vl_tiny.real_tokenizer()


SIZES = FIXED_SIZES + _random_sizes(100, seed=7)

# Conversations with image slots ({images} tags); answers exercise multi-turn, unicode, leading
# newlines and an image given without a tag.
TEXTS = [
    [("human", "<image>\nDescribe the image."), ("gpt", "A photo.")],
    [("human", "What is in <image>? Answer briefly."), ("gpt", "Nothing much.\nSecond line.")],
    [
        ("human", "Look: <image>"),
        ("gpt", "ok"),
        ("human", "and now?"),
        ("gpt", "still ok, nothing changed"),
    ],
    [("human", "Что это? 这是什么？<image> 🐈"), ("gpt", "猫です。")],
    [("human", "<image>"), ("gpt", "\nStarts with a newline  ")],
    [("human", "No tag here, the image goes first."), ("gpt", "Fine.")],
    [
        ("system", "You are terse."),
        ("human", "<image> " + "Long question about many things. " * 12),
        ("gpt", "Short answer. " * 30),
    ],
]

# Processor settings besides each checkpoint's own: a tight pixel range (Qwen's documented
# 256..1280 tokens), so both the upscale and the downscale branches run on small files.
TIGHT = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}


def _name(size):
    return f"{size[0]}x{size[1]}.png"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sizes")
    for number, size in enumerate(SIZES):
        qwen_vl_tiny.write_image(str(folder / _name(size)), *size, seed=number)
    return str(folder)


def _records(sizes, offset: int) -> list[dict]:
    """One record per size, cycling through the texts; every 9th gets 3 images, every 13th
    none."""
    records = []
    for k, size in enumerate(sizes):
        turns = TEXTS[(k + offset) % len(TEXTS)]
        images = [_name(size)]
        if k % 9 == 4:
            images += [_name(sizes[(k + 1) % len(sizes)]), _name(sizes[(k + 2) % len(sizes)])]
        if k % 13 == 6:
            images = []
        tags = sum(value.count("<image>") for _, value in turns)
        conversation = []
        for role, value in turns:
            if tags and len(images) != 1 and "<image>" in value:
                value = value.replace("<image>", "<image>" * len(images), 1)
            if not images:
                value = value.replace("<image>", "")
            conversation.append({"from": role, "value": value})
        record = {"conversations": conversation}
        if images:
            record["image"] = images if len(images) > 1 else images[0]
        records.append(record)
    return records


def _mismatches(dataset) -> list[str]:
    found = []
    for index in range(len(dataset)):
        actual = odb.measure_sample(dataset[index], index)
        predicted = dataset.estimate(index)
        if predicted != actual:
            found.append(f"record {index} {dataset.records[index]}: {predicted} != {actual}")
    return found


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_estimate_equals_the_processed_sample_over_many_sizes_and_texts(
    family, real_tokenizer, image_folder
):
    """Over 200 (image size, text) combinations per family, with the real Qwen tokenizer:
    the checkpoint's pixel range on images up to 1024 px, and a tight range on all sizes."""
    small_sizes = [s for s in SIZES if max(s) <= 1024]
    checkpoint = qwen_vl_tiny.make_processor(family, real_tokenizer)
    tight = qwen_vl_tiny.make_processor(family, real_tokenizer, **TIGHT)
    combos = 0
    for processor, sizes, offset in ((checkpoint, small_sizes, 0), (tight, SIZES, 3)):
        dataset = qwen_vl.LlavaDataset(_records(sizes, offset), image_folder, processor)
        assert _mismatches(dataset) == []
        combos += len(dataset)
    assert combos >= 200


@pytest.mark.slow
@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_estimate_equals_the_processed_sample_for_4000x3000_photos(
    family, real_tokenizer, image_folder
):
    """At the checkpoints' own pixel range, 12 megapixels are not downscaled: ~15k tokens."""
    processor = qwen_vl_tiny.make_processor(family, real_tokenizer)
    records = _records([(4000, 3000), (3000, 4000)], offset=0)
    dataset = qwen_vl.LlavaDataset(records, image_folder, processor)
    assert _mismatches(dataset) == []
    assert dataset.estimate(0).length > 10_000


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_geometry_is_read_from_the_processor(family, real_tokenizer):
    processor = qwen_vl_tiny.make_processor(
        family, real_tokenizer, min_pixels=1234, max_pixels=567_890
    )
    geometry = qwen_vl.VisionGeometry.from_processor(processor)
    patch = qwen_vl_tiny.CHECKPOINT_IMAGE_SETTINGS[family]["patch_size"]
    assert geometry == qwen_vl.VisionGeometry(patch, 2, 1234, 567_890)


def test_estimate_decodes_no_pixels(real_tokenizer, image_folder, monkeypatch):
    """The estimate reads headers only: with pixel loading disabled it still works."""
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    records = _records([(640, 480), (3000, 4000)], offset=0)
    dataset = qwen_vl.LlavaDataset(records, image_folder, processor)
    expected = [odb.measure_sample(dataset[i], i) for i in range(len(dataset))]

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert [dataset.estimate(i) for i in range(len(dataset))] == expected
    with pytest.raises(AssertionError, match="pixels were decoded"):
        dataset[0]  # the same patch does stop real processing


def test_an_aspect_ratio_over_200_is_refused_before_decoding(real_tokenizer, tmp_path):
    qwen_vl_tiny.write_image(str(tmp_path / "strip.png"), 402, 2)
    processor = qwen_vl_tiny.make_processor("qwen2_5_vl", real_tokenizer)
    records = [
        {
            "image": "strip.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
        }
    ]
    dataset = qwen_vl.LlavaDataset(records, str(tmp_path), processor)
    for attempt in (dataset.estimate, dataset.__getitem__):
        with pytest.raises(qwen_vl.UnreadableImageError, match=r"record 0: .*strip\.png.*200"):
            attempt(0)


def test_budget_check_happens_before_the_image_is_decoded(
    real_tokenizer, image_folder, monkeypatch
):
    processor = qwen_vl_tiny.make_processor("qwen3_vl", real_tokenizer)
    records = _records([(1024, 1024), (10, 10)], offset=0)
    sizes = [qwen_vl.LlavaDataset(records, image_folder, processor).estimate(i) for i in range(2)]
    limit = (sizes[0].length + sizes[1].length) // 2
    assert sizes[1].length <= limit < sizes[0].length
    dataset = qwen_vl.LlavaDataset(records, image_folder, processor, budget=limit)
    decoded = []
    original = qwen_vl_utils.fetch_image

    def counting(*args, **kwargs):
        decoded.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(qwen_vl_utils, "fetch_image", counting)
    with pytest.raises(qwen_vl.RecordTooLongError, match=rf"record 0: length {sizes[0].length}"):
        dataset[0]
    assert decoded == []
    assert odb.measure_sample(dataset[1], 1) == sizes[1]
    assert len(decoded) == 1
    caps = odb.Budget(10**6, caps=odb.Caps(max_vision_patches=sizes[0].vision_patches - 1))
    capped = qwen_vl.LlavaDataset(records, image_folder, processor, budget=caps)
    with pytest.raises(qwen_vl.RecordTooLongError, match="max_vision_patches"):
        capped[0]


def test_estimate_all_matches_estimate_and_select_keeps_the_records(real_tokenizer, image_folder):
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer, **TIGHT)
    dataset = qwen_vl.LlavaDataset(_records(SIZES[:20], offset=1), image_folder, processor)
    sizes = dataset.estimate_all(workers=4)
    assert sizes == [dataset.estimate(i) for i in range(len(dataset))]
    keep = [i for i, size in enumerate(sizes) if size.length <= 400]
    assert 0 < len(keep) < len(dataset)
    subset = dataset.select(keep)
    assert [subset.estimate(j) for j in range(len(subset))] == [sizes[i] for i in keep]


def test_images_folder_is_optional_for_absolute_paths(real_tokenizer, image_folder):
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    record = _records([(56, 55)], offset=0)[0]
    record["image"] = os.path.join(image_folder, record["image"])
    dataset = qwen_vl.LlavaDataset([record], None, processor)
    assert dataset.estimate(0) == odb.measure_sample(dataset[0], 0)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_count_steps_from_the_estimates_equals_the_loaders_batches(
    mode, real_tokenizer, image_folder
):
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer, **TIGHT)
    small = [s for s in SIZES if max(s) <= 200][:24]
    dataset = qwen_vl.LlavaDataset(_records(small, offset=2), image_folder, processor)
    sizes = dataset.estimate_all()
    options = {"mode": mode, "shuffle": True, "seed": 5, "window": 12, "max_images": 4}
    budget = 2 * max(size.length for size in sizes)
    loader = odb.DataLoader(dataset, budget, collate_fn=lambda samples: {}, **options)
    for epoch in range(2):
        loader.set_epoch(epoch)
        steps = sum(1 for _ in loader)
        assert steps > 3
        assert count_steps(loader, sizes, epoch) == steps


def test_the_estimate_follows_qwen_vl_utils_where_transformers_resizes_differently(
    real_tokenizer, image_folder
):
    """A 150x1 strip: qwen-vl-utils first rounds its 1-pixel side up to 28 (max(factor, ...)),
    transformers' rule alone would upscale it 5x more. The sample has qwen-vl-utils' grid."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    dataset = qwen_vl.LlavaDataset(_records([(150, 1)], offset=0), image_folder, processor)
    grid = dataset[0]["image_grid_thw"].tolist()
    assert grid == [[1, 2, 10]]  # 28x140 pixels
    height, width = smart_resize(1, 150, 28, 56 * 56, 28 * 28 * 16384)
    assert [[1, height // 14, width // 14]] != grid
    assert dataset.estimate(0).vision_patches == 20
