"""Padded and packed batches of the same Qwen-VL samples train identically (tiny models)."""

import pickle
import warnings

import pytest
import qwen_vl_tiny
import torch
import transformers

import odb
from odb.adapters import qwen_vl

SIZES = {"a": (224, 168), "b": (56, 112), "c": (140, 140), "d": (28, 84), "e": (100, 30)}


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


TEXT = [
    {"conversations": _turns("What is two plus two?", "Four.")},
    {
        "conversations": _turns("Name three colours.", "Red, green and blue.")
        + _turns("And a fourth?", "Yellow, which is not a primary colour of light.")
    },
    {"conversations": _turns("Hi", "Hello! How can I help you today?")},
]
ONE_IMAGE = [
    {"image": "a.png", "conversations": _turns("<image>\nDescribe it.", "Noise, mostly.")},
    {"image": "b.png", "conversations": _turns("What colour is <image>?", "Grey.")},
    {"image": "d.png", "conversations": _turns("<image> Is it tall?", "Yes, quite tall.")},
]
SEVERAL = [
    {
        "image": ["a.png", "c.png", "e.png"],
        "conversations": _turns("<image><image>Which differs from <image>?", "The third one.")
        + _turns("Why?", "It is wider."),
    },
    {"image": ["b.png", "d.png"], "conversations": _turns("<image> vs <image>", "Same height.")},
]
MANY_AND_TEXT = [
    TEXT[0],
    {
        "image": ["a.png", "b.png", "c.png", "d.png", "e.png", "a.png"],
        "conversations": _turns("Six: " + "<image>" * 6, "Six noisy images, two identical."),
    },
    TEXT[1],
    ONE_IMAGE[1],
    TEXT[2],
]
SCENARIOS = {
    "text_only": TEXT,
    "one_image": ONE_IMAGE,
    "several_images": SEVERAL,
    "many_images_with_text_only": MANY_AND_TEXT,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing_images")
    for number, (name, size) in enumerate(SIZES.items()):
        qwen_vl_tiny.write_image(str(path / f"{name}.png"), *size, seed=number)
    return path


def _processor(family, tokenizer):
    """At most 4x4 merged tokens (8x8 patches) per image: float64 vision towers are slow."""
    factor = 2 * qwen_vl_tiny.CHECKPOINT_IMAGE_SETTINGS[family]["patch_size"]  # one token
    return qwen_vl_tiny.make_processor(
        family, tokenizer, min_pixels=4 * factor * factor, max_pixels=16 * factor * factor
    )


def _samples(family, tokenizer, folder, records):
    dataset = qwen_vl.LlavaDataset(records, folder, _processor(family, tokenizer))
    return [dataset[i] for i in range(len(dataset))]


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled targets, row by row, in float64."""
    logits = logits[:, :-1].to(torch.float64)
    targets = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )


def _run(model, batch: dict):
    """(HF mean loss, our float64 summed loss, gradients of the summed loss)."""
    model.zero_grad()
    labels = batch["labels"]
    output = model(**batch)
    loss_sum = _token_loss_sum(output.logits, labels)
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), loss_sum.detach(), grads


def _assert_same(padded, packed):
    hf_padded, sum_padded, grads_padded = padded
    hf_packed, sum_packed, grads_packed = packed
    torch.testing.assert_close(hf_packed, hf_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(sum_packed, sum_padded, rtol=1e-10, atol=1e-10)
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_padded_and_packed_batches_give_the_same_loss_and_gradients(
    family, scenario, small_tokenizer, folder
):
    samples = _samples(family, small_tokenizer, folder, SCENARIOS[scenario])
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    padded = qwen_vl.collator(model, "padded")(samples)
    packed = qwen_vl.collator(model, "packed")(samples)
    assert packed["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
    assert packed["position_ids"].shape == (4, 1, packed["input_ids"].shape[1])
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert padded["input_ids"].shape[0] == len(samples)
    _assert_same(_run(model, padded), _run(model, packed))


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_samples_labelled_from_their_first_token_do_not_learn_across_boundaries(
    family, small_tokenizer, folder
):
    """Chat samples start with an unlabelled ``<|im_start|>``; these label every text token,
    so only the -100 the packed row puts at each boundary keeps the targets equal."""
    samples = _samples(family, small_tokenizer, folder, MANY_AND_TEXT)
    for sample in samples:
        text = sample["mm_token_type_ids"] == 0
        sample["labels"] = torch.where(text, sample["input_ids"], -100)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    padded = qwen_vl.collator(model, "padded")(samples)
    packed = qwen_vl.collator(model, "packed")(samples)
    _assert_same(_run(model, padded), _run(model, packed))


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_eager_attention_packs_the_same_way(family, small_tokenizer, folder):
    samples = _samples(family, small_tokenizer, folder, MANY_AND_TEXT)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer, attn="eager").train()
    padded = qwen_vl.collator(model, "padded")(samples)
    packed = qwen_vl.collator(model, "packed")(samples)
    _assert_same(_run(model, padded), _run(model, packed))


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_three_position_rows_or_a_cache_let_samples_attend_to_each_other(
    family, small_tokenizer, folder
):
    """What the docs claim about transformers: the packed mask needs row 0 and no cache."""
    samples = _samples(family, small_tokenizer, folder, MANY_AND_TEXT)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    assert model.config.text_config.use_cache  # the default, also in training mode
    packed = qwen_vl.collator(model, "packed")(samples)
    _, reference, _ = _run(model, qwen_vl.collator(model, "padded")(samples))
    three_rows = {**packed, "position_ids": packed["position_ids"][1:]}
    cached = {key: value for key, value in packed.items() if key != "use_cache"}
    for broken in (three_rows, cached):
        _, loss, _ = _run(model, broken)
        assert abs(loss - reference) > 1e-6 * abs(reference)  # equal ones agree to 1e-10


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_position_rows_are_the_models_own_positions_of_each_sample(family, small_tokenizer, folder):
    """Rows 1-3 equal what the model's get_rope_index gives each row of the padded batch;
    row 0 counts 0, 1, ... within each sample."""
    samples = _samples(family, small_tokenizer, folder, MANY_AND_TEXT)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer)
    padded = qwen_vl.collator(model, "padded")(samples)
    expected, _ = model.model.get_rope_index(
        padded["input_ids"],
        mm_token_type_ids=padded["mm_token_type_ids"],
        image_grid_thw=padded["image_grid_thw"],
        attention_mask=padded["attention_mask"],
    )
    mask = padded["attention_mask"].bool()
    packed = qwen_vl.collator(model, "packed")(samples)
    rows = packed["position_ids"][:, 0]
    torch.testing.assert_close(rows[1:], expected[:, mask], rtol=0, atol=0)
    text = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])
    torch.testing.assert_close(rows[0], text, rtol=0, atol=0)
    assert rows[1:].ne(rows[0]).any()  # images do move the 3-D positions


def test_a_config_is_enough_and_the_collator_pickles(small_tokenizer, folder):
    config = qwen_vl_tiny.tiny_config("qwen2_5_vl", small_tokenizer)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    samples = _samples("qwen2_5_vl", small_tokenizer, folder, SEVERAL + TEXT[:1])
    from_model = qwen_vl.collator(model, "packed")(samples)
    from_config = qwen_vl.collator(config, "packed")
    clone = pickle.loads(pickle.dumps(from_config))
    for collate in (from_config, clone):
        batch = collate(samples)
        assert batch.keys() == from_model.keys()
        for key, value in from_model.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(batch[key], value), key


def test_samples_without_token_types_get_them_from_the_ids(small_tokenizer, folder):
    samples = _samples("qwen3_vl", small_tokenizer, folder, ONE_IMAGE)
    config = qwen_vl_tiny.tiny_config("qwen3_vl", small_tokenizer)
    collate = qwen_vl.collator(config, "packed")
    stripped = [{k: v for k, v in s.items() if k != "mm_token_type_ids"} for s in samples]
    expected, rebuilt = collate(samples), collate(stripped)
    for key in ("mm_token_type_ids", "position_ids", "input_ids", "labels"):
        assert torch.equal(rebuilt[key], expected[key]), key


def _text_config(model_type: str):
    settings = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if model_type == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **settings)
    return transformers.Qwen2Config(**settings)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_text_models_use_the_core_collators(model_type):
    config = _text_config(model_type)
    assert type(qwen_vl.collator(config, "packed")) is odb.PackedCollator
    assert type(qwen_vl.collator(config, "padded")) is odb.PaddedCollator
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).train()
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (13, 4, 9):
        ids = torch.randint(0, 97, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 2] = -100
        samples.append({"input_ids": ids, "labels": labels})
    padded = qwen_vl.collator(config, "padded")(samples)
    packed = {**qwen_vl.collator(config, "packed")(samples), "use_cache": False}
    _assert_same(_run(model, padded), _run(model, packed))


def test_collator_refuses_what_it_cannot_pack(small_tokenizer):
    config = qwen_vl_tiny.tiny_config("qwen2_vl", small_tokenizer)
    with pytest.raises(odb.ConfigError, match="mode"):
        qwen_vl.collator(config, "ragged")
    with pytest.raises(odb.ConfigError, match="padded batches only"):
        qwen_vl.collator(config, "packed", pad_to_multiple_of=8)
    with pytest.raises(odb.ConfigError, match="llava"):
        qwen_vl.collator(transformers.LlavaConfig(), "packed")
    padded = qwen_vl.collator(config, "padded", pad_to_multiple_of=8)
    assert isinstance(padded, odb.PaddedCollator) and padded.pad_to_multiple_of == 8


def test_flash_attention_arguments_are_for_text_models_only(small_tokenizer):
    config = qwen_vl_tiny.tiny_config("qwen3_vl", small_tokenizer)
    with pytest.raises(odb.ConfigError, match="vision tower"):
        qwen_vl.collator(config, "packed", flash_attn_kwargs=True)
    text = qwen_vl.collator(_text_config("qwen2"), "packed", flash_attn_kwargs=True)
    batch = text([{"input_ids": torch.arange(3)}, {"input_ids": torch.arange(2)}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]


def test_a_wrapped_model_is_unwrapped(small_tokenizer, folder):
    """DistributedDataParallel-style wrappers hide the config behind ``.module``."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    config = qwen_vl_tiny.tiny_config("qwen2_vl", small_tokenizer)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    samples = _samples("qwen2_vl", small_tokenizer, folder, ONE_IMAGE[:2])
    wrapped = qwen_vl.collator(Wrapper(model), "packed")(samples)
    direct = qwen_vl.collator(model, "packed")(samples)
    assert torch.equal(wrapped["position_ids"], direct["position_ids"])
    with pytest.raises(odb.ConfigError, match="transformers model or config"):
        qwen_vl.collator(torch.nn.Linear(2, 2), "packed")


def test_packing_without_a_varlen_kernel_warns_about_the_dense_mask():
    config = _text_config("qwen2")
    config._attn_implementation = "sdpa"
    with pytest.warns(UserWarning, match="dense row-by-row mask"):
        qwen_vl.collator(config, "packed")
    config._attn_implementation = "flash_attention_2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwen_vl.collator(config, "packed")
        qwen_vl.collator(config, "padded")


def test_the_qwen_vl_collators_set_the_loaders_mode_and_refuse_the_other(small_tokenizer):
    """The issue's case: a padded Qwen-VL collator under mode="packed" emitted (10, 253)
    batches, 2530 computed tokens against a 2048 budget; now the layout comes from the
    collator, and a mode that contradicts it is refused."""
    config = qwen_vl_tiny.tiny_config("qwen2_5_vl", small_tokenizer)
    dataset = [{"input_ids": torch.arange(5)}]
    for mode in ("padded", "packed"):
        loader = odb.DataLoader(dataset, 2048, collate_fn=qwen_vl.collator(config, mode))
        assert loader.mode == mode
    with pytest.raises(odb.ConfigError, match="mode='packed' but the collate_fn"):
        odb.DataLoader(dataset, 2048, mode="packed", collate_fn=qwen_vl.collator(config, "padded"))


def _vision_grads(grads: dict) -> dict:
    return {name: grad for name, grad in grads.items() if ".visual." in f".{name}"}


@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_the_vision_placeholder_runs_the_vision_tower_and_changes_no_loss(
    family, mode, small_tokenizer, folder
):
    """A text-only batch with the placeholder appended: the vision tower runs (its weights get
    gradients, as FSDP needs every rank to gather them), and the loss and every gradient are
    those of the batch without it (the vision tower's are exactly 0)."""
    samples = _samples(family, small_tokenizer, folder, TEXT)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    collate = qwen_vl.collator(model, mode)
    placeholder = collate.vision_placeholder
    plain, batch = collate(samples), collate([*samples, placeholder])
    assert "image_grid_thw" not in plain
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    lengths = [len(s["input_ids"]) for s in samples]
    if mode == "padded":  # in the last row's padding: no row and no column added
        assert lengths[-1] + 1 <= max(lengths)
        assert batch["input_ids"].shape == plain["input_ids"].shape
    else:
        assert batch["input_ids"].shape == (1, sum(lengths) + 1)
    hf, loss, grads = _run(model, plain)
    hf_with, loss_with, grads_with = _run(model, batch)
    torch.testing.assert_close(loss_with, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(hf_with, hf, rtol=1e-12, atol=0)
    vision = _vision_grads(grads_with)
    assert vision and not _vision_grads(grads)
    assert grads_with.keys() - vision.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_with[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    assert all(not grad.any() for grad in vision.values())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_placeholder_after_the_widest_row_adds_columns_not_rows(family, small_tokenizer, folder):
    samples = _samples(family, small_tokenizer, folder, TEXT[:1])
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    collate = qwen_vl.collator(model, "padded")
    batch = collate([*samples, collate.vision_placeholder])
    length = len(samples[0]["input_ids"])
    assert batch["input_ids"].shape == (1, length + 1)
    assert batch["attention_mask"][0].tolist() == [1] * (length + 1)
    assert batch["labels"][0, -1] == -100
    _, loss, _ = _run(model, collate(samples))
    _, loss_with, grads = _run(model, batch)
    torch.testing.assert_close(loss_with, loss, rtol=1e-12, atol=0)
    assert _vision_grads(grads)


def test_the_placeholder_is_recognised_through_the_trainers_column_removal(small_tokenizer, folder):
    """The Trainer's wrapper copies every sample into a new dict; the tensor that marks the
    placeholder survives, so it still lands in the last row's padding."""
    from transformers.trainer_utils import RemoveColumnsCollator

    samples = _samples("qwen2_5_vl", small_tokenizer, folder, TEXT)
    samples = [{**s, "source": torch.tensor(7)} for s in samples]  # a column the model lacks
    collate = qwen_vl.collator(qwen_vl_tiny.tiny_config("qwen2_5_vl", small_tokenizer), "padded")
    columns = ["input_ids", "labels", "attention_mask", "mm_token_type_ids", "pixel_values"]
    wrapped = RemoveColumnsCollator(collate, [*columns, "image_grid_thw"])
    assert odb.collate.collator_placeholder(wrapped) is collate.vision_placeholder
    batch = wrapped([*samples, collate.vision_placeholder])
    assert batch["input_ids"].shape[0] == len(samples) and "source" not in batch
    assert (batch["input_ids"] == collate.vision_placeholder["input_ids"][0]).sum() == 1
