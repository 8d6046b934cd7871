"""The built-in image-caption set: Noto Color Emoji glyphs, captioned with their Unicode names.

Source: ``NotoColorEmoji.ttf`` from the Debian package ``fonts-noto-color-emoji`` (2.042-0+deb12u1;
Google's Noto Emoji, font licensed under the SIL Open Font License 1.1). Each sample is one
single-code-point emoji that the font maps, drawn in colour on white (136x136 px) and captioned with
its lower-cased Unicode character name from Python's ``unicodedata`` ("red apple", "grinning face").

Kept: code points the font's cmap maps, that have a Unicode name, minus the pieces that are not
pictures on their own (ASCII keycap bases, ZWJ, variation selectors, the keycap combiner, regional
indicator letters, skin-tone modifiers, tag characters, private-use glyphs) and minus the 20 emoji added
in Unicode 15.0, which Python 3.11's Unicode 14.0 tables cannot name (excluded by list so that every
Python version yields the same set). Multi-code-point sequences (flags, ZWJ families, skin tones) are
not included. With font 2.042 that leaves ``BUILTIN_SAMPLES`` = 1361 emoji.
"""

from __future__ import annotations

import struct
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian: fonts-noto-color-emoji
BUILTIN_SAMPLES = 1361  # with NotoColorEmoji.ttf 2.042 (Debian 2.042-0+deb12u1)
BITMAP_SIZE = 109  # the one pixel size of the font's CBDT colour bitmaps (136 x 128 glyphs)
CANVAS = 136

NOT_PICTURES = [
    (0x0000, 0x007F),  # ASCII: keycap bases (digits, #, *) and space
    (0x200D, 0x200D),  # zero width joiner
    (0x20E3, 0x20E3),  # combining enclosing keycap
    (0xE000, 0xF8FF),  # private use
    (0xFE00, 0xFE0F),  # variation selectors
    (0x1F1E6, 0x1F1FF),  # regional indicator letters (flags are pairs of them)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0xE0000, 0xE007F),  # tags (subdivision flags)
    (0xF0000, 0x10FFFF),  # supplementary private use
]
UNICODE_15 = {
    0x1F6DC, 0x1FA75, 0x1FA76, 0x1FA77, 0x1FA87, 0x1FA88, 0x1FAAD, 0x1FAAE, 0x1FAAF, 0x1FABB,
    0x1FABC, 0x1FABD, 0x1FABF, 0x1FACE, 0x1FACF, 0x1FADA, 0x1FADB, 0x1FAE8, 0x1FAF7, 0x1FAF8,
}  # fmt: skip


def font_codepoints(path: str | Path) -> set[int]:
    """Code points mapped by a TrueType font's cmap (format 12 and format 4 subtables)."""
    data = Path(path).read_bytes()
    (num_tables,) = struct.unpack_from(">H", data, 4)
    tables = {}
    for i in range(num_tables):
        tag, _, offset, _ = struct.unpack_from(">4sIII", data, 12 + 16 * i)
        tables[tag] = offset
    if b"cmap" not in tables:
        raise ValueError(f"{path}: no cmap table")
    cmap = tables[b"cmap"]
    (count,) = struct.unpack_from(">H", data, cmap + 2)
    found: set[int] = set()
    for i in range(count):
        _, _, sub = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        base = cmap + sub
        (fmt,) = struct.unpack_from(">H", data, base)
        if fmt == 12:  # groups of (first, last, glyph)
            (groups,) = struct.unpack_from(">I", data, base + 12)
            for g in range(groups):
                first, last, _ = struct.unpack_from(">III", data, base + 16 + 12 * g)
                found.update(range(first, last + 1))
        elif fmt == 4:  # segments of (end, start, ...); 0xFFFF closes the table
            (seg2,) = struct.unpack_from(">H", data, base + 6)
            ends = struct.unpack_from(f">{seg2 // 2}H", data, base + 14)
            starts = struct.unpack_from(f">{seg2 // 2}H", data, base + 16 + seg2)
            for first, last in zip(starts, ends, strict=True):
                if first != 0xFFFF:
                    found.update(range(first, last + 1))
    return found


def is_picture(cp: int) -> bool:
    """True for a code point kept in the built-in set (see the module docstring)."""
    if cp in UNICODE_15 or any(lo <= cp <= hi for lo, hi in NOT_PICTURES):
        return False
    return unicodedata.name(chr(cp), None) is not None


def emoji_codepoints(font: str | Path = DEFAULT_FONT) -> list[int]:
    """The built-in set's code points, ascending."""
    if not Path(font).is_file():
        raise FileNotFoundError(f"{font}: not found; install it with `apt-get install -y fonts-noto-color-emoji`")
    return sorted(cp for cp in font_codepoints(font) if is_picture(cp))


def caption(cp: int) -> str:
    """The Unicode name, lower-cased: U+1F34E -> 'red apple'."""
    return unicodedata.name(chr(cp)).lower()


def sample_key(cp: int) -> str:
    return f"u{cp:05x}"


def render(font: ImageFont.FreeTypeFont, cp: int) -> Image.Image:
    """The colour glyph centred on a white CANVAS x CANVAS RGB image."""
    left, top, right, bottom = font.getbbox(chr(cp))
    glyph = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
    x, y = (CANVAS - (right - left)) // 2 - left, (CANVAS - (bottom - top)) // 2 - top
    ImageDraw.Draw(glyph).text((x, y), chr(cp), font=font, embedded_color=True)
    white = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 255))
    return Image.alpha_composite(white, glyph).convert("RGB")


def materialise(out: str | Path, font: str | Path = DEFAULT_FONT) -> int:
    """Write ``u<code point>.png`` + ``.txt`` caption pairs into ``out``; return how many."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    face = ImageFont.truetype(str(font), BITMAP_SIZE)
    cps = emoji_codepoints(font)
    for cp in cps:
        render(face, cp).save(out / f"{sample_key(cp)}.png")
        (out / f"{sample_key(cp)}.txt").write_text(caption(cp) + "\n")
    return len(cps)
