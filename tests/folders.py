"""Image folders the tests write with Pillow."""


def small_jpeg_folder(root, classes=("a", "b", "c", "d"), per_class=3, sides=(40, 64), seed=0):
    """An ImageFolder tree of small JPEGs (each side drawn in ``sides``), written with Pillow."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = rng.integers(sides[0], sides[1] + 1, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root
