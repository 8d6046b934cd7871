from PIL import Image

from sedit.demo import main


def test_demo_writes_png_grid(tmp_path):
    path = main(["--out", str(tmp_path), "--steps", "20"])
    image = Image.open(path)
    assert image.format == "PNG" and image.width > image.height > 64
