"""LlavaDataset: LLaVA records plus an image folder become Qwen-VL samples, or clear errors."""

import json

import pytest
import qwen_vl_tiny
import torch

import odb
from odb.adapters import qwen_vl

CAT = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
CHAT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hello there"},
    {"from": "gpt", "value": "Hi! How can I help?"},
    {"from": "human", "value": "Compare <image> with <image>."},
    {"from": "gpt", "value": "The first is wider.\nThe second is taller."},
]


@pytest.fixture(scope="module")
def real_tokenizer():
    return qwen_vl_tiny.real_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    qwen_vl_tiny.write_image(str(path / "wide.png"), 120, 60, seed=1)
    qwen_vl_tiny.write_image(str(path / "tall.jpg"), 40, 100, seed=2)
    qwen_vl_tiny.write_image(str(path / "alpha.png"), 30, 30, seed=3, mode="RGBA")
    (path / "broken.png").write_bytes(b"this is not an image")
    full = path / "full.png"
    qwen_vl_tiny.write_image(str(full), 200, 200, seed=4)
    (path / "truncated.png").write_bytes(full.read_bytes()[:300])
    return path


@pytest.fixture(scope="module", params=qwen_vl_tiny.FAMILIES)
def processor(request, real_tokenizer):
    return qwen_vl_tiny.make_processor(request.param, real_tokenizer)


RECORDS = [
    {"image": "wide.png", "conversations": CAT},
    {"image": ["wide.png", "tall.jpg"], "conversations": CHAT},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"image": "alpha.png", "conversations": [dict(CAT[0], value="Describe."), CAT[1]]},
]


def test_samples_follow_the_odb_contract_without_a_batch_dimension(processor, folder):
    dataset = qwen_vl.LlavaDataset(RECORDS, folder, processor)
    patch = qwen_vl.VisionGeometry.from_processor(processor).patch_size
    for index in range(len(dataset)):
        sample = dataset[index]
        size = odb.measure_sample(sample, index)
        assert sample["input_ids"].ndim == 1
        assert sample["mm_token_type_ids"].shape == sample["input_ids"].shape
        named = RECORDS[index].get("image") or []
        images = 1 if isinstance(named, str) else len(named)
        assert size.images == images
        if images:
            grid = sample["image_grid_thw"]
            assert sample["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * patch * patch)
            tokens = int((sample["mm_token_type_ids"] == 1).sum())
            assert tokens == int(grid.prod(-1).sum()) // 4
        else:
            assert "pixel_values" not in sample and "image_grid_thw" not in sample


def test_labels_are_exactly_the_assistant_replies(processor, folder):
    """Decoding the labelled tokens gives back each gpt value and its end-of-turn token."""
    tokenizer = processor.tokenizer
    dataset = qwen_vl.LlavaDataset(RECORDS, folder, processor)
    for index, record in enumerate(RECORDS):
        sample = dataset[index]
        labels, ids = sample["labels"], sample["input_ids"]
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept])
        replies = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        assert tokenizer.decode(ids[kept]) == "".join(r + "<|im_end|>" for r in replies)
        assert not kept[sample["mm_token_type_ids"] != 0].any()


def test_the_chat_template_places_images_where_the_tags_are(processor, folder):
    tokenizer = processor.tokenizer
    dataset = qwen_vl.LlavaDataset(RECORDS, folder, processor)
    text = tokenizer.decode(dataset[1]["input_ids"])
    pad = "<|image_pad|>"
    collapsed = text
    while pad + pad in collapsed:
        collapsed = collapsed.replace(pad + pad, pad)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert collapsed == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        f"<|im_start|>user\nCompare {vision} with {vision}.<|im_end|>\n"
        "<|im_start|>assistant\nThe first is wider.\nThe second is taller.<|im_end|>\n"
    )
    untagged = tokenizer.decode(dataset[3]["input_ids"][:6])
    assert untagged.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")


def test_json_jsonl_and_list_sources_give_the_same_samples(real_tokenizer, folder, tmp_path):
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(RECORDS))
    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    datasets = [
        qwen_vl.LlavaDataset(source, folder, processor)
        for source in (RECORDS, str(json_path), jsonl_path)
    ]
    assert [len(d) for d in datasets] == [len(RECORDS)] * 3
    for index in range(len(RECORDS)):
        first, *others = (d[index] for d in datasets)
        for other in others:
            assert first.keys() == other.keys()
            assert all(torch.equal(first[k], other[k]) for k in first)


def test_a_bad_source_is_a_config_error(real_tokenizer, tmp_path):
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{not json\n')
    with pytest.raises(odb.ConfigError, match="line 2"):
        qwen_vl.LlavaDataset(bad, None, processor)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(RECORDS[0]))
    with pytest.raises(odb.ConfigError, match="JSON list"):
        qwen_vl.LlavaDataset(single, None, processor)


def test_a_processor_without_chat_template_needs_one(real_tokenizer, folder):
    processor = qwen_vl_tiny.make_processor("qwen3_vl", real_tokenizer)
    processor.chat_template = None
    with pytest.raises(odb.ConfigError, match="CHAT_TEMPLATE"):
        qwen_vl.LlavaDataset(RECORDS, folder, processor)
    dataset = qwen_vl.LlavaDataset(RECORDS, folder, processor, chat_template=qwen_vl.CHAT_TEMPLATE)
    assert odb.measure_sample(dataset[0], 0).images == 1


def _error(processor, folder, record, index=2):
    """Build a dataset where ``record`` sits at ``index`` and try both entry points."""
    records = [RECORDS[2]] * index + [record]
    dataset = qwen_vl.LlavaDataset(records, folder, processor)
    errors = []
    for attempt in (dataset.estimate, dataset.__getitem__):
        with pytest.raises(qwen_vl.RecordError) as info:
            attempt(index)
        assert isinstance(info.value, odb.OdbError) and isinstance(info.value, ValueError)
        assert info.value.index == index
        assert str(info.value).startswith(f"record {index}: ")
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    return errors[0]


def test_missing_image_file_is_named(processor, folder):
    error = _error(processor, folder, {"image": ["wide.png", "nope.png"], "conversations": CHAT})
    assert isinstance(error, qwen_vl.MissingImageError)
    assert "nope.png" in str(error) and "not found" in str(error)


@pytest.mark.parametrize("name", ["broken.png", "truncated.png"])
def test_unreadable_image_is_named(processor, folder, name):
    dataset = qwen_vl.LlavaDataset([{"image": name, "conversations": CAT}], folder, processor)
    with pytest.raises(qwen_vl.UnreadableImageError, match=rf"record 0: .*{name}"):
        dataset[0]


def test_fewer_images_than_tags_is_an_error(processor, folder):
    error = _error(processor, folder, {"image": "wide.png", "conversations": CHAT})
    assert isinstance(error, qwen_vl.ImageCountError)
    assert "2 <image> tags but 1 image" in str(error)


def test_more_images_than_tags_is_an_error(processor, folder):
    record = {"image": ["wide.png", "tall.jpg"], "conversations": CAT}
    error = _error(processor, folder, record)
    assert isinstance(error, qwen_vl.ImageCountError)
    assert "2 images but only 1 <image> tag" in str(error)


def test_a_conversation_without_assistant_turn_is_an_error(processor, folder):
    record = {"image": "wide.png", "conversations": CAT[:1]}
    error = _error(processor, folder, record)
    assert isinstance(error, qwen_vl.NoAssistantTurnError)
    assert "no 'gpt'" in str(error)


def test_malformed_turns_and_videos_are_named(processor, folder):
    bad_turn = {"conversations": [{"from": "robot", "value": "hi"}, CAT[1]]}
    assert "turn 0" in str(_error(processor, folder, bad_turn))
    video = {"video": "clip.mp4", "conversations": CAT}
    assert "videos are not supported" in str(_error(processor, folder, video))


def test_errors_keep_their_type_through_dataloader_workers(real_tokenizer, folder):
    """torch re-raises a worker's exception from its message; odb's record errors survive."""
    processor = qwen_vl_tiny.make_processor("qwen2_5_vl", real_tokenizer)
    records = [RECORDS[2], {"image": "nope.png", "conversations": CAT}]
    dataset = qwen_vl.LlavaDataset(records, folder, processor)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=1, sampler=[1], multiprocessing_context="fork"
    )
    with pytest.raises(qwen_vl.MissingImageError, match="record 1: image file not found"):
        next(iter(loader))


def test_a_template_without_the_chatml_header_is_refused(real_tokenizer, folder):
    """Labels are found by the ``<|im_start|>assistant`` header; no header, no silent
    all -100 sample."""
    processor = qwen_vl_tiny.make_processor("qwen2_vl", real_tokenizer)
    template = qwen_vl.CHAT_TEMPLATE.replace("message['role']", "(message['role'] | upper)")
    dataset = qwen_vl.LlavaDataset(RECORDS, folder, processor, chat_template=template)
    for attempt in (dataset.estimate, dataset.__getitem__):
        with pytest.raises(qwen_vl.NoAssistantTurnError, match="record 0: no token carries"):
            attempt(0)


def test_sft_rows_hold_trls_vision_format_and_name_bad_records(processor, folder):
    from PIL import Image

    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    records = [{"image": "wide.png", "conversations": CAT}, {"conversations": text_only}]
    rows = qwen_vl.LlavaDataset(records, folder, processor).sft_rows()
    first, second = rows[0], rows[1]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    user = first["messages"][0]["content"]
    assert [c["type"] for c in user] == ["image", "text"] and user[1]["text"] == "\nWhat is this?"
    with Image.open(folder / "wide.png") as image:
        assert [i.size for i in first["images"]] == [image.size]
    assert second["images"] == [] and second["messages"][1]["content"][0]["text"] == "Hello."
    missing = [{"image": ["nope.png"], "conversations": CAT}]
    with pytest.raises(qwen_vl.MissingImageError, match="record 0: image file not found"):
        qwen_vl.LlavaDataset(missing, folder, processor).sft_rows()


def test_a_text_models_tokenizer_makes_text_samples_and_refuses_images(real_tokenizer, folder):
    """With a tokenizer (a Qwen2 / Qwen3 text model) the samples are the chat template's
    tokens, their labels the assistant replies, their size the estimate; images are an error of
    their record."""
    text = [CHAT[0], CHAT[1], CHAT[2]]
    records = [{"conversations": text}, {"image": "wide.png", "conversations": CAT}]
    tokenizer = qwen_vl_tiny.load_tokenizer(qwen_vl_tiny.real_tokenizer_dir())
    dataset = qwen_vl.LlavaDataset(records, folder, tokenizer, chat_template=qwen_vl.CHAT_TEMPLATE)
    sample = dataset[0]
    rendered = tokenizer.apply_chat_template(
        [
            {"role": r, "content": [{"type": "text", "text": v}]}
            for r, v in (
                ("system", "Be brief."),
                ("user", "Hello there"),
                ("assistant", "Hi! How can I help?"),
            )
        ],
        chat_template=qwen_vl.CHAT_TEMPLATE,
        tokenize=False,
    )
    assert sample["input_ids"].tolist() == tokenizer(rendered)["input_ids"]
    assert set(sample) == {"input_ids", "labels", "attention_mask"}
    reply = tokenizer("Hi! How can I help?<|im_end|>", add_special_tokens=False)["input_ids"]
    assert sample["labels"][sample["labels"] != -100].tolist() == reply
    size = dataset.estimate(0)
    assert (size.length, size.vision_patches, size.images) == (len(sample["input_ids"]), 0, 0)
    with pytest.raises(qwen_vl.RecordError, match="image\\(s\\) for a text model"):
        dataset[1]
    sizes, failures = dataset.estimate_checked()
    assert sizes[1] is None and type(failures[0]) is qwen_vl.RecordError
