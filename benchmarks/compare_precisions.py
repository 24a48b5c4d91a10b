"""How far fp16 and int8 builds of a model move its explanations (``segattr compare``).

Makes an fp16 build (float16 weights, float32 kept at the boundaries) and an int8 build
(static QDQ quantisation, seeded calibration) of a model, explains N seeded cases with each
build and with the float32 original (Grad-CAM and KWC through the decoder), and prints, per
build × method, the worst case and the median of each figure: Spearman, top-10 % IoU, largest
map difference, and the Dice of the predicted masks. A copy whose decoder weights are
randomised is compared too, for contrast: what a model that changed looks like. The builders
are the tests' own (``tests/model_variants.py``), so these are the models
``tests/test_compare.py`` checks.

Run from the repository root::

    python benchmarks/compare_precisions.py                 # the test fixture, 8 cases
    python benchmarks/compare_precisions.py --model bundled # the trained 2D model, synthetic cases
    python benchmarks/compare_precisions.py --methods gradcampp,scorecam,ablationcam
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the tests' builders, and the package from a checkout

from segattr_onnx import Explainer  # noqa: E402
from segattr_onnx.compare import compare_models  # noqa: E402
from tests.model_variants import fp16_copy, int8_copy, randomised_decoder  # noqa: E402

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx"
METHODS = ("gradcam", "kwc")
CALIBRATION_SEED = 1000  # apart from the cases' seeds (0, 1, ...)
RANDOM_SEED = 4  # the decoder weights of the contrast row


def _cases(model: str, count: int, folder: Path) -> tuple[Path, list[Path], list[np.ndarray]]:
    """The float32 model, the case files (no batch axis), and the int8 calibration inputs
    (with it)."""
    if model == "fixture":
        source = FIXTURE
        draw = [np.random.default_rng(seed).standard_normal((1, 32, 32)) for seed in range(count)]
        rng = np.random.default_rng(CALIBRATION_SEED)
        calibration = [rng.standard_normal((1, 1, 32, 32)) for _ in range(8)]
    else:
        from segattr_onnx.bundled import example_model_path
        from segattr_onnx.synthetic import make_case

        source = Path(example_model_path())
        draw = [make_case(90_000 + seed, dim=2, size=64).image[None] for seed in range(count)]
        calibration = [
            make_case(CALIBRATION_SEED + seed, dim=2, size=64).image[None, None]
            for seed in range(8)
        ]
    paths = []
    for seed, image in enumerate(draw):
        path = folder / f"case{seed}.npy"
        np.save(path, np.asarray(image, dtype=np.float32))
        paths.append(path)
    return source, paths, calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("fixture", "bundled"), default="fixture")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        source, cases, calibration = _cases(args.model, args.cases, folder)
        builds = {
            "fp16": fp16_copy(source, folder / "fp16.onnx"),
            "int8": int8_copy(source, folder / "int8.onnx", calibration),
            "random decoder": folder / "random.onnx",  # for contrast: a model that changed
        }
        shape = (1, *np.load(cases[0]).shape)
        randomised_decoder(source, builds["random decoder"], shape, seed=RANDOM_SEED)
        reference = Explainer(source, provider="cpu")
        print(f"model {source.name} ({args.model}), {len(cases)} cases, layers 'decoder', p2")
        header = "| build | method | spearman | top10_iou | max_abs_diff | dice | seconds |"
        print(header)
        print("|---|---|---|---|---|---|---|")
        for build, path in builds.items():
            candidate = Explainer(path, provider="cpu")
            for method in args.methods.split(","):
                started = time.perf_counter()
                comparison = compare_models(reference, candidate, cases, method, scores=False)
                seconds = time.perf_counter() - started
                figures = [case.figures() for case in comparison.cases]
                cells = [
                    _summary(figures, "spearman", min),
                    _summary(figures, "top10_iou", min),
                    _summary(figures, "max_abs_diff", max),
                    _summary(figures, "dice", min),
                ]
                print(f"| {build} | {method} | {' | '.join(cells)} | {seconds:.2f} |")
    print("each cell: worst case (median); worst is the lowest, or the highest for max_abs_diff")


def _summary(figures: list[dict], name: str, worst) -> str:
    values = [row[name] for row in figures]
    return f"{worst(values):.4f} ({statistics.median(values):.4f})"


if __name__ == "__main__":
    main()
