"""``segattr compare`` and ``segattr sanity``: the commands that gate one model's explanations
against another's (an optimised or retrained version) and against a randomised copy.

They live apart from ``cli.py``, whose group adds them when a command is first looked up (they
are built from that module's shared options, so they cannot be built while it loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from segattr_onnx.cli import (
    _INPUT_PATH,
    _LAYERS_OPTION,
    _MEMORY_BUDGET_OPTION,
    _PROVIDER_OPTION,
    _VARIANT_OPTION,
    _api,
    _memory_budget,
    _run_inputs,
    _target,
    _target_options,
    _user_errors_exit_2,
)

if TYPE_CHECKING:
    from segattr_onnx.compare import CaseComparison, Comparison
    from segattr_onnx.sanity import SanityResult

# ---------------------------------------------------------------- segattr compare


def _compare_command() -> click.Command:
    """``segattr compare``, built from cli.py's shared options."""

    @click.command("compare")
    @click.argument("model_a", type=click.Path(dir_okay=False, path_type=str))
    @click.argument("model_b", type=click.Path(dir_okay=False, path_type=str))
    @click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=_INPUT_PATH)
    @click.option(
        "--method",
        default="kwc",
        show_default=True,
        help="Attribution method both models are explained with: kwc, scorecam, ablationcam, "
        "gradcam, gradcampp, layercam, hirescam, integrated_gradients, smoothgrad, "
        "gradient_input (or a plugin's).",
    )
    @_LAYERS_OPTION
    @_target_options
    @_VARIANT_OPTION
    @click.option(
        "--checks",
        "check_texts",
        multiple=True,
        metavar="CHECK",
        help="Exit 1 unless every case passes it, e.g. 'spearman >= 0.9'; repeat the option "
        "(or separate checks by commas) for several.",
    )
    @click.option(
        "--junit",
        default=None,
        metavar="FILE",
        help="Also write the checks as JUnit XML (one test case per case x check).",
    )
    @click.option(
        "--no-scores",
        is_flag=True,
        help="Do not score the maps (faster; no *_delta figures).",
    )
    @click.option(
        "--steps",
        type=click.IntRange(min=0, max=100),
        default=None,
        help="Deletion/insertion steps of the scores, up to 100 (default: 20 when a check names "
        "deletion_auc_delta or insertion_auc_delta, else no curves).",
    )
    @click.option(
        "--card",
        default=None,
        help="Model card (TOML) preparing INPUT for both models (default: each model's "
        "MODEL.card.toml; a model without one takes the other's).",
    )
    @click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Seed of P1's random kernels (the same for both models).",
    )
    @_PROVIDER_OPTION
    @_MEMORY_BUDGET_OPTION
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object, not a table.")
    @click.option("--force", is_flag=True, help="Replace --junit if it exists.")
    @click.option("--quiet", is_flag=True, help="No progress bar (compare draws none).")
    @_user_errors_exit_2
    def compare_command(
        model_a: str,
        model_b: str,
        inputs: tuple[str, ...],
        method: str,
        layers: str,
        class_index: int | None,
        output_name: str | None,
        class_axis: int | None,
        activation: str,
        region: str,
        target_preset: str | None,
        region_label: int | None,
        variant: str,
        check_texts: tuple[str, ...],
        junit: str | None,
        no_scores: bool,
        steps: int | None,
        card: str | None,
        seed: int,
        provider: str,
        memory_budget: str | None,
        as_json: bool,
        force: bool,
        quiet: bool,
    ) -> None:
        """Explain every INPUT with MODEL_A (the reference) and MODEL_B (e.g. its fp16 or int8
        build) and say how far the explanations drifted.

        Per case: the maps' Spearman rank correlation, the IoU of their top 10 %, their
        largest difference, the Dice of the two predicted masks, and each score's change
        (B − A). Exit 0 when every --checks passes, 1 when one fails, 2 on bad input.
        """
        import json
        import sys
        from dataclasses import asdict
        from pathlib import Path

        from segattr_onnx.audit import Check, _check_result, junit_xml
        from segattr_onnx.card import ModelCard
        from segattr_onnx.compare import (
            COMPARE_FIGURES,
            CURVE_DELTAS,
            CompareError,
            compare_models,
            needs_scores,
        )
        from segattr_onnx.errors import MethodError, OutputFileError
        from segattr_onnx.files import check_new_file, write_bytes
        from segattr_onnx.graph.loading import load_model
        from segattr_onnx.methods.registry import method_names
        from segattr_onnx.text import printable

        # Everything the command line gives is checked before minutes of work.
        texts = [part for text in check_texts for part in text.split(",") if part.strip()]
        checks = [Check.parse(text, known=COMPARE_FIGURES) for text in texts]
        names = [check.score for check in checks]
        if no_scores and needs_scores(names):
            wanted = next(name for name in names if name.endswith("_delta"))
            raise CompareError(
                f"--no-scores turns the scores off, but the check on {wanted} needs them; "
                "drop one of the two"
            )
        if steps is None:
            steps = 20 if any(name in CURVE_DELTAS for name in names) else 0
        elif steps == 0 and any(name in CURVE_DELTAS for name in names):
            raise CompareError(
                "--steps 0 turns the deletion/insertion curves off, but a check needs them; "
                "give --steps from 1 to 100 or drop the check"
            )
        if method not in method_names():
            known = ", ".join(method_names())
            raise MethodError(f"method {method!r} is unknown; choose one of: {known}")
        budget = _memory_budget(memory_budget)
        loaded = [load_model(model_a), load_model(model_b)]
        protected = tuple(
            dict.fromkeys(
                path
                for model in loaded
                for source in inputs
                for path in _run_inputs(model, source, region, None, card)
            )
        )
        if junit is not None:
            check_new_file(junit, (".xml",), force, protected)
        target = _target(
            class_index, output_name, class_axis, activation, region, region_label, target_preset
        )
        explainers = [
            _api("Explainer")(model, provider=provider, memory_budget=budget, seed=seed)
            for model in loaded
        ]
        given = ModelCard.load(card) if card is not None else None
        comparison = compare_models(
            *explainers, inputs, method, layers, target, variant,
            scores=not no_scores, steps=steps or None, card_a=given, card_b=given,
        )  # fmt: skip
        results = [
            _check_result(check, case.case, case.method, _checked_values(case))
            for case in comparison.cases
            for check in checks
        ]
        if junit is not None:
            try:
                write_bytes(Path(junit), junit_xml(results, "segattr-compare"))
            except OSError as exc:
                raise OutputFileError(f"cannot write {junit!r}: {exc.strerror or exc}") from exc
        passed = all(result.passed for result in results)
        if as_json:
            data = {**comparison.to_dict(), "checks": [asdict(r) for r in results]}
            click.echo(json.dumps({**data, "passed": passed}, indent=2))
        else:
            lines = _compare_table(comparison)
            lines += [f"FAIL {r.case}: {r.message}" for r in results if not r.passed]
            if results:
                lines.append(
                    f"{sum(r.passed for r in results)} of {len(results)} checks passed"
                    + (f"; JUnit XML in {junit}" if junit is not None else "")
                )
            click.echo("\n".join(printable(line) for line in lines))
        if not passed:
            sys.exit(1)

    return compare_command


def _checked_values(case: CaseComparison) -> dict:
    """A case's figures as a check reads them; a constant map (which has no scores, so no
    deltas) says so in the failure instead of 'not computed'."""
    degenerate = bool(case.scores_a.get("degenerate") or case.scores_b.get("degenerate"))
    return {**case.figures(), "degenerate": degenerate}


def _compare_table(comparison: Comparison) -> list[str]:
    """A heading saying what was compared, then one row of figures per case."""
    figures = [list(case.figures().items()) for case in comparison.cases]
    names = list(dict.fromkeys(name for row in figures for name, _ in row))
    rows = [("case", *names)]
    for case, row in zip(comparison.cases, figures, strict=True):
        values = dict(row)
        rows.append((case.case, *(_figure(name, values.get(name)) for name in names)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    how = (  # the input-gradient methods attribute to the input, through no layer
        "on the input"
        if _on_the_input(comparison.method)
        else f"({comparison.variant}) through {comparison.layers!r}"
    )
    lines = [
        f"{comparison.method} {how}: model A {comparison.model_a}, model B "
        f"{comparison.model_b} (deltas are B - A)"
    ]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return lines


def _figure(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if name.endswith("_delta") else f"{value:.4f}"


# ---------------------------------------------------------------- segattr sanity


def _sanity_command() -> click.Command:
    """``segattr sanity``, built from cli.py's shared options."""

    @click.command("sanity")
    @click.argument("model", type=click.Path(dir_okay=False, path_type=str))
    @click.argument("input_path", metavar="INPUT", type=_INPUT_PATH)
    @click.option(
        "--method",
        default="kwc",
        show_default=True,
        help="Attribution method to check: kwc, scorecam, ablationcam, gradcam, gradcampp, "
        "layercam, hirescam, integrated_gradients, smoothgrad, gradient_input (or a plugin's).",
    )
    @_LAYERS_OPTION
    @_target_options
    @_VARIANT_OPTION
    @click.option(
        "--steps",
        type=click.IntRange(min=1),
        default=None,
        help="Stop the cascade after N layers (default: every kernel layer that feeds the "
        "explained output, one per step, from the head towards the input).",
    )
    @click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Seed of the random weights (and of P1's random kernels).",
    )
    @click.option(
        "--check",
        "check_texts",
        multiple=True,
        metavar="CHECK",
        help="Exit 1 unless the final step passes it, e.g. 'sanity_spearman <= 0.5'; repeat "
        "it for a band ('sanity_spearman >= -0.5' catches a map that turns into its inverse).",
    )
    @_PROVIDER_OPTION
    @_MEMORY_BUDGET_OPTION
    @click.option("--input-key", default=None, help="Array to read from an .npz INPUT.")
    @click.option(
        "--card",
        default=None,
        help="Model card (TOML) saying how to prepare inputs (default: MODEL.card.toml if "
        "present).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the cascade as JSON.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @_user_errors_exit_2
    def sanity_command(
        model: str,
        input_path: str,
        method: str,
        layers: str,
        class_index: int | None,
        output_name: str | None,
        class_axis: int | None,
        activation: str,
        region: str,
        target_preset: str | None,
        region_label: int | None,
        variant: str,
        steps: int | None,
        seed: int,
        check_texts: tuple[str, ...],
        provider: str,
        memory_budget: str | None,
        input_key: str | None,
        card: str | None,
        as_json: bool,
        quiet: bool,
    ) -> None:
        """Randomise MODEL's kernel layers from the head towards the input, one more per step,
        and say how much the map of INPUT changes (Adebayo et al. 2018).

        Each step explains INPUT again on the randomised copy (same method, layers, target
        and variant) and compares its map with the original by Spearman rank correlation and
        SSIM. A method that explains the model decorrelates; one whose map stays the same is
        explaining the image. Exit 1 when a --check fails on the final step.
        """
        import json
        import sys
        import warnings

        from segattr_onnx.card import ModelCard, card_for
        from segattr_onnx.files import input_budget, read_image
        from segattr_onnx.sanity import SanityError, sanity_check
        from segattr_onnx.sanity_audit import parse_check, unjudged_reason
        from segattr_onnx.text import printable

        checks = [parse_check(text) for text in check_texts]  # before any work
        budget = _memory_budget(memory_budget)
        with input_budget(budget):  # an input bigger than the budget is refused from its header
            image = read_image(input_path, input_key, preferred="image")
        model_card = card_for(
            image, ModelCard.load(card) if card is not None else ModelCard.beside(model)
        )
        x = model_card.prepare_image(image) if model_card is not None else image.array
        target = _target(
            class_index, output_name, class_axis, activation, region, region_label, target_preset
        )
        explainer = _api("Explainer")(model, provider=provider, memory_budget=budget, seed=seed)
        if model_card is not None:
            target = model_card.apply_target(target)
            if model_card.inference is not None:
                warnings.warn(
                    "the sanity cascade explains the whole input: the model card's "
                    "[inference] sliding window is not used",
                    stacklevel=2,
                )
            if model_card.channel_axis(image) is not None:
                x = explainer.place_channels(x)  # (C, *spatial) where the model takes them
        result = sanity_check(
            explainer, x, method, layers, target, variant, steps=steps, seed=seed,
            progress=not quiet,
        )  # fmt: skip
        verdicts = []
        if checks and result.final_spearman is None:
            raise SanityError(unjudged_reason(result))
        for check in checks:
            value = result.final_spearman
            passed = check.passes(value)
            message = "" if passed else check.failure_message(value)
            verdicts.append({"check": str(check), "value": value, "passed": passed,
                             "message": message})  # fmt: skip
        if as_json:
            click.echo(json.dumps({**result.to_dict(), "checks": verdicts}, indent=2))
        else:
            click.echo("\n".join(printable(line) for line in _sanity_table(result)))
            for verdict in verdicts:
                state = "pass" if verdict["passed"] else f"FAIL: {verdict['message']}"
                click.echo(f"check {verdict['check']}: {state}")
        if not all(verdict["passed"] for verdict in verdicts):
            sys.exit(1)

    return sanity_command


def _sanity_table(result: SanityResult) -> list[str]:
    """One row per step: how many layers are randomised, the one added, and the figures."""
    rows = [("step", "randomised", "layer", "spearman", "ssim")]
    for step in result.steps:
        if step.error is not None:
            figures = ("-", "-")
        else:
            ssim = "-" if step.ssim is None else f"{step.ssim:.4f}"
            figures = (f"{step.spearman:.4f}", ssim)
        rows.append((str(step.step), f"{step.randomised}/{len(result.cascade)}", step.layer,
                     *figures))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    how = (
        "on the input"
        if _on_the_input(result.method)
        else f"({result.variant}) through {len(result.layers)} layers"
    )
    lines = [
        f"{result.method} {how}, seed {result.seed}: the map against the original's as the "
        "model is randomised"
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]  # fmt: skip
    lines += [f"step {s.step}: {s.error}" for s in result.steps if s.error is not None]
    final = result.final_spearman
    figure = "none (the last step broke)" if final is None else f"{final:.4f}"
    lines.append(
        f"final spearman {figure} after randomising {result.final.randomised} of "
        f"{len(result.cascade)} kernel layers"
    )
    return lines


def _on_the_input(method: str) -> bool:
    """Whether ``method`` attributes to the input's voxels (no layers, no variant)."""
    from segattr_onnx.errors import SegattrError
    from segattr_onnx.methods.input_gradients import InputGradientMethod
    from segattr_onnx.methods.registry import create_method

    try:
        return isinstance(create_method(method), InputGradientMethod)
    except SegattrError:  # a plugin method that needs options: a layer method's wording
        return False


COMMANDS: tuple[click.Command, ...] = (_sanity_command(), _compare_command())
