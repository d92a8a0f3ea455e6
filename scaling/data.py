"""Text sources and tokenizers.

Three kinds of text source, all read into a list of non-empty "rows" (paragraphs):
- `bundled`: CPython's own documentation topics (`pydoc_data.topics`, ~65k words of English
  prose that ships with every Python), so the demo and tests need no download; the paragraphs
  the bundled cloze task is cut from are held out of it (`bundled_heldout`);
- a Hugging Face dataset by name (the reference protocol's four sources, or any
  `hf:NAME[/CONFIG]:SPLIT:FIELD`), loaded with `datasets` on machines with network;
- a local file: `.txt` (one document per line), `.jsonl` (a `text` field per line) or `.parquet`
  (a `text` column), or a folder of such files (one kind per folder); a URI (s3://...) of them is
  read by the token-shard builder (`scaling.shards`).

`parse_text_source` is the one parser of source specs: the study's config, its dry run, the shard
builder and `condense` all accept and refuse the same specs, with the same message.

The condensation protocol (docs/condensation.md) builds each repetition's text from
consecutive rows starting at a seeded random row; training reads fixed-length blocks cut from
token shards (`scaling.shards`).

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from scaling.errors import DataError, ModelError

T = TypeVar("T")

# The reference protocol's text sources (docs/condensation.md): dataset, config, split, field.
REFERENCE_SOURCES: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext": ("wikitext", "wikitext-103-v1", "train", "text"),
    "pubmed_qa": ("pubmed_qa", "pqa_labeled", "train", "long_answer"),
    "imdb": ("imdb", None, "train", "text"),
    "squad": ("squad", None, "train", "context"),
}
TRAINING_SOURCES: dict[str, tuple[str, str | None, str, str]] = {
    # Training reads wikitext-103 in its raw form, as the authors' mid-training does; the reference's
    # condensation protocol measures on the tokenised-for-LM version above (wikitext-103-v1).
    "wikitext": ("wikitext", "wikitext-103-raw-v1", "train", "text"),
}
DEFAULT_MIN_WORDS = 1024
START_FRACTION = 0.95  # the reference draws the start row below 95% of the rows
DEFAULT_CACHE = Path.home() / ".cache" / "dispersion-scaling"
PACKINGS = ("eos", "raw")
"""How rows become one token stream: eos puts an end-of-text token after every row; raw concatenates them as
they are, newlines kept (the authors' mid-training data)."""


@dataclass(frozen=True)
class TextSource:
    """Where texts come from. Build one with `parse_text_source`."""

    kind: str
    """`bundled`, `hf` or `file`."""
    name: str = ""
    """Dataset name (hf) or a label."""
    config: str | None = None
    """Dataset config (hf), e.g. `wikitext-103-v1`."""
    split: str = "train"
    """Dataset split (hf)."""
    field: str = "text"
    """Column (hf) or JSON key (jsonl) holding the text."""
    path: str | None = None
    """Local file (file)."""

    @property
    def label(self) -> str:
        """Short human name, used in tags and file names."""
        if self.kind == "file":
            return Path(self.path or "").stem
        return self.name


FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file", "hf")
"""URI schemes pyarrow's filesystems (and `scaling.storage` for hf://) read."""
PARQUET_MAGIC = b"PAR1"


def parse_text_source(spec: str, *, training: bool = False) -> TextSource:
    """`bundled`, a reference name (`wikitext`, `pubmed_qa`, `imdb`, `squad`),
    `hf:NAME[/CONFIG]:SPLIT:FIELD`, a `.txt`/`.jsonl`/`.parquet` file or a folder of them (checked
    here: present, not empty, readable), or such a file or folder as a URI (s3://...: checked by the
    shard builder, which reads it). With `training`, `wikitext` means the raw version the authors train on."""
    spec = spec.strip()
    if spec == "bundled":
        return TextSource(kind="bundled", name="bundled")
    named = {**REFERENCE_SOURCES, **TRAINING_SOURCES} if training else REFERENCE_SOURCES
    if spec in named:
        name, config, split, field = named[spec]
        return TextSource(kind="hf", name=name, config=config, split=split, field=field)
    if spec.startswith("hf:"):
        name, config, split, field = parse_hf_spec(spec)
        return TextSource(kind="hf", name=name, config=config, split=split, field=field)
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme not in STORAGE_SCHEMES:
            raise DataError(f"text source {spec[:80]!r}: scheme {scheme[:20]!r} is not storage the shard builder reads; "
                            f"use one of {', '.join(s + '://' for s in STORAGE_SCHEMES)} or a local path")
        return TextSource(kind="file", name=Path(spec.split("?", 1)[0].rstrip("/")).stem or "source", path=spec)
    path = Path(spec).expanduser()
    if spec.endswith(FILE_SUFFIXES) or path.exists():
        local_text_files(spec)
        return TextSource(kind="file", name=path.resolve().stem, path=str(path.resolve()))
    if len(spec) > 200 or not spec:
        raise DataError(f"text source {spec[:60]!r}... is not understood: use 'bundled', one of "
                        f"{sorted(REFERENCE_SOURCES)}, 'hf:NAME[/CONFIG]:SPLIT:FIELD', or a .txt/.jsonl/.parquet "
                        "file or folder")
    raise DataError(
        f"text source {spec!r} is not understood: use 'bundled', one of "
        f"{sorted(REFERENCE_SOURCES)}, 'hf:NAME[/CONFIG]:SPLIT:FIELD', or a .txt/.jsonl/.parquet file or a folder "
        "of them (no such file or folder here)"
    )


def local_text_files(spec: str) -> list[Path]:
    """The files of a local source (one file, or a folder's .txt/.jsonl/.parquet files of one kind, sorted),
    refusing a missing, empty or unreadable one: checks of a stat and a few bytes, so a study is refused
    before any work rather than once Ray has started."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"text source {spec!r}: no such file or folder; check the path (relative paths are from "
                        "the working directory)")
    if path.is_dir():
        try:
            files = pick_text_files(spec, [f for f in path.iterdir() if f.is_file()], str, folder=True)
        except OSError as exc:
            raise DataError(f"text source {spec!r}: the folder cannot be listed ({exc.strerror}); "
                            "check its permissions") from None
    else:
        files = pick_text_files(spec, [path], str, folder=False)
    for file in files:
        try:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                head = handle.read(len(PARQUET_MAGIC))
                if file.suffix == ".parquet" and size >= 2 * len(PARQUET_MAGIC):
                    handle.seek(size - len(PARQUET_MAGIC))
                    head += handle.read()
        except OSError as exc:
            raise DataError(f"text source {str(file)!r} cannot be read ({exc.strerror}); check its permissions") from None
        if size == 0:
            raise DataError(f"text source {str(file)!r} is empty (0 bytes); give a file with text")
        if file.suffix == ".parquet" and head != PARQUET_MAGIC * 2:
            raise DataError(f"text source {str(file)!r} is not a parquet file (no PAR1 marks); check the file")
    return files


def pick_text_files(spec: str, entries: list[T], path_of: Callable[[T], str], *, folder: bool) -> list[T]:
    """The one rule for the files of a file source, local or on storage (`scaling.shard_sources` lists those):
    a .txt/.jsonl/.parquet file, or a folder's files of those kinds, sorted by path and all of one kind.
    `entries` are the folder's files (`folder`), else the one file; `path_of` gives an entry's path."""
    if not folder:
        if Path(path_of(entries[0])).suffix not in FILE_SUFFIXES:
            raise DataError(f"text source {spec!r}: expected a .txt, .jsonl or .parquet file (or a folder of them)")
        return list(entries)
    files = sorted((e for e in entries if Path(path_of(e)).suffix in FILE_SUFFIXES), key=path_of)
    if not files:
        raise DataError(f"text source {spec!r}: a folder without .txt/.jsonl/.parquet files; "
                        "point at a file or a folder of them")
    kinds = sorted({Path(path_of(e)).suffix for e in files})
    if len(kinds) > 1:
        raise DataError(f"text source {spec!r}: mixes {kinds} files; keep one kind per folder")
    return files


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, str]:
    """`hf:NAME[/CONFIG]:SPLIT:FIELD` -> (name, config, split, field). NAME may be `org/name`, which then
    needs its config (`hf:HuggingFaceFW/fineweb-edu/sample-10BT:train:text`, or `/default`), or a local
    folder that `datasets` can load."""
    parts = spec[3:].split(":")
    if len(parts) != 3 or not all(parts):
        raise DataError(f"text source {spec!r}: expected hf:NAME[/CONFIG]:SPLIT:FIELD, "
                        "e.g. hf:HuggingFaceFW/fineweb-edu/sample-10BT:train:text")
    name_config, split, field = parts
    if Path(name_config).is_dir():
        return name_config, None, split, field
    pieces = name_config.split("/")
    if len(pieces) > 3:
        raise DataError(f"text source {spec!r}: NAME[/CONFIG] has too many '/'; use ORG/NAME/CONFIG")
    name = "/".join(pieces[:2]) if len(pieces) == 3 else pieces[0]
    return name, pieces[-1] if len(pieces) > 1 else None, split, field


def read_rows(source: TextSource, limit: int | None = None, *, raw: bool = False) -> list[str]:
    """The non-empty rows of a source, in order, stripped (the first `limit` of them: a Hugging Face
    dataset is then streamed, not downloaded whole). `raw`: every row as the source has it, empty ones
    included (what the authors' sampler indexes)."""
    if source.kind == "bundled":
        rows = bundled_rows()
    elif source.kind == "file":
        rows = _read_file_rows(Path(source.path or ""), source.field)
    elif source.kind == "hf":
        rows = _read_hf_rows(source, limit)
    else:
        raise DataError(f"text source kind {source.kind!r} is unknown: use bundled, hf or file")
    if raw and any(row.strip() for row in rows[:limit]):
        return list(rows[:limit])
    rows = [r for r in (row.strip() for row in rows) if r][:limit]
    if not rows:
        raise DataError(f"text source {source.label!r} has no non-empty text; check its field/contents")
    return rows


BUNDLED_HELDOUT_SHARE = 0.35
"""About this share of the bundled corpus' prose paragraphs is held out of the `bundled` source: the
bundled cloze task's validation and test passages come only from them (`scaling.eval_tasks.build`), so
no token of the bundled training text (train or validation blocks, whatever `val_fraction`) holds them."""
PROSE_MIN_WORDS = 16
PROSE_MIN_SHARE = 0.8
"""A prose paragraph: at least PROSE_MIN_WORDS words, this share of them word-like (no code listings)."""
_WORDLIKE = re.compile(r"[\"'(]?[A-Za-z][a-z'-]*[\"')]?[,.;:]?")


def is_prose(words: list[str]) -> bool:
    """Whether a paragraph (split into words) reads as English prose rather than code or a table."""
    if len(words) < PROSE_MIN_WORDS:
        return False
    return sum(bool(_WORDLIKE.fullmatch(w)) for w in words) >= PROSE_MIN_SHARE * len(words)


def bundled_heldout(row: str) -> bool:
    """The one rule that keeps the bundled evaluation out of the bundled training text: a prose
    paragraph whose whitespace-normalised text hashes below BUNDLED_HELDOUT_SHARE. It reads the text
    alone (not its position), so every copy of a repeated paragraph goes the same way."""
    words = row.split()
    if not is_prose(words):
        return False
    digest = hashlib.sha256(("bundled-heldout\x1f" + " ".join(words)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < BUNDLED_HELDOUT_SHARE * 2**64


def bundled_corpus_rows() -> list[str]:
    """Every paragraph of `pydoc_data.topics`, held-out ones included (the cloze task's builder reads
    these; training and probes read `read_rows` of the `bundled` source, which leaves them out)."""
    from pydoc_data.topics import topics

    # Paragraphs of every topic, in a fixed (sorted) order so that seeds mean the same thing
    # on every machine with the same Python minor version.
    return [p for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])]


def bundled_rows() -> list[str]:
    """The `bundled` source's rows: every paragraph but the held-out ones (`bundled_heldout`)."""
    return [row for row in bundled_corpus_rows() if not bundled_heldout(row)]


def _read_file_rows(path: Path, field: str) -> list[str]:
    if path.is_dir() or path.suffix == ".parquet":
        return [row for file in local_text_files(str(path)) for row in
                (_read_parquet_rows(file, field) if file.suffix == ".parquet" else _read_file_rows(file, field))]
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} not found; check the path")
    data = path.read_bytes()
    try:
        if b"\x00" in data:  # UTF-16, images, archives: decodable by luck or not at all, never text
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "give a .txt file (one document per line) or a .jsonl file with a text field") from None
    if path.suffix != ".jsonl":
        return lines
    return [json_text(line, field, f"{path}:{number}") for number, line in enumerate(lines, start=1) if line.strip()]


def _read_parquet_rows(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several kinds for a bad file or a missing column
        raise DataError(f"text source {str(path)!r}: cannot read column {field!r} ({type(exc).__name__}); "
                        "check the file and the field name") from None
    return [row for row in table.column(0).to_pylist() if isinstance(row, str)]


def json_text(line: str, field: str, where: str) -> str:
    """The text of one .jsonl record: `field` of the JSON object on `line` (`where` names it in errors)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); one JSON object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{where}: expected an object with a string field {field!r}; set the field name")
    return record[field]


def _read_hf_rows(source: TextSource, limit: int | None = None) -> list[str]:
    import itertools

    import datasets

    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=limit is not None)
        columns = dataset.column_names if limit is None else list(dataset.features or {})
    except Exception as exc:  # noqa: BLE001 -- datasets raises many kinds; all mean "cannot load"
        raise DataError(
            f"cannot load dataset {source.name!r} (config {source.config!r}, split {source.split!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "It needs network access to the Hugging Face hub (or a local cache); offline, use "
            "'bundled' or a local .txt/.jsonl file"
        ) from None
    if columns and source.field not in columns:
        raise DataError(f"dataset {source.name!r} has no column {source.field!r}; columns: {columns}")
    if limit is None:
        return list(dataset[source.field])
    return [row[source.field] for row in itertools.islice(dataset, limit)]


def sample_texts(rows: Sequence[str], repetitions: int, min_words: int = DEFAULT_MIN_WORDS) -> list[str]:
    """The reference protocol: text r is consecutive rows from a start row drawn with
    `numpy.random.default_rng(r)` below 95% of the rows, joined until it has >= min_words words
    (or the rows run out). `rows` needs only len() and indexing: a lazy reader (token shards)
    decodes just the rows read."""
    if repetitions < 1:
        raise DataError(f"repetitions={repetitions}: must be at least 1")
    if not rows:
        raise DataError("no rows to sample texts from; the text source is empty")
    texts = []
    for r in range(repetitions):
        start = int(np.random.default_rng(r).integers(0, max(1, int(START_FRACTION * len(rows)))))
        chunk, words = [], 0
        for index in range(start, len(rows)):
            row = rows[index]
            chunk.append(row)
            words += len(row.split())
            if words >= min_words:
                break
        texts.append(" ".join(chunk))
    return texts


def sample_reference_texts(rows: Sequence[str], repetitions: int, min_words: int = DEFAULT_MIN_WORDS,
                           count_words=None) -> list[str]:
    """The authors' sampler, rule for rule (LM-Dispersion's `get_random_long_text`, behind the paper's
    heatmaps): text r starts at the row drawn by `numpy.random.default_rng(r).integers(0, int(0.95 x rows))`
    and appends the dataset's rows as they are (empty ones included, no separator: wikitext's rows carry
    their own spaces and newlines) until `count_words` (nltk's `word_tokenize`: punctuation counts) reaches
    `min_words`, or the rows run out. `rows` are the split's raw rows (`read_rows(..., raw=True)`)."""
    if repetitions < 1:
        raise DataError(f"repetitions={repetitions}: must be at least 1")
    if not len(rows):
        raise DataError("no rows to sample texts from; the text source is empty")
    count = count_words or word_counter()
    texts = []
    for r in range(repetitions):
        index = int(np.random.default_rng(seed=r).integers(0, max(1, int(len(rows) * START_FRACTION))))
        text = ""
        while count(text) < min_words and index < len(rows):
            text += rows[index]
            index += 1
        texts.append(text)
    return texts


def word_counter():
    """Words as the authors count them: nltk's `word_tokenize` (Punkt sentences, then Treebank words). Without
    nltk's English Punkt data (it is downloaded, not installed) Punkt's untrained default splits the sentences:
    the same but for abbreviations it would know (counts within a word or two per text)."""
    try:
        import nltk
    except ImportError:
        return lambda text: len(text.split())
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return lambda text: len(nltk.word_tokenize(text))
    except LookupError:
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
        return lambda text: sum(len(words.tokenize(sentence)) for sentence in sentences.tokenize(text))


def cycle_texts(texts: list[str], repetitions: int) -> list[str]:
    """`--texts FILE` semantics: repetition r uses text r modulo the number of texts."""
    if not texts:
        raise DataError("the texts file has no non-empty line; add one document per line")
    return [texts[r % len(texts)] for r in range(repetitions)]


def read_measurement_texts(spec: str, repetitions: int) -> tuple[list[str], dict]:
    """The R texts a condensation measurement runs on, and where they came from.

    A local file gives document r mod n (its documents are the texts); any other source the
    reference protocol (consecutive rows from a seeded start until >= 1024 words).
    """
    source = parse_text_source(spec)
    rows = read_rows(source)
    if source.kind == "file":
        texts, protocol = cycle_texts(rows, repetitions), "text r = document r mod n"
    else:
        texts = sample_texts(rows, repetitions)
        protocol = "reference: consecutive rows from a seeded random start until >= 1024 words"
    info = {"spec": spec, "kind": source.kind, "label": source.label, "rows": len(rows),
            "distinct_texts": len(set(texts)), "protocol": protocol}
    return texts, info


# --- tokenizers ---------------------------------------------------------------------------


def build_tokenizer(
    name_or_path: str | None,
    *,
    rows: list[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: Path | None = None,
):
    """A fast tokenizer: loaded by hub name or local path when `name_or_path` is given,
    otherwise a byte-level BPE trained here on `rows` and cached by content hash."""
    from transformers import AutoTokenizer

    if name_or_path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"cannot load tokenizer {name_or_path!r}: {type(exc).__name__}. "
                "Give a local directory with tokenizer files, or a hub name on a machine with network"
            ) from None
    else:
        if not rows:
            raise DataError("training a tokenizer needs text rows; give a text source with text")
        tokenizer = _train_bpe(rows, vocab_size, cache_dir or DEFAULT_CACHE / "tokenizers")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _train_bpe(rows: list[str], vocab_size: int, cache_root: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    digest = hashlib.sha256()
    digest.update(f"bpe-v1|{vocab_size}|".encode())
    for row in rows:
        digest.update(row.encode("utf-8"))
        digest.update(b"\n")
    directory = cache_root / digest.hexdigest()[:16]
    if not (directory / "tokenizer.json").is_file():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(rows, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        fast = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.save_pretrained(tmp)
        try:
            tmp.replace(directory)
        except OSError:  # another process finished the same tokenizer first: keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return GPT2TokenizerFast.from_pretrained(directory)

