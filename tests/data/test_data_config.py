"""DataConfig: the new fields validate and name themselves in errors."""

from __future__ import annotations

import pytest

from megatron_forge.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.format=tfrecord"],
            "data.format='tfrecord' must be one of ['indexed', 'webdataset', 'mock']",
        ),
        (
            ["data.format=webdataset"],
            "data.format=webdataset needs data.train_shards: shard URLs or the manifest "
            "(NAME.json) written by tools/make_webdataset.py",
        ),
        (["data.shuffle_buffer=-1"], "data.shuffle_buffer=-1 must be >= 0"),
        (["data.num_workers=-2"], "data.num_workers=-2 must be >= 0"),
        (
            ["data.blend_per_split={train: [a], eval: [b]}"],
            "data.blend_per_split={'train': ['a'], 'eval': ['b']} must be a mapping with keys "
            "train, valid, test (e.g. {train: [0.7, a, 0.3, b], valid: [c]})",
        ),
        (
            ["data.blend_per_split={valid: [b]}"],
            "data.blend_per_split needs a non-empty 'train' blend",
        ),
        (
            ["data.blend=[a]", "data.blend_per_split={train: [b]}"],
            "data.blend and data.blend_per_split are both set; use blend + split, or "
            "blend_per_split (set data.blend=[])",
        ),
        (
            ["data.blend_per_split={train: [0.5, a, b]}"],
            "data.blend_per_split.train must be [prefix, ...] or [weight, prefix, weight, "
            "prefix, ...]",
        ),
        (["data.blend=[0, a, 0, b]"], "data.blend weights must be >= 0 and not all 0"),
        (["data.train_shards=[1]"], "data.train_shards must be a list of manifest paths or"),
    ],
)
def test_invalid_fields_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)


def test_valid_settings() -> None:
    cfg = load_config(
        None,
        ["data.blend_per_split={train: [0.7, a, 0.3, b], valid: [c], test: [d]}"],
    )
    assert cfg.data.all_prefixes() == ["a", "b", "c", "d"]
    assert cfg.data.split_blend(cfg.data.blend_per_split["train"]) == (["a", "b"], [0.7, 0.3])
    wds = load_config(None, ["data.format=webdataset", "data.train_shards=['pipe:cat x.tar']"])
    assert wds.data.train_shards == ["pipe:cat x.tar"] and wds.data.shuffle_buffer == 1024
