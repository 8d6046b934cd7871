"""The three-style emoji set from the npm icon packages (`npm install` in the repository root; .ci/run does it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import read_shard

from sedit.data import iconify_emoji as ie


@pytest.fixture(scope="module")
def icon_sets():
    return {style: ie.load_icon_set(ie.DEFAULT_NODE_MODULES, style) for style in ie.STYLES}


def test_the_pinned_sets_share_the_documented_concepts(icon_sets):
    names = ie.shared_names(icon_sets)
    assert len(names) == 1561  # the module docstring's count for the versions package.json pins
    assert {"cat-face", "red-apple", "rocket"} <= set(names)
    hidden = {n for s in icon_sets.values() for n, icon in s["icons"].items() if icon.get("hidden")}
    assert hidden and not hidden & set(names)


def test_captions_name_concept_and_style_and_keys_have_no_dot():
    assert ie.caption("cat-face", "twemoji") == "cat face, twemoji style emoji"
    assert ie.sample_key("1st-place-medal", "fluent") == "fluent-1st-place-medal"


def test_the_three_styles_render_the_same_concept_differently(icon_sets):
    pictures = {
        style: np.asarray(ie.render(ie.icon_svg(s, "cat-face"))).astype(float) for style, s in icon_sets.items()
    }
    for picture in pictures.values():
        assert picture.shape == (ie.SIZE, ie.SIZE, 3)
        assert (picture[0, 0] == 255).all() and (picture[-1, -1] == 255).all()  # white canvas at the corners
        centre = picture[24:40, 24:40]
        assert (centre < 250).any(axis=-1).mean() > 0.5  # the drawing covers the centre
    styles = list(pictures)
    for i, a in enumerate(styles):
        for b in styles[i + 1 :]:
            assert np.abs(pictures[a] - pictures[b]).mean() > 5, (a, b)


def test_icon_svg_uses_the_icons_own_view_box_and_refuses_transforms():
    icon_set = {
        "width": 36,
        "height": 36,
        "icons": {"wide": {"body": "<g/>", "height": 25.22}, "flip": {"body": "", "hFlip": True}},
    }
    assert 'viewBox="0 0 36 25.22"' in ie.icon_svg(icon_set, "wide", 64)
    assert 'width="64" height="64"' in ie.icon_svg(icon_set, "wide", 64)
    with pytest.raises(ValueError, match="'flip'"):
        ie.icon_svg(icon_set, "flip")


def test_a_missing_package_is_named_with_the_command_that_installs_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"twemoji/icons.json: not found; run `npm install`"):
        ie.load_icon_set(tmp_path, "twemoji")
    with pytest.raises(ValueError, match="unknown style 'sketch'"):
        ie.load_icon_set(tmp_path, "sketch")


def test_build_writes_every_style_of_each_concept_into_shards(tmp_path):
    manifest = ie.build(tmp_path, limit=4, vae_steps=2, shard_size=6, progress=False)
    assert manifest["samples"] == 12 and manifest["resolutions"] == [32, 64]
    assert manifest["source"] == {"kind": "iconify-emoji", "styles": ["noto", "twemoji", "fluent"]}
    about = json.loads((tmp_path / "iconify_emoji.json").read_text())
    assert about["concepts"] == 4 and about["samples"] == 12
    assert about["versions"] == {"noto": "1.2.9", "twemoji": "1.2.5", "fluent": "1.2.6"}
    captions = {}
    for shard in sorted((tmp_path / "shards").glob("shard-*.tar")):
        captions |= {key: members["txt"].decode() for key, members in read_shard(shard).items()}
    assert len(captions) == 12
    for key, text in captions.items():
        style, name = key.split("-", 1)
        assert text == ie.caption(name, style)
    assert ie.build(tmp_path, limit=4, vae_steps=2, shard_size=6, progress=False)["samples"] == 12  # reused
    with pytest.raises(ValueError, match="another materialisation"):
        ie.build(tmp_path, limit=5, progress=False)
    with pytest.raises(ValueError, match="another materialisation"):
        ie.build(tmp_path, styles=["noto"], limit=4, progress=False)
