"""Make ``examples/case_2d.npy``: a seeded 128×128 image of two smooth blobs on noise.

The bundled model is an untrained fixture network, so the case only has to be a plausible
image; issue 5 brings the synthetic data set of ALGORITHMS.md §6 and a trained model.
Run: ``python examples/make_case.py`` (numpy only).
"""

from pathlib import Path

import numpy as np

rng = np.random.default_rng(2022)
rows, cols = np.mgrid[0:128, 0:128].astype(np.float32)
image = np.zeros((128, 128), np.float32)
for centre_row, centre_col, radius, brightness in ((40, 44, 14, 0.9), (86, 90, 20, 0.6)):
    distance = np.hypot(rows - centre_row, cols - centre_col)
    image += brightness * np.exp(-((distance / radius) ** 2))
image += 0.1 * rng.standard_normal(image.shape).astype(np.float32)
np.save(Path(__file__).parent / "case_2d.npy", image[None].astype(np.float32))  # (1, H, W)
