"""The ``segattr`` command: a thin layer over the Python API.

Every failure caused by the user's input is a ``SegattrError``; it is printed as one line on
stderr and the command exits with code 2, with no traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

import click

from segattr_onnx import __version__
from segattr_onnx.errors import InputShapeError, MethodError, SegattrError, TargetError
from segattr_onnx.runtime.chunks import DEFAULT_BUDGET_FRACTION
from segattr_onnx.runtime.providers import PROVIDER_CHOICES
from segattr_onnx.text import command_line_messages, printable

if TYPE_CHECKING:
    import numpy as np

    from segattr_onnx.audit import AuditReport
    from segattr_onnx.explainer import Explainer
    from segattr_onnx.graph.loading import LoadedModel
    from segattr_onnx.metrics.scoring import MapScores
    from segattr_onnx.runtime.backends import ExecutorOptions
    from segattr_onnx.target import Region, Target

# The rest of the package is imported by the commands that use it, so that ``segattr --help``
# starts at once: no onnx, ONNX Runtime, scipy or plugin import. ``Explainer`` stays an
# attribute of this module (imported on first access) that the commands look up here through
# ``_api``, so tests can replace it (``monkeypatch.setattr(cli, "Explainer", ...)``).
_LAZY = {"Explainer": "segattr_onnx.explainer"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _api(name: str):
    """One of the ``_LAZY`` names, as this module holds it now (imported on first use)."""
    return getattr(sys.modules[__name__], name)


class _LazyChoice(click.Choice):
    """A ``click.Choice`` whose values are read from the package only when a command parses
    the option or shows its help (they live in modules that import onnx)."""

    def __init__(self, load: Callable[[], tuple[str, ...]]) -> None:
        self._load = load
        super().__init__((), case_sensitive=True)  # the choices setter ignores the empty set

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._load())

    @choices.setter
    def choices(self, value: tuple[str, ...]) -> None:
        pass


class _LazyHelpOption(click.Option):
    """A ``click.Option`` whose help text is written when help is shown."""

    def __init__(self, *args, help_text: Callable[[], str], **kwargs) -> None:
        self._help_text = help_text
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:  # type: ignore[override]
        return self._help_text()

    @help.setter
    def help(self, value: str | None) -> None:
        pass


def _activations() -> tuple[str, ...]:
    from segattr_onnx.target import ACTIVATIONS

    return tuple(ACTIVATIONS)


def _exportable_methods() -> tuple[str, ...]:
    from segattr_onnx.graph.saliency import EXPORTABLE_METHODS

    return EXPORTABLE_METHODS


def _layers_help() -> str:
    from segattr_onnx.methods.layers import LAYER_GROUPS

    return (
        f"Layers to explain through: a group ({', '.join(LAYER_GROUPS)}), "
        "comma-separated layer names, or re:REGEX."
    )


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def _user_errors_exit_2(command: Callable) -> Callable:
    @wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                result = command(*args, **kwargs)
            except SegattrError as exc:
                click.echo(f"error: {printable(str(exc))}", err=True)
                sys.exit(EXIT_BAD_INPUT)
            except KeyboardInterrupt:
                # 1 means "a check failed": an interruption must not read as a verdict. Every
                # file is written to a temporary name and renamed, so nothing is half-written.
                click.echo("error: interrupted; nothing was half-written", err=True)
                sys.exit(EXIT_INTERRUPTED)
            finally:
                for warning in dict.fromkeys(str(w.message) for w in caught):
                    click.echo(f"warning: {printable(warning)}", err=True)
        return result

    return wrapper


_PROVIDER_OPTION = click.option(
    "--provider",
    default="auto",
    show_default=True,
    help="auto (CUDA when it works), cpu, cuda, or a provider list a plugin adds.",
)

_MEMORY_BUDGET_OPTION = click.option(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="Memory the whole process may take on the CPU (on CUDA: GPU memory per batch); it sets "
    "how many masks run at once: 4G, 512M, 1.5GiB, bytes, or a fraction of free memory (0.3, "
    f"30%).  [default: batches take {DEFAULT_BUDGET_FRACTION:.0%} of free memory]",
)


# The layer selection and the paper variant of every command that explains (explain, export,
# compare, sanity).
_LAYERS_OPTION = click.option(
    "--layers", default="decoder", show_default=True, cls=_LazyHelpOption, help_text=_layers_help
)
_VARIANT_OPTION = click.option(
    "--variant",
    type=click.Choice(("p1", "p2")),
    default="p2",
    show_default=True,
    help="Paper variant: p2 (J. Med. Imaging 2023) or p1 (SPIE 2022).",
)


_EXECUTOR_OPTIONS = [
    click.option(
        "--executor",
        default=None,
        metavar="NAME",
        help="What runs the work: local (this process, the default) or ray (a Ray cluster's "
        "workers; the segattr-ray plugin).",
    ),
    click.option(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="With --executor ray: the cluster to join (auto: the one started on this machine "
        "by 'ray start --head'); without it, a cluster of this machine is started for the run.",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="With a cluster executor: worker processes (default: as many as the CPUs hold).",
    ),
    click.option(
        "--worker-cpus",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="CPUs each worker reserves, and its ONNX Runtime threads (default 1).",
    ),
    click.option(
        "--worker-gpus",
        type=click.FloatRange(min=0),
        default=None,
        help="GPUs each worker reserves; fractions share one (0.5: two workers per GPU).",
    ),
]


def _options(options: list[Callable]) -> Callable[[Callable], Callable]:
    """One decorator applying a list of click options, in the list's order on --help."""

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


_executor_options = _options(_EXECUTOR_OPTIONS)


def _executor_settings(
    executor: str | None,
    ray_address: str | None,
    workers: int | None,
    worker_cpus: float | None,
    worker_gpus: float | None,
) -> tuple[str | None, ExecutorOptions | None]:
    """The executor's name and the options given on the command line (None: not given)."""
    from segattr_onnx.runtime.backends import ExecutorOptions

    options = ExecutorOptions(ray_address, workers, worker_cpus, worker_gpus)
    return executor, options if options.given else None


def _executor_backend(settings: tuple[str | None, ExecutorOptions | None]):
    """The backend for explain and score (None: this process), closed when the command ends."""
    from segattr_onnx.runtime.backends import LOCAL, executor_backend

    name, options = settings
    if name in (None, LOCAL) and options is None:
        return None
    backend = executor_backend(name or LOCAL, options)
    click.get_current_context().call_on_close(backend.close)
    return backend


def _patch(text: str | None) -> tuple[int, ...] | None:
    """``--patch 128x128x128`` (or 128,128,128)."""
    if text is None:
        return None
    parts = text.replace(",", "x").split("x")
    try:
        patch = tuple(int(part) for part in parts)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not sizes like 128x128x128", param_hint="--patch"
        ) from None
    if not patch or min(patch) < 1:
        raise click.BadParameter(f"{text!r}: every size must be ≥ 1", param_hint="--patch")
    return patch


_WINDOW_OPTIONS = [
    click.option(
        "--patch",
        default=None,
        metavar="SIZES",
        help="Run the model patch by patch (a sliding window), e.g. 128x128x128; overrides the "
        "card's [inference] patch.",
    ),
    click.option(
        "--overlap",
        type=click.FloatRange(min=0, max=1, max_open=True),
        default=None,
        help="Share of a patch the next one overlaps (default 0.5, or the card's).",
    ),
]


_window_options = _options(_WINDOW_OPTIONS)


def _window(model_card, patch: str | None, overlap: float | None):
    """The sliding window a run uses: the card's [inference], with --patch and --overlap
    replacing its settings; None to run the whole input."""
    import dataclasses

    from segattr_onnx.sliding_window import SlidingWindow

    window = model_card.inference if model_card is not None else None
    given = _patch(patch)
    if given is not None:
        window = dataclasses.replace(window, patch=given) if window else SlidingWindow(patch=given)
    if overlap is not None:
        if window is None:
            raise click.UsageError("--overlap needs a sliding window: give --patch too")
        window = dataclasses.replace(window, overlap=overlap)
    return window


def _memory_budget(text: str | None) -> int | None:
    """``--memory-budget`` in bytes (a fraction is read against free memory now); None: default."""
    from segattr_onnx.runtime.budget import parse_memory_budget

    return parse_memory_budget(text).resolve() if text is not None else None


class _WithPluginFormats(click.Command):
    """A command whose --help ends with the input and output formats installed plugins add
    (read when help is shown, so plugins are not imported for every command)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from segattr_onnx.plugins import describe_formats, registry

        plugins = registry()
        readers = describe_formats(plugins.readers) or "none (pip install a plugin)"
        writers = describe_formats(plugins.writers) or "none"
        with formatter.section("Formats"):
            formatter.write_text(f"INPUT: .npy, .npz (core); {readers}")
            formatter.write_text(f"--out: .npy (core); {writers}")
        super().format_epilog(ctx, formatter)


class _OneLineErrors(click.Group):
    """Click's own refusals (a folder where a file is expected, an unknown option, a value out
    of range) as one ``error:`` line and exit 2 like every other refusal, not a Usage block;
    Ctrl-C anywhere as exit 130."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        kwargs.pop("standalone_mode", None)
        try:
            with command_line_messages():  # errors and warnings name options, not arguments
                code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: interrupted; nothing was half-written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.NoArgsIsHelpError as exc:  # plain `segattr`: a request for help
            click.echo(exc.ctx.get_help() if exc.ctx is not None else "segattr --help")
            sys.exit(0)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            click.echo(f"error: {printable(exc.format_message())}{where}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code if isinstance(code, int) else 0)

    # ``compare`` and ``sanity`` live in cli_gates.py, which builds them from this module's
    # options: they join the group when a command is looked up, after this module is loaded.
    def list_commands(self, ctx: click.Context) -> list[str]:
        _register_gate_commands(self)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register_gate_commands(self)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segattr")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the on-disk cache of optimised graphs (default: $SEGATTR_CACHE_DIR, else "
    "the user's cache folder; docs/cache.md).",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write the on-disk cache.")
@click.pass_context
def main(ctx: click.Context, cache_dir: Path | None, no_cache: bool) -> None:
    """Explain exported ONNX segmentation models: which input regions made the mask."""
    from segattr_onnx.runtime.optimised_cache import use_disk_cache

    previous = use_disk_cache(None if no_cache else functools.partial(_open_cache, cache_dir))
    ctx.call_on_close(lambda: use_disk_cache(previous))  # a caller's own setting comes back


def _open_cache(folder: Path | None):
    """The cache ``--cache-dir`` names (its problems are errors: the user asked for it), or
    the default one (its problems are warnings: the run goes on without a cache)."""
    from segattr_onnx.runtime.disk_cache import DiskCache, default_max_bytes

    if folder is None:
        return DiskCache.open_default()
    return DiskCache(folder, default_max_bytes())


@main.command("cache")
@click.argument("action", type=click.Choice(["info", "clear"]))
@_user_errors_exit_2
def cache_command(action: str) -> None:
    """Show the on-disk cache (folder, size, bound) or clear it; deleting it is always safe."""
    from segattr_onnx.runtime.optimised_cache import active_disk_cache

    cache = active_disk_cache()
    if cache is None:
        raise click.UsageError("no cache in use (--no-cache, or its folder is unsafe)")
    if action == "clear":
        click.echo(f"removed {cache.clear()} entries from {cache.root}")
        return
    click.echo(f"folder   {cache.root}")
    size, bound = cache.size_bytes() / (1 << 20), cache.max_bytes / (1 << 20)
    click.echo(f"size     {size:.1f} MiB of {bound:.0f} MiB")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--input-shape",
    default=None,
    help="Input size to analyse, e.g. 1x1x128x128 (needed when the model has free dims).",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDER_CHOICES),
    default="auto",
    show_default=True,
    help="ONNX Runtime provider to report (auto = CUDA when it really works).",
)
@click.option(
    "--output-name",
    default=None,
    help="Show the layer groups for this output (default: the one explain picks).",
)
@_MEMORY_BUDGET_OPTION
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bar (inspect draws none; taken so every command takes the same options).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_user_errors_exit_2
def inspect_command(
    model: str,
    input_shape: str | None,
    provider: str,
    output_name: str | None,
    memory_budget: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """List MODEL's kernel layers, its bottleneck and decoder, input layout and outputs, and
    the memory it takes (what a --memory-budget leaves for batches)."""
    from segattr_onnx.inspection import inspect_model

    report = inspect_model(
        model,
        input_shape=input_shape,
        provider=provider,
        output=output_name,
        memory_budget=_memory_budget(memory_budget),
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())


def _region(text: str, label: int | None) -> Region:
    from segattr_onnx.files import load_array
    from segattr_onnx.target import Region

    if text in ("all", "largest-component"):
        if label is not None:
            raise TargetError("--region-label needs --region to name a label-map file")
        return Region.coerce(text)
    values = load_array(text, key_option="a .npy holding only the mask", preferred="labels")
    if label is not None:
        return Region.from_labels(values, label)
    return Region.from_mask(values, description=f"mask {text}")


def _target_options(command: Callable) -> Callable:
    """The options that choose the output, class, activation and region (a Target)."""
    for option in reversed(_TARGET_OPTIONS):
        command = option(command)
    return command


def _target(
    class_index: int | None,
    output_name: str | None,
    class_axis: int | None,
    activation: str,
    region: str,
    region_label: int | None,
    target_preset: str | None = None,
) -> Target:
    from segattr_onnx.target import Target

    base = Target()
    if target_preset is not None:
        from segattr_onnx.plugins import registry

        factory = registry().targets.get(target_preset)
        if factory is None:
            known = ", ".join(registry().targets) or "none installed"
            raise TargetError(f"target preset {target_preset!r} is unknown ({known})")
        base = factory()
    return Target(
        class_index=class_index if class_index is not None else base.class_index,
        output=output_name or base.output,
        class_axis=class_axis if class_axis is not None else base.class_axis,
        activation=activation if activation != "auto" else base.activation,
        region=_region(region, region_label) if region != "all" else base.region,
    )


_TARGET_OPTIONS = [
    click.option("--class-index", type=int, default=None, help="Class channel to explain."),
    click.option(
        "--output-name",
        default=None,
        help="Model output to explain (default: the one the selected layers feed, the largest).",
    ),
    click.option(
        "--class-axis",
        type=int,
        default=None,
        help="Class axis of the output, when the graph does not show it.",
    ),
    click.option(
        "--activation",
        type=_LazyChoice(_activations),
        default="auto",
        show_default=True,
        help="How outputs become probabilities (auto reads the graph).",
    ),
    click.option(
        "--region",
        default="all",
        show_default=True,
        help="Voxels whose probability counts: all, largest-component, or a mask .npy/.npz.",
    ),
    click.option(
        "--target-preset",
        default=None,
        help="A named target a plugin adds (options given here override it).",
    ),
    click.option(
        "--region-label",
        type=int,
        default=None,
        help="With --region LABELS.npy: the label whose voxels form the region.",
    ),
]

_SCORE_OPTIONS = [
    click.option(
        "--labels",
        "labels_path",
        default=None,
        help="Ground-truth label map (.npy: 0 background, 1 distractor, "
        "2 discriminating background, 3 target) for Attribution Quality.",
    ),
    click.option(
        "--baseline",
        type=click.Choice(("zero", "min")),
        default="zero",
        show_default=True,
        help="What masked-out voxels become.",
    ),
    click.option(
        "--steps",
        type=click.IntRange(min=0, max=100),
        default=20,
        show_default=True,
        help="Deletion/insertion steps, up to 100 (0: no curves).",
    ),
]


# INPUT may be a folder: plugins read some (a DICOM series); ``read_image`` refuses any other.
_INPUT_PATH = click.Path(dir_okay=True, path_type=str)


_score_options = _options(_SCORE_OPTIONS)


@main.command("explain", cls=_WithPluginFormats)
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.argument("input_path", metavar="INPUT", type=_INPUT_PATH)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the map (.npy, the input's spatial shape, float32 in [0, 1]).",
)
@click.option(
    "--method",
    default="kwc",
    show_default=True,
    help="Attribution method: kwc, scorecam, ablationcam, gradcam, gradcampp, layercam, "
    "hirescam, integrated_gradients, smoothgrad, gradient_input (or a plugin's).",
)
@_LAYERS_OPTION
@_target_options
@_VARIANT_OPTION
@_PROVIDER_OPTION
@_MEMORY_BUDGET_OPTION
@click.option("--input-shape", default=None, help="Expected input shape, checked against INPUT.")
@click.option("--input-key", default=None, help="Array to read from an .npz INPUT.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of P1's random kernels.",
)
@click.option(
    "--scorecam-uniform-weights",
    is_flag=True,
    help="Reproduce P2's published Score-CAM code (every weight 1); off by default.",
)
@click.option(
    "--ig-steps",
    type=click.IntRange(min=1),
    default=None,
    help="integrated_gradients: points on the path from the baseline [default: 64].",
)
@click.option(
    "--ig-baseline",
    type=click.Choice(("zero", "minimum")),
    default=None,
    help="integrated_gradients: the baseline, zeros or the image's minimum [default: zero].",
)
@click.option(
    "--smoothgrad-samples",
    type=click.IntRange(min=1),
    default=None,
    help="smoothgrad: noisy copies averaged [default: 25].",
)
@click.option(
    "--smoothgrad-noise",
    type=click.FloatRange(min=0),
    default=None,
    help="smoothgrad: noise std as a fraction of the input's value range [default: 0.15].",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--score", is_flag=True, help="Also score the map (as segattr score does).")
@click.option(
    "--card",
    default=None,
    help="Model card (TOML) saying how to prepare inputs (default: MODEL.card.toml if present).",
)
@click.option("--overlay", default=None, help="Also draw the map over the image (.png).")
@click.option("--report", default=None, help="Also write a one-file HTML report (.html).")
@_score_options
@_window_options
@_executor_options
@_user_errors_exit_2
def explain_command(
    model: str,
    input_path: str,
    out: str,
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
    provider: str,
    memory_budget: str | None,
    input_shape: str | None,
    input_key: str | None,
    seed: int,
    scorecam_uniform_weights: bool,
    ig_steps: int | None,
    ig_baseline: str | None,
    smoothgrad_samples: int | None,
    smoothgrad_noise: float | None,
    as_json: bool,
    force: bool,
    quiet: bool,
    score: bool,
    card: str | None,
    overlay: str | None,
    report: str | None,
    labels_path: str | None,
    baseline: str,
    steps: int,
    patch: str | None,
    overlap: float | None,
    executor: str | None,
    ray_address: str | None,
    workers: int | None,
    worker_cpus: float | None,
    worker_gpus: float | None,
) -> None:
    """Explain which regions of INPUT made MODEL draw its mask; write the map to --out.

    INPUT is a .npy/.npz array as the model takes it, with or without the batch axis, or a
    file or folder a plugin reads (see Formats below). A model card (--card, or
    MODEL.card.toml beside the model) prepares it: intensities, size, channels.
    """
    import numpy as np

    from segattr_onnx.arrays import resize_nearest, upsample
    from segattr_onnx.card import ModelCard, card_for, warn_if_windowed_gradients
    from segattr_onnx.files import (
        check_new_file,
        check_output_path,
        input_budget,
        load_array,
        read_image,
        save_array,
        write_bytes,
    )
    from segattr_onnx.graph.loading import load_model
    from segattr_onnx.graph.shapes import parse_shape
    from segattr_onnx.methods.registry import create_method, method_names

    # Scoring, drawing and windows are imported below when asked for (25 ms on each call).
    budget = _memory_budget(memory_budget)
    settings = _executor_settings(executor, ray_address, workers, worker_cpus, worker_gpus)
    backend = _executor_backend(settings)  # an executor not installed: refused before any work
    loaded = load_model(model)  # read once: for the list of the run's inputs and the explainer
    protected = _run_inputs(loaded, input_path, region, labels_path, card)
    check_output_path(out, force, protected)  # fail before minutes of work, not after
    if overlay is not None:
        check_new_file(overlay, (".png",), force, protected)
    if report is not None:
        check_new_file(report, (".html", ".htm"), force, protected)
    with input_budget(budget):  # an input bigger than the budget is refused from its header
        image = read_image(input_path, input_key, preferred="image")
    model_card = card_for(
        image, ModelCard.load(card) if card is not None else ModelCard.beside(model)
    )
    original = image.array
    x = model_card.prepare_image(image) if model_card is not None else original
    if input_shape is not None:
        expected = parse_shape(input_shape)
        if tuple(x.shape) not in (expected, expected[1:]):
            raise InputShapeError(
                f"INPUT has shape {'x'.join(map(str, x.shape))}, not the --input-shape "
                f"{input_shape} given"
            )
    options = {}
    if scorecam_uniform_weights:
        if method != "scorecam":
            raise MethodError("--scorecam-uniform-weights applies to --method scorecam only")
        options["uniform_weights"] = True
    for flag, value, owner, key in (
        ("--ig-steps", ig_steps, "integrated_gradients", "steps"),
        ("--ig-baseline", ig_baseline, "integrated_gradients", "baseline"),
        ("--smoothgrad-samples", smoothgrad_samples, "smoothgrad", "samples"),
        ("--smoothgrad-noise", smoothgrad_noise, "smoothgrad", "noise"),
    ):
        if value is not None:
            if method != owner:
                raise MethodError(f"{flag} applies to --method {owner} only")
            options[key] = value
    if method not in method_names():
        known = ", ".join(method_names())
        raise MethodError(f"method {method!r} is unknown; choose one of: {known}")
    if (labels_path is not None) and not score:
        raise MethodError("--labels is used with --score")
    labels = (
        load_array(labels_path, key_option="a .npy holding only the labels", preferred="labels")
        if (labels_path is not None)
        else None
    )
    target = _target(
        class_index, output_name, class_axis, activation, region, region_label, target_preset
    )
    if model_card is not None:
        target = model_card.apply_target(target)
        if labels is not None and model_card.resamples:
            # onto the resized input, whose spatial axes follow its channels (if any)
            spatial = x.shape[1:] if model_card.channel_axis(image) is not None else x.shape
            labels = resize_nearest(labels, spatial)
    explainer = _api("Explainer")(
        loaded, provider=provider, memory_budget=budget, seed=seed, executor=backend
    )
    if model_card is not None and model_card.channel_axis(image) is not None:
        x = explainer.place_channels(x)  # the card made (C, *spatial); NHWC models want C last
    window = _window(model_card, patch, overlap)
    if window is not None:
        from segattr_onnx.windowed import WINDOWED_METHODS, explain_windowed
    if window is not None and method in WINDOWED_METHODS:
        # Deployed patch by patch: the fused prediction is what gets explained.
        explanation = explain_windowed(
            explainer, x, window, create_method(method, **options), layers, target, variant
        )
    else:
        if window is not None:
            warn_if_windowed_gradients(window)
        window = None  # a method the window does not serve yet runs, and is scored, whole
        explanation = explainer.explain(
            x, method, layers, target, variant, progress=not quiet, **options
        )
    final_map = explanation.map
    if model_card is not None and model_card.resamples:
        # The card resized the input: the map goes back onto the image it was asked about.
        original_spatial = model_card.spatial_shape(image)
        if final_map.shape != original_spatial:
            final_map = np.clip(upsample(final_map, original_spatial), 0, 1).astype(np.float32)
    written = save_array(out, final_map, force=force, protected=protected, like=image)
    summary = {**explanation.summary(), "out": str(written)}
    scores = None
    if score:
        from segattr_onnx.metrics.scoring import score_map

        scores = score_map(
            explainer,
            x,
            explanation.map,
            labels,
            target,
            variant,
            baseline,
            steps or None,
            progress=not quiet,
            window=window,
        )
        summary["scores"] = scores.to_dict()
    if overlay is not None or report is not None:
        from segattr_onnx.render import overlay_image, png_bytes, report_html

        picture = _spatial_image(explainer, x, windowed=window is not None)
        mask = explanation.prediction >= 0.5
        if mask.shape != picture.shape:
            mask = None
        if overlay is not None:
            write_bytes(Path(overlay), png_bytes(overlay_image(picture, explanation.map, mask)))
            summary["overlay"] = overlay
        if report is not None:
            facts = {
                "model": model,
                "input": input_path,
                "out": str(written),
                "segattr-onnx": __version__,
                **_provenance(model, None if model_card is None else model_card.source),
            }
            page = report_html(
                picture,
                explanation.prediction,
                mask,
                [explanation],
                summary.get("scores"),
                facts,
                affine=image.meta.get("affine"),  # a NIfTI's (medical plugin): planes, letters
            )
            write_bytes(Path(report), page.encode("utf-8"))
            summary["report"] = report
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        how = (  # the input-gradient methods attribute to the input, through no layer
            "on the input"
            if explanation.attributions is not None
            else f"({explanation.variant}) through {len(explanation.layers)} layers"
        )
        click.echo(
            f"{explanation.method} {how}: {explanation.forward_passes} forward passes in "
            f"{explanation.seconds:.2f} s on {explanation.provider}; map "
            f"{'x'.join(map(str, final_map.shape))} written to {written}"
        )
        if scores is not None:
            click.echo(_format_scores(scores))


def _provenance(model: str, card_source: Path | None) -> dict[str, str]:
    """The report's facts of what ran: the model file's sha256 (read in blocks), the model
    card used, and the date (UTC, ISO 8601)."""
    import hashlib
    from datetime import datetime, timezone

    digest = hashlib.sha256()
    with open(model, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return {
        "model sha256": digest.hexdigest(),
        "model card": "none" if card_source is None else str(card_source),
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _format_scores(scores: MapScores) -> str:
    if scores.degenerate:
        return "degenerate map (constant): no score"
    return "  ".join(
        f"{key} {value:.4f}"
        for key, value in scores.to_dict().items()
        if isinstance(value, float) and key != "seconds"
    )


@main.command("predict", cls=_WithPluginFormats)
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.argument("input_path", metavar="INPUT", type=_INPUT_PATH)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the output: .npy as (C, *spatial) float32, or a plugin's format "
    "(a NIfTI holds channels on its last axis, on the input's grid).",
)
@_window_options
@click.option("--output-name", default=None, help="The model output to write (default: the "
              "segmentation output explanations explain).")  # fmt: skip
@_PROVIDER_OPTION
@click.option("--input-key", default=None, help="Array to read from an .npz INPUT.")
@click.option(
    "--card",
    default=None,
    help="Model card (TOML): how to prepare inputs and run the model (default: "
    "MODEL.card.toml if present).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors_exit_2
def predict_command(
    model: str,
    input_path: str,
    out: str,
    patch: str | None,
    overlap: float | None,
    output_name: str | None,
    provider: str,
    input_key: str | None,
    card: str | None,
    as_json: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Write MODEL's output for INPUT, as the model is deployed: whole, or fused from a
    sliding window (the card's [inference], or --patch).

    The output is the model's own (after its own final activation, if it has one), all
    channels, on INPUT's grid: what every method explains.
    """
    import numpy as np

    from segattr_onnx.arrays import upsample
    from segattr_onnx.card import ModelCard, card_for
    from segattr_onnx.files import check_output_path, read_image, save_array
    from segattr_onnx.graph.loading import load_model
    from segattr_onnx.prediction import predict

    loaded = load_model(model)
    protected = _run_inputs(loaded, input_path, "all", None, card)
    check_output_path(out, force, protected)
    image = read_image(input_path, input_key, preferred="image")
    model_card = card_for(
        image, ModelCard.load(card) if card is not None else ModelCard.beside(model)
    )
    x = model_card.prepare_image(image) if model_card is not None else image.array
    window = _window(model_card, patch, overlap)
    explainer = _api("Explainer")(loaded, provider=provider)
    if model_card is not None and model_card.channel_axis(image) is not None:
        x = explainer.place_channels(x)
    prediction = predict(explainer, x, window, output_name, progress=not quiet)
    values = prediction.values
    if model_card is not None and model_card.resamples:
        original = model_card.spatial_shape(image)
        if values.shape[1:] != original:  # back onto the image it was asked about
            values = upsample(values, original).astype(np.float32)
    if Path(out).suffix != ".npy":  # image formats hold channels last, and none for one
        values = values[0] if values.shape[0] == 1 else np.moveaxis(values, 0, -1)
    written = save_array(out, values, force=force, protected=protected, like=image)
    summary = {**prediction.summary(), "shape": list(values.shape), "out": str(written)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        how = f"{prediction.windows} windows" if window is not None else "one run"
        click.echo(
            f"output {prediction.output!r} ({how}, {prediction.seconds:.2f} s); "
            f"{'x'.join(map(str, values.shape))} written to {written}"
        )


@main.command("score", cls=_WithPluginFormats)
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.argument("input_path", metavar="INPUT", type=_INPUT_PATH)
@click.option("--map", "map_path", required=True, help="The attribution map (.npy).")
@_target_options
@click.option(
    "--variant",
    type=click.Choice(("p1", "p2")),
    default="p2",
    show_default=True,
    help="How the map is scaled to [0, 1]: p2 divides by its max, p1 uses minmax.",
)
@_PROVIDER_OPTION
@_MEMORY_BUDGET_OPTION
@click.option("--input-key", default=None, help="Array to read from an .npz INPUT.")
@click.option(
    "--card",
    default=None,
    help="Model card (TOML) saying how to prepare inputs, as explain uses it (default: "
    "MODEL.card.toml if present); the map and labels are on the image as read.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_score_options
@_window_options
@_executor_options
@_user_errors_exit_2
def score_command(
    model: str,
    input_path: str,
    map_path: str,
    class_index: int | None,
    output_name: str | None,
    class_axis: int | None,
    activation: str,
    region: str,
    target_preset: str | None,
    region_label: int | None,
    variant: str,
    provider: str,
    memory_budget: str | None,
    input_key: str | None,
    card: str | None,
    as_json: bool,
    quiet: bool,
    labels_path: str | None,
    baseline: str,
    steps: int,
    patch: str | None,
    overlap: float | None,
    executor: str | None,
    ray_address: str | None,
    workers: int | None,
    worker_cpus: float | None,
    worker_gpus: float | None,
) -> None:
    """Score an attribution map of INPUT on MODEL: Prediction Preserved, Image Preserved,
    Excess Prediction, deletion/insertion AUC, and with --labels Attribution Quality.

    The model card prepares INPUT as explain does; a map or labels on the image as read (what
    explain writes) are brought onto the prepared input."""
    import numpy as np

    from segattr_onnx.arrays import resize_nearest, upsample
    from segattr_onnx.card import ModelCard, card_for
    from segattr_onnx.files import input_budget, load_array, read_image
    from segattr_onnx.metrics.scoring import score_map

    budget = _memory_budget(memory_budget)
    settings = _executor_settings(executor, ray_address, workers, worker_cpus, worker_gpus)
    backend = _executor_backend(settings)
    with input_budget(budget):  # an input bigger than the budget is refused from its header
        image = read_image(input_path, input_key, preferred="image")
    model_card = card_for(
        image, ModelCard.load(card) if card is not None else ModelCard.beside(model)
    )
    x = model_card.prepare_image(image) if model_card is not None else image.array
    attribution = read_image(map_path).array
    labels = (
        load_array(labels_path, key_option="a .npy holding only the labels", preferred="labels")
        if (labels_path is not None)
        else None
    )
    target = _target(
        class_index, output_name, class_axis, activation, region, region_label, target_preset
    )
    explainer = _api("Explainer")(model, provider=provider, memory_budget=budget, executor=backend)
    if model_card is not None:
        target = model_card.apply_target(target)
        channels = model_card.channel_axis(image) is not None
        if model_card.resamples:
            spatial = x.shape[1:] if channels else x.shape
            if attribution.shape != spatial[-attribution.ndim :]:
                attribution = np.clip(upsample(attribution, spatial[-attribution.ndim :]), 0, 1)
            if labels is not None:
                labels = resize_nearest(np.asarray(labels), spatial[-labels.ndim :])
        if channels:
            x = explainer.place_channels(x)
    scores = score_map(
        explainer,
        x,
        attribution,
        labels,
        target,
        variant,
        baseline,
        steps or None,
        progress=not quiet,
        window=_window(model_card, patch, overlap),
    )
    if as_json:
        click.echo(json.dumps(scores.to_dict(), indent=2))
    else:
        click.echo(_format_scores(scores))


@main.command("synth")
@click.option("--dim", type=click.Choice(("2", "3")), default="3", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), required=True, help="The case's seed.")
@click.option(
    "--size", type=click.IntRange(min=32), default=None, help="Side length (default 128)."
)
@click.option("--out", required=True, help="Where to write the case (.npz: image, labels).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_user_errors_exit_2
def synth_command(dim: str, seed: int, size: int | None, out: str, force: bool) -> None:
    """Write one synthetic case with ground truth (docs/algorithms.md §6): labels 0 background,
    1 distractor nodule, 2 spikes, 3 target (spiked) nodule."""
    from segattr_onnx.synthetic import make_case, save_case

    case = make_case(seed, dim=int(dim), size=size)
    written = save_case(case, out, force=force)
    counts = {int(label): int((case.labels == label).sum()) for label in range(4)}
    click.echo(
        f"case {seed} ({'x'.join(map(str, case.image.shape))}) written to {written}; "
        f"voxels per label {counts}"
    )


@main.command("audit")
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--resume",
    is_flag=True,
    help="Reuse results an interrupted run stored, where every file and setting behind them "
    "is unchanged (by content); without it every case is computed afresh.",
)
@click.option("--force", is_flag=True, help="With --resume: recompute all the same.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="As for explain; overrides the config's memory_budget.",
)
@click.option(
    "--provider",
    default=None,
    help="auto, cpu, cuda or a plugin's provider list; overrides the config's provider.",
)
@click.option(
    "--output",
    default=None,
    help="Folder for audit.json, junit.xml and the stored results; overrides the config's "
    "output (which must stay inside the config's folder).",
)
@_executor_options
def audit_command(
    config: str,
    resume: bool,
    force: bool,
    quiet: bool,
    as_json: bool,
    memory_budget: str | None,
    provider: str | None,
    output: str | None,
    executor: str | None,
    ray_address: str | None,
    workers: int | None,
    worker_cpus: float | None,
    worker_gpus: float | None,
) -> None:
    """Explain and score every case of an audit CONFIG (TOML) and check the thresholds.

    Exit code 0 when every check passes, 1 when one fails, 2 on bad configuration or input,
    130 when interrupted. Writes audit.json and junit.xml (one test case per case x method x
    check) to the config's output folder; a run that does not finish leaves reports saying so.
    """
    settings = _executor_settings(executor, ray_address, workers, worker_cpus, worker_gpus)
    report = _run_audit(config, resume, force, quiet, memory_budget, provider, output, settings)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in report.results], indent=2))
    else:
        click.echo("\n".join(printable(line) for line in report.summary_table().splitlines()))
        failed = len(report.failures)
        click.echo(
            f"{len(report.results) - failed} of {len(report.results)} checks passed "
            f"({report.computed} case runs computed, {report.reused} reused); "
            f"results in {report.json_path} and {report.junit_path}"
        )
    sys.exit(0 if report.passed else 1)


@_user_errors_exit_2
def _run_audit(
    config: str,
    resume: bool,
    force: bool,
    quiet: bool,
    memory_budget: str | None,
    provider: str | None,
    output: str | None,
    settings: tuple[str | None, ExecutorOptions | None],
) -> AuditReport:
    from segattr_onnx.audit import audit

    return audit(  # the budget is read there, so that a bad one also voids old reports
        config,
        force=force,
        progress=not quiet,
        memory_budget=memory_budget,
        resume=resume,
        provider=provider,
        output=output,
        executor=settings[0],
        executor_options=settings[1],
    )


@main.command("plugins")
def plugins_command() -> None:
    """List installed plugins and what each adds (methods, readers, writers)."""
    from segattr_onnx.methods.registry import method_names
    from segattr_onnx.plugins import registry

    plugins = registry().plugins
    click.echo(f"methods: {', '.join(method_names())}")
    if not plugins:
        click.echo("no plugins installed (e.g. pip install ./plugins/segattr-medical)")
    for plugin in plugins:
        state = f"FAILED: {plugin.error}" if plugin.error else "; ".join(plugin.provides)
        click.echo(f"{plugin.name} ({plugin.source}): {state}")


def _run_inputs(
    model: LoadedModel, input_path: str, region: str, labels: str | None, card: str | None
) -> tuple[str, ...]:
    """Every file a run reads, which no output of it may replace: the model and its external
    data, the input (a file or a folder), the region, the labels and the model card."""
    from segattr_onnx.graph.loading import external_data_files

    assert model.path is not None
    beside = model.path.with_suffix(".card.toml")
    candidates = [str(model.path), input_path, region, labels, card, str(beside)]
    files = [c for c in candidates if c is not None and Path(c).exists()]
    return (*files, *map(str, external_data_files(model)))


def _spatial_image(explainer: Explainer, x: np.ndarray, windowed: bool = False) -> np.ndarray:
    """The input for pictures: a 2D colour (3-channel) input as (H, W, 3), in colour; any
    other input's first channel, spatial axes only. A windowed input is never analysed whole
    (a model fixed at its patch size could not be): its channels are first."""
    import numpy as np

    if windowed:
        array = explainer.shaped_input(x)
        axis = 1
    else:
        array = explainer.model_input(x)
        axis = explainer.analysis(array.shape).input.channel_axis
    picture = array[0]
    if axis is not None:
        if picture.shape[axis - 1] == 3 and picture.ndim == 3:
            return np.moveaxis(picture, axis - 1, -1).astype(np.float64)
        picture = np.take(picture, 0, axis=axis - 1)
    return picture.astype(np.float64)


@main.command("export")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the explained model (.onnx; its weights go to OUT.data beside it when "
    "MODEL keeps them in external data).",
)
@click.option(
    "--method",
    type=_LazyChoice(_exportable_methods),
    default="gradcam",
    show_default=True,
    help="The gradient method the model computes next to its prediction.",
)
@_LAYERS_OPTION
@_target_options
@_VARIANT_OPTION
@click.option(
    "--input-shape",
    default=None,
    help="The input size to export for, batch 1 (e.g. 1x1x256x256); default: MODEL's own "
    "when fixed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--force", is_flag=True, help="Replace --out (and OUT.data) if they exist.")
@_user_errors_exit_2
def export_command(
    model: str,
    out: str,
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
    input_shape: str | None,
    as_json: bool,
    force: bool,
) -> None:
    """Write MODEL with its explanation built in: the original outputs unchanged plus a
    'saliency' output (the map explain writes, at input size, in [0, 1]).

    The result runs in plain onnxruntime, with nothing of segattr-onnx installed. The target
    class and region are inputs ('saliency_class', 'saliency_region') whose defaults are the
    ones chosen here.
    """
    from segattr_onnx.exporting import check_export_paths, explained_model, save_exported
    from segattr_onnx.graph.loading import load_model
    from segattr_onnx.graph.shapes import parse_shape

    loaded = load_model(model)
    target_path = check_export_paths(out, loaded, force)
    target = _target(
        class_index, output_name, class_axis, activation, region, region_label, target_preset
    )
    shape = parse_shape(input_shape) if input_shape is not None else None
    explainer = _api("Explainer")(loaded, provider="cpu")
    exported = explained_model(explainer, method, layers, target, variant, shape)
    written = save_exported(exported, target_path, loaded, force)
    if as_json:
        summary = {**exported.summary(), "files": [str(path) for path in written]}
        click.echo(json.dumps(summary, indent=2))
    else:
        shape_text = "x".join(map(str, exported.input_shape))
        click.echo(
            f"wrote {', '.join(map(str, written))}: {method} ({variant}) over "
            f"{len(exported.layers)} layers as output 'saliency', input {shape_text}"
        )


def _register_gate_commands(group: click.Group) -> None:
    """Add ``compare`` and ``sanity`` (``cli_gates.py``) to the group, once."""
    from segattr_onnx.cli_gates import COMMANDS

    for command in COMMANDS:
        if command.name not in group.commands:
            group.add_command(command)
