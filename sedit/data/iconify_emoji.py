"""A richer emoji set: the same ~1,560 concepts drawn in three styles, captioned with concept and style.

    npm install                                            # once, in the repository root (package.json)
    python -m sedit.data.iconify_emoji --out data/iconify  # images -> tiny encoders -> shards

Source: three Iconify icon sets from the npm registry, pinned in ``package.json``:
``@iconify-json/noto`` 1.2.9 (Google's Noto Emoji, Apache-2.0), ``@iconify-json/twemoji`` 1.2.5
(Twemoji, CC BY 4.0) and ``@iconify-json/fluent-emoji-flat`` 1.2.6 (Microsoft's Fluent Emoji, flat,
MIT). Each package's ``icons.json`` holds every emoji as the body of an SVG, keyed by its CLDR short
name in kebab case ("cat-face"); the three sets use the same names, so every name in all three (minus
icons a set marks hidden) is drawn once per style: 1,561 concepts x 3 = 4,683 images with these versions.

Each image is the SVG rendered by resvg (``resvg-py``) at ``SIZE`` px on white, the icon's view box
fitted and centred; its caption names concept and style: "cat face, twemoji style emoji". A model that
follows prompts has to get both right, which the single-style built-in set (``sedit.data.emoji``) cannot
test.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

STYLES = {"noto": "noto", "twemoji": "twemoji", "fluent": "fluent-emoji-flat"}  # caption word -> package
SIZE = 64
DEFAULT_NODE_MODULES = "node_modules"
LICENSES = {"noto": "Apache-2.0", "twemoji": "CC-BY-4.0", "fluent": "MIT"}
ICONIFY_DEFAULT_BOX = 16  # Iconify's default width and height when neither icon nor set gives one


def load_icon_set(node_modules: str | Path, style: str) -> dict:
    """The parsed ``icons.json`` of one style's package."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")
    path = Path(node_modules) / "@iconify-json" / STYLES[style] / "icons.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `npm install` in the repository root (package.json)")
    icon_set = json.loads(path.read_text())
    if not isinstance(icon_set.get("icons"), dict):
        raise ValueError(f"{path}: no 'icons' object; not an Iconify JSON icon set")
    return icon_set


def shared_names(icon_sets: dict[str, dict]) -> list[str]:
    """Names drawn by every set and hidden by none, sorted."""
    visible = [{n for n, icon in s["icons"].items() if not icon.get("hidden")} for s in icon_sets.values()]
    return sorted(set.intersection(*visible))


def icon_svg(icon_set: dict, name: str, size: int = SIZE) -> str:
    """A standalone SVG document of one icon, ``size`` px square, its view box fitted and centred."""
    icon = icon_set["icons"][name]

    def field(key: str, default: float) -> float:
        return icon.get(key, icon_set.get(key, default))

    if any(icon.get(k) for k in ("rotate", "hFlip", "vFlip")):
        raise ValueError(f"icon {name!r}: rotated or flipped icons are not supported")
    left, top = field("left", 0), field("top", 0)
    width, height = field("width", ICONIFY_DEFAULT_BOX), field("height", ICONIFY_DEFAULT_BOX)
    box = f"{left} {top} {width} {height}"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{size}" height="{size}" viewBox="{box}">{icon["body"]}</svg>'
    )


def render(svg: str, size: int = SIZE) -> Image.Image:
    """An SVG document rasterised by resvg on white, as a ``size`` x ``size`` RGB image."""
    import resvg_py

    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, background="#ffffff", width=size, height=size))
    return Image.open(io.BytesIO(png)).convert("RGB")


def caption(name: str, style: str) -> str:
    """'cat-face', 'twemoji' -> 'cat face, twemoji style emoji'."""
    return f"{name.replace('-', ' ')}, {style} style emoji"


def sample_key(name: str, style: str) -> str:
    """'twemoji-cat-face': no dot, since a webdataset key ends at the first one."""
    return f"{style}-{name}"


def materialise(
    out: str | Path,
    node_modules: str | Path = DEFAULT_NODE_MODULES,
    styles: list[str] | None = None,
    size: int = SIZE,
    limit: int | None = None,
) -> dict:
    """Write ``<style>-<name>.png`` + ``.txt`` caption pairs into ``out`` for the first ``limit`` shared
    names (all by default) in every style; return what was written (counts, versions, licenses)."""
    styles = list(styles or STYLES)
    icon_sets = {style: load_icon_set(node_modules, style) for style in styles}
    names = shared_names(icon_sets)[:limit]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        for style, icon_set in icon_sets.items():
            key = sample_key(name, style)
            render(icon_svg(icon_set, name, size), size).save(out / f"{key}.png")
            (out / f"{key}.txt").write_text(caption(name, style) + "\n")
    versions = {}
    for style in styles:
        package = Path(node_modules) / "@iconify-json" / STYLES[style] / "package.json"
        versions[style] = json.loads(package.read_text()).get("version") if package.is_file() else None
    return {
        "concepts": len(names),
        "styles": styles,
        "samples": len(names) * len(styles),
        "size": size,
        "versions": versions,
        "licenses": {style: LICENSES[style] for style in styles},
        "captions": "<concept name>, <style> style emoji",
    }


def build(
    out: str | Path,
    node_modules: str | Path = DEFAULT_NODE_MODULES,
    styles: list[str] | None = None,
    limit: int | None = None,
    vae_steps: int = 700,
    shard_size: int = 256,
    workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Images (``out/images``, reused when ``out/iconify_emoji.json`` records the same styles, limit and
    size, refused when it records others), then the tiny encoders and shards as for the built-in set;
    return the shards' manifest."""
    from sedit.data.builtin import prepare_with_tiny_encoders, require_same_materialisation

    out = Path(out)
    images, info = out / "images", out / "iconify_emoji.json"
    settings = {"styles": list(styles or STYLES), "limit": limit, "size": SIZE}
    if info.is_file():
        require_same_materialisation(info, settings)
    else:
        about = settings | materialise(images, node_modules, settings["styles"], limit=limit)
        info.write_text(json.dumps(about, indent=2) + "\n")
    source = {"kind": "iconify-emoji", "styles": settings["styles"]}
    return prepare_with_tiny_encoders(
        images, out, source, vae_steps, shard_size=shard_size, workers=workers, progress=progress, device=device
    )


def main(argv: list[str] | None = None) -> dict:
    from sedit.data.builtin import builder_arguments

    parser = builder_arguments("python -m sedit.data.iconify_emoji", __doc__, "data/iconify", shard_size=256)
    parser.add_argument("--node-modules", default=DEFAULT_NODE_MODULES, help="where `npm install` put the sets")
    parser.add_argument("--styles", nargs="+", choices=sorted(STYLES), default=None, help="default: all three")
    parser.add_argument("--limit", type=int, default=None, help="only the first N concepts (smoke test)")
    args = parser.parse_args(argv)
    return build(
        args.out, args.node_modules, args.styles, args.limit, args.vae_steps, args.shard_size, args.workers,
        args.device, not args.no_progress,
    )  # fmt: skip


if __name__ == "__main__":
    main()
