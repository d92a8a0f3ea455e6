"""`python -m scaling.condense`: measure embedding condensation of a causal LM.

    python -m scaling.condense --model gpt2 --dataset wikitext --out runs/gpt2-wikitext
    python -m scaling.condense --model ./my-model --texts docs.txt --repetitions 20

Writes DIR/condensation.json and DIR/heatmap.png, prints a per-layer table and the
Spearman/Kendall trend. The path is parse -> read texts -> check the output folder -> load and
measure (`scaling.measure`, the path observation studies use too) -> write.

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from scaling.errors import ConfigError

DEFAULT_REPETITIONS = 100
DEFAULT_MAX_LENGTH = 512
DEFAULT_LAST_N = 4
MAX_REPETITIONS = 100_000
"""Texts measured at most: each is a forward pass and a layer-by-token cosine matrix (the reference: 100)."""


@dataclass(frozen=True)
class CondenseOptions:
    """What one `condense` run measures and where it writes."""

    model: str
    """Hub name or local folder of a causal LM."""
    tokenizer: str | None
    """Tokenizer name/folder; None = the model's own."""
    dataset: str | None
    """Text source for the reference protocol (`bundled`, `wikitext`, `hf:...`); None with `texts`."""
    texts: str | None
    """A .txt (one document per line), .jsonl or .parquet file, or a folder of them; repetition r uses document r
    mod n."""
    repetitions: int
    """Texts measured (R)."""
    max_length: int
    """Tokens per text (T); longer texts are truncated."""
    device: str
    """auto, cpu, cuda or cuda:N."""
    dtype: str
    """auto, float32, bfloat16 or float16."""
    out: Path
    """Output folder."""
    last_n: int
    """Summarise the mean cosine of the last N hidden states."""
    effective_rank: bool
    """Compute RankMe per layer (costly on CPU for wide models)."""
    progress: bool
    """Show a progress bar."""
    num_actors: int = 0
    """Reduce the hidden states on this many Ray actors (0: in this process)."""
    batch_size: int | None = None
    """Texts per forward pass; None: as many as fit a share of the device's free memory."""

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1 (omit it to size batches "
                              "from free memory)")
        if not 1 <= self.repetitions <= MAX_REPETITIONS:
            raise ConfigError(f"--repetitions {self.repetitions}: must be in 1..{MAX_REPETITIONS:,} (the reference: 100)")
        if self.max_length < 1:
            raise ConfigError(f"--max-length {self.max_length}: must be at least 1")
        if self.num_actors < 0:
            raise ConfigError(f"--num-actors {self.num_actors}: must be >= 0 (0 measures in this process)")
        if self.last_n < 1:
            raise ConfigError(f"--last-n {self.last_n}: must be at least 1")
        if (self.dataset is None) == (self.texts is None):
            raise ConfigError("give exactly one of --dataset NAME or --texts FILE")

    @property
    def source_spec(self) -> str:
        return self.texts if self.texts is not None else self.dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scaling.condense",
        description="Measure embedding condensation (per-layer token cosine similarity) of a causal LM.",
    )
    parser.add_argument("--model", required=True, help="hub name or local folder of a causal LM")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name/folder (default: the model's)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", default=None,
                        help="bundled (default), wikitext, pubmed_qa, imdb, squad, or hf:NAME[/CONFIG]:SPLIT:FIELD")
    source.add_argument("--texts", default=None,
                        help=".txt (one document per line), .jsonl (a 'text' field) or .parquet file, or a folder of them; "
                             "text r = document r mod n")
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS, help="texts measured (R)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per text (T)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (= float32, as the reference), float32, bfloat16 or float16 (GPU only)")
    parser.add_argument("--out", default=None, help="output folder (default: condensation/<model>__<source>)")
    parser.add_argument("--last-n", type=int, default=DEFAULT_LAST_N, help="summarise the last N hidden states")
    parser.add_argument("--no-effective-rank", action="store_true", help="skip RankMe (faster on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="texts per forward pass (default: as many as fit a share of the free memory)")
    parser.add_argument("--num-actors", type=int, default=0,
                        help="reduce the hidden states on N Ray actors (joins a running Ray cluster, else starts "
                             "a local one); 0 = in this process")
    return parser


def parse_options(argv: list[str] | None = None) -> CondenseOptions:
    args = build_parser().parse_args(argv)
    dataset = args.dataset if args.dataset is not None or args.texts is not None else "bundled"
    source_label = Path(args.texts).stem if args.texts else dataset.replace("/", "_").replace(":", "_")
    out = Path(args.out) if args.out else Path("condensation") / f"{Path(args.model).name}__{source_label}"
    return CondenseOptions(
        model=args.model, tokenizer=args.tokenizer, dataset=None if args.texts else dataset, texts=args.texts,
        repetitions=args.repetitions, max_length=args.max_length, device=args.device, dtype=args.dtype,
        out=out, last_n=args.last_n, effective_rank=not args.no_effective_rank, progress=not args.no_progress,
        num_actors=args.num_actors, batch_size=args.batch_size,
    )


def build_measure_task(options: CondenseOptions):
    """The measurement of `options` as the one path condense and observation studies share."""
    from scaling.measure import MeasureTask

    return MeasureTask(model_path=options.model, tokenizer=options.tokenizer, device=options.device,
                       dtype=options.dtype, max_length=options.max_length, num_actors=options.num_actors,
                       effective_rank=options.effective_rank, last_n=options.last_n,
                       batch_size=options.batch_size)


def format_table(result, last_n: int) -> str:
    """A readable per-layer table plus the trend."""

    def number(value: float, width: int = 10, digits: int = 4) -> str:
        return f"{'n/a':>{width}}" if not math.isfinite(value) else f"{value:>{width}.{digits}f}"

    lines = [f"{'layer':>5} {'fraction':>8} {'mean_cos':>10} {'offdiag':>10} {'eff_rank':>10}"]
    for layer in range(result.num_layers):
        lines.append(f"{layer:>5} {result.layer_fractions[layer]:>8.3f} {number(result.mean_cosine[layer])} "
                     f"{number(result.mean_cosine_offdiag[layer])} {number(result.effective_rank[layer], digits=2)}")
    last_n = min(last_n, result.num_layers)
    lines += [
        f"spearman {number(result.spearman, 0)}   kendall {number(result.kendall, 0)}   "
        "(+1 = similarity rises with depth = condensation)",
        f"mean_cos last {last_n} {result.mean_last(last_n):.4f}   late half {result.late_half_mean:.4f}   "
        f"texts {result.num_sequences}, tokens {result.min_length}..{result.max_length}",
    ]
    return "\n".join(lines)


def run(options: CondenseOptions) -> tuple[Path, Path]:
    """check (cheapest first) -> read texts -> load and measure -> write; prints the table."""
    from scaling.console import check_writable_dir
    from scaling.data import read_measurement_texts
    from scaling.model import (check_device_name, check_dtype_name, check_last_n, check_max_length,
                               check_model_reference, config_depth, context_length, read_local_config)

    # Bad input fails here in a fraction of a second: no torch or transformers import yet.
    if options.texts is not None:  # the one source parser: a .txt/.jsonl/.parquet file or a folder of them
        from scaling.data import local_text_files

        local_text_files(options.texts)
    check_dtype_name(options.dtype, check_device_name(options.device))
    config = read_local_config(check_model_reference(options.model))
    if config is not None:
        check_max_length(options.max_length, context_length(config), repr(options.model))
        check_last_n(options.last_n, config_depth(config))
    texts, source_info = read_measurement_texts(options.source_spec, options.repetitions)
    check_writable_dir(options.out)

    from scaling.measure import measure_model
    from scaling.model import resolve_device, resolve_dtype
    from scaling.plots import write_condensation_record

    resolve_dtype(options.dtype, resolve_device(options.device))  # CUDA present? before any loading
    if options.num_actors:
        from scaling.cluster import connect_ray

        connect_ray()
    from transformers.utils import logging as hf_logging

    if not options.progress:
        hf_logging.disable_progress_bar()  # the weight-loading bar too: quiet means quiet
    try:
        measurement = measure_model(build_measure_task(options), texts, progress=options.progress)
    finally:
        hf_logging.enable_progress_bar()
    result = measurement.result
    metadata = {"model": options.model, "repetitions": options.repetitions, "max_length": options.max_length,
                "source": source_info, **measurement.metadata(),
                "options": {key: str(value) for key, value in asdict(options).items()}}
    title = f"{Path(options.model).name} on {source_info['label']} (R={result.num_sequences}, T={result.max_length})"
    paths = write_condensation_record(result, options.out, title=title, metadata=metadata, last_n=options.last_n)
    print(f"{options.model} ({measurement.num_params:,} parameters) on {source_info['label']}")
    print(format_table(result, options.last_n))
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line on stderr and return 2."""
    from scaling.console import quiet_libraries, run_cli

    def body() -> int:
        options = parse_options(argv)
        quiet_libraries()
        run(options)
        return 0

    return run_cli(body, "condense")


if __name__ == "__main__":
    sys.exit(main())
