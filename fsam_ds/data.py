"""Texts, tokenizers and fixed-length token blocks for causal-LM training.

The pieces, in the order a training script uses them::

    train_texts, eval_texts = load_texts("default")          # embedded corpus, no network
    tokenizer = get_tokenizer(train_texts, vocab_size=4096)  # trained once, then cached
    train = TokenBlocks(train_texts, tokenizer, seq_len=256)
    for batch in micro_batches(train, micro_batch_size=8, rank=rank, world_size=world):
        ...                                                  # batch["input_ids"]: [8, 256]

Everything is deterministic given its arguments. Tokenizers and token ids are cached under
``~/.cache/fsam_ds`` (or ``$FSAM_DS_CACHE``, or ``$XDG_CACHE_HOME/fsam_ds``); cache files are
written atomically, so several ranks may build the same cache at once.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "EMBEDDED_CORPORA",
    "cache_root",
    "read_embedded_corpus",
    "is_wikitext",
    "split_wikitext_articles",
    "split_paragraphs",
    "split_documents",
    "load_texts",
    "get_tokenizer",
    "token_ids",
    "TokenBlocks",
    "micro_batch_indices",
    "micro_batches",
    "eval_batches",
]

#: The one special token of trained tokenizers: end of document, also used as bos and pad.
EOS_TOKEN = "<|endoftext|>"

#: Corpus names accepted by :func:`load_texts` that need no file or network.
EMBEDDED_CORPORA: dict[str, str] = {
    "default": "tinyshakespeare.txt.gz",
    "tinyshakespeare": "tinyshakespeare.txt.gz",
}

_TEXT_SUFFIXES = (".txt", ".txt.gz", ".raw", ".tokens")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_BPE_FORMAT = "fsam_ds-bytelevel-bpe-v1"
_TOKENS_FORMAT = "fsam_ds-tokens-v1"


# --------------------------------------------------------------------------------------------
# Cache locations and hashing
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of fsam_ds's caches: ``$FSAM_DS_CACHE``, else ``$XDG_CACHE_HOME/fsam_ds``, else
    ``~/.cache/fsam_ds``."""
    if os.environ.get("FSAM_DS_CACHE"):
        return Path(os.environ["FSAM_DS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fsam_ds"


def _hash_texts(h: Any, texts: Iterable[str]) -> None:
    """Feed texts into a hashlib object, length-prefixed so that boundaries matter."""
    count = 0
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        count += 1
    h.update(count.to_bytes(8, "little"))


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def read_embedded_corpus(name: str = "default") -> str:
    """The full text of an embedded corpus (see :data:`EMBEDDED_CORPORA`)."""
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; accepted: {', '.join(EMBEDDED_CORPORA)}")
    blob = resources.files("fsam_ds").joinpath("corpus").joinpath(EMBEDDED_CORPORA[name]).read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def _is_blank(line: str) -> bool:
    return not line.strip()


def _is_article_heading(line: str) -> bool:
    """``' = Title = '`` (a WikiText article title), not ``' = = Section = = '``."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def _article_heading_rows(lines: Sequence[str]) -> list[int]:
    """Indices of article headings: heading lines with a blank line (or the text's edge) on
    both sides, as WikiText writes them."""
    rows = []
    for i, line in enumerate(lines):
        if not _is_article_heading(line):
            continue
        before_ok = i == 0 or _is_blank(lines[i - 1])
        after_ok = i == len(lines) - 1 or _is_blank(lines[i + 1])
        if before_ok and after_ok:
            rows.append(i)
    return rows


def is_wikitext(text: str) -> bool:
    """Whether ``text`` is in WikiText format (has at least one ``' = Title = '`` heading)."""
    return bool(_article_heading_rows(text.splitlines()))


def _strip_blank_edges(lines: Sequence[str]) -> str:
    start, end = 0, len(lines)
    while start < end and _is_blank(lines[start]):
        start += 1
    while end > start and _is_blank(lines[end - 1]):
        end -= 1
    return "\n".join(lines[start:end])


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText-format text into articles, each starting with its ``' = Title = '`` line.

    Subsection headings (``' = = Section = = '``) stay inside their article; text before the
    first title, if any, is a document of its own.
    """
    lines = text.splitlines()
    bounds = _article_heading_rows(lines)
    if not bounds or bounds[0] != 0:
        bounds = [0, *bounds]
    bounds.append(len(lines))
    docs = (_strip_blank_edges(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return [d for d in docs if d]


def split_paragraphs(text: str) -> list[str]:
    """Split text into paragraphs separated by one or more blank lines."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if _is_blank(line):
            if current:
                docs.append("\n".join(current))
                current = []
        else:
            current.append(line)
    if current:
        docs.append("\n".join(current))
    return docs


def split_documents(text: str) -> list[str]:
    """WikiText-format text by article, any other text by paragraph."""
    return split_wikitext_articles(text) if is_wikitext(text) else split_paragraphs(text)


def _holdout(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically hold out ``eval_fraction`` of the documents (at least one when the
    fraction is positive, never all); both parts keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    n_eval = 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [d for i, d in enumerate(docs) if i not in held]
    evals = [d for i, d in enumerate(docs) if i in held]
    return train, evals


def looks_like_path(spec: str) -> bool:
    """A string meant as a local path rather than a Hugging Face dataset name
    (``name``, ``owner/name`` or ``owner/name:config``)."""
    return (
        os.path.isabs(spec)
        or spec in (".", "..")
        or spec.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in spec
        or spec.lower().endswith(_TEXT_SUFFIXES)
        or spec.count("/") >= 2
    )


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".txt", ".txt.gz")))


def _load_local(path: Path, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if path.is_file():
        return _holdout(split_documents(_read_text_file(path)), eval_fraction, seed)
    files = _text_files(path)
    if not files:
        raise ValueError(f"folder {str(path)!r} contains no .txt files")
    by_stem = {p.name.lower().split(".")[0]: p for p in files if p.parent == path}
    eval_file = by_stem.get("valid") or by_stem.get("validation")
    if "train" in by_stem and eval_file is not None:
        return (
            split_documents(_read_text_file(by_stem["train"])),
            split_documents(_read_text_file(eval_file)),
        )
    docs = [doc for f in files for doc in split_documents(_read_text_file(f))]
    return _holdout(docs, eval_fraction, seed)


def _rows_to_documents(rows: Sequence[str]) -> list[str]:
    """Rows of a dataset's text column as documents. Line-per-row WikiText (as on the Hub) is
    joined and split by article; otherwise every non-blank row is one document."""
    if any(_is_article_heading(r) for r in rows[:1000]):
        joined = "".join(r if r.endswith("\n") else r + "\n" for r in rows)
        if is_wikitext(joined):
            return split_wikitext_articles(joined)
    return [r.rstrip("\n") for r in rows if r.strip()]


def _load_hub(spec: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"cannot load texts {spec!r}: it is not an embedded corpus ({', '.join(EMBEDDED_CORPORA)}) nor an "
            "existing local file or folder, and texts from the Hugging Face Hub need the datasets package: "
            "pip install 'fsam-ds[hub]'"
        ) from None

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as err:  # network, missing dataset, bad config: all reported the same way
        raise ValueError(
            f"cannot load texts {spec!r}: it is not an embedded corpus "
            f"({', '.join(EMBEDDED_CORPORA)}), not an existing local file or folder, and "
            f"datasets.load_dataset({name!r}{', ' + repr(config) if config else ''}) failed "
            f"({type(err).__name__}: {err}). Without network access use a local .txt file or "
            "folder, or a dataset already in the Hugging Face cache with HF_DATASETS_OFFLINE=1."
        ) from err
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    split_names = list(ds.keys())
    train_split = "train" if "train" in ds else split_names[0]
    eval_split = next((s for s in ("validation", "valid") if s in ds), None)
    for split in (train_split, eval_split):
        if split is not None and "text" not in ds[split].column_names:
            raise ValueError(
                f"dataset {spec!r} split {split!r} has no 'text' column; columns: {', '.join(ds[split].column_names)}"
            )
    train_docs = _rows_to_documents(ds[train_split]["text"])
    if eval_split is None:
        return _holdout(train_docs, eval_fraction, seed)
    return train_docs, _rows_to_documents(ds[eval_split]["text"])


def load_texts(
    spec: str | os.PathLike[str] = "default", eval_fraction: float = 0.05, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Training and evaluation documents named by ``spec``.

    - ``"default"`` or ``"tinyshakespeare"``: the embedded corpus, one document per paragraph.
    - a local file (``.txt``, ``.txt.gz`` or any text file) or a folder of ``.txt`` files:
      WikiText-format text is split by article (``' = Title = '`` lines; ``' = = Sub = = '``
      subsections stay inside), any other text by blank lines. A folder holding ``train.txt``
      and ``valid.txt`` (or ``validation.txt``) uses them as the two splits.
    - anything else: ``datasets.load_dataset(name)`` (``"owner/name:config"`` selects a config)
      with its ``text`` column; its ``validation`` split is the eval split when it has one.

    Where no eval split is given, ``eval_fraction`` of the documents (chosen by ``seed``) are
    held out. A missing path raises ``ValueError`` naming it.
    """
    spec = os.fspath(spec)
    if spec in EMBEDDED_CORPORA:
        return _holdout(split_paragraphs(read_embedded_corpus(spec)), eval_fraction, seed)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, eval_fraction, seed)
    if looks_like_path(spec):
        raise ValueError(
            f"text path {spec!r} does not exist (expected a .txt file, a folder of .txt files, "
            f"an embedded corpus ({', '.join(EMBEDDED_CORPORA)}) or a Hugging Face dataset name)"
        )
    return _load_hub(spec, eval_fraction, seed)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _wrap(tokenizer: Any) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 60,
    )


def _train_bpe(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``: every byte is in the vocabulary, so any
    text round-trips exactly; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return _wrap(tok)


def _atomic_publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _trained_tokenizer(
    texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike[str] | None
) -> PreTrainedTokenizerFast:
    min_vocab = 256 + 1  # the byte alphabet and <|endoftext|>
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} for a byte-level BPE")
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty list of texts")
    h = hashlib.sha256(f"{_BPE_FORMAT}|{vocab_size}|".encode())
    _hash_texts(h, texts)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "tokenizers"
    folder = root / f"bpe{vocab_size}-{h.hexdigest()[:20]}"
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = _train_bpe(texts, vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{uuid.uuid4().hex}"
    tokenizer.save_pretrained(str(tmp))
    _atomic_publish_dir(tmp, folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def get_tokenizer(
    spec_or_texts: str | os.PathLike[str] | Sequence[str],
    vocab_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """A tokenizer whose ``eos_token`` separates documents.

    - a sequence of texts: a byte-level BPE with ``vocab_size`` entries (fewer if the corpus
      has fewer merges to offer) trained on them, with ``<|endoftext|>`` as eos, bos and pad.
      It is cached under ``cache_dir`` (default ``~/.cache/fsam_ds/tokenizers``) in a folder
      named by the hash of the texts and ``vocab_size``, and loaded from there next time.
    - a local folder with tokenizer files, or a Hugging Face tokenizer name:
      ``AutoTokenizer.from_pretrained`` (``vocab_size`` is ignored; a missing pad token is set
      to eos).
    - a corpus spec that :func:`load_texts` reads without network (``"default"``, a local
      text file or folder): a BPE trained on its training documents (default split).
    """
    if not isinstance(spec_or_texts, (str, os.PathLike)):
        return _trained_tokenizer(list(spec_or_texts), vocab_size, cache_dir)

    spec = os.fspath(spec_or_texts)
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif spec in EMBEDDED_CORPORA or path.exists():
        train_texts, _ = load_texts(spec)
        return _trained_tokenizer(train_texts, vocab_size, cache_dir)
    elif looks_like_path(spec):
        raise ValueError(
            f"tokenizer path {spec!r} does not exist (expected a folder with one of "
            f"{', '.join(_TOKENIZER_FILES)}, a text corpus, or a Hugging Face tokenizer name)"
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except Exception as err:
            raise ValueError(
                f"cannot load tokenizer {spec!r} with AutoTokenizer.from_pretrained "
                f"({type(err).__name__}: {err}); without network access pass a local folder "
                "or train one on texts"
            ) from err
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {spec!r} has no eos token to separate documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        desc = backend.to_str()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        desc = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{vocab}"
    return f"{desc}|eos={tokenizer.eos_token_id}"


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def token_ids(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    chunk_docs: int = 4096,
) -> np.ndarray:
    """All documents tokenized and concatenated, each followed by eos, as a 1-D array.

    With ``cache``, the array is stored as ``tokens-<hash>.npy`` (hash of tokenizer and texts)
    in ``cache_dir``; by default next to the tokenizer when it was loaded from a local folder,
    else under ``~/.cache/fsam_ds/tokens``. A second call loads it instead of tokenizing.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token to separate documents")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32

    file: Path | None = None
    if cache:
        h = hashlib.sha256(f"{_TOKENS_FORMAT}|{_tokenizer_fingerprint(tokenizer)}|".encode())
        _hash_texts(h, texts)
        if cache_dir is not None:
            folder = Path(cache_dir).expanduser()
        elif tokenizer.name_or_path and Path(tokenizer.name_or_path).is_dir():
            folder = Path(tokenizer.name_or_path)
        else:
            folder = cache_root() / "tokens"
        file = folder / f"tokens-{h.hexdigest()[:20]}.npy"
        if file.is_file():
            return np.load(file)

    pieces: list[np.ndarray] = []
    eos_arr = np.array([eos], dtype=dtype)
    for start in range(0, len(texts), chunk_docs):
        for ids in _encode(tokenizer, texts[start : start + chunk_docs]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos_arr)
    ids_all = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.stem}.tmp-{uuid.uuid4().hex}.npy")
        np.save(tmp, ids_all)
        os.replace(tmp, file)
    return ids_all


class TokenBlocks(torch.utils.data.Dataset):
    """Documents tokenized, joined with eos and cut into blocks of ``seq_len`` tokens (the
    remainder shorter than a block is dropped). Item ``i`` is ``{"input_ids": LongTensor
    [seq_len]}``; language-model labels are the inputs themselves (Hugging Face causal LMs shift
    them). Token ids are cached as by :func:`token_ids`."""

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        ids = token_ids(texts, tokenizer, cache_dir=cache_dir, cache=cache)
        n_blocks = len(ids) // seq_len
        if n_blocks == 0:
            raise ValueError(f"{len(ids)} tokens are fewer than one block of seq_len {seq_len}")
        self.seq_len = seq_len
        self.num_tokens = int(len(ids))
        self.blocks: np.ndarray = ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.blocks[index].astype(np.int64))}


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _check_layout(num_items: int, micro_batch_size: int, rank: int, world_size: int) -> int:
    """Validate a data-parallel layout; return the number of global micro-steps per epoch."""
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    steps = num_items // (micro_batch_size * world_size)
    if steps == 0:
        raise ValueError(
            f"dataset of {num_items} blocks is smaller than one global micro-batch "
            f"({world_size} ranks x {micro_batch_size})"
        )
    return steps


def _epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_items, generator=generator)


def micro_batch_indices(
    num_items: int,
    micro_batch_size: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Dataset indices of ``rank``'s micro-batch at global micro-step ``step``.

    Epoch ``e`` shuffles with ``torch.Generator().manual_seed(seed + e)`` and has
    ``num_items // (world_size * micro_batch_size)`` steps; at step ``k`` of an epoch, rank ``r``
    takes positions ``[k*W*B + r*B, k*W*B + (r+1)*B)`` of the permutation. The ranks' batches
    together are the batch one rank with ``W*B`` gets at the same step.
    """
    steps = _check_layout(num_items, micro_batch_size, rank, world_size)
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    epoch, k = divmod(step, steps)
    start = (k * world_size + rank) * micro_batch_size
    return _epoch_permutation(num_items, seed, epoch)[start : start + micro_batch_size]


def _collate(dataset: Any, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([dataset[int(i)]["input_ids"] for i in indices])}


def micro_batches(
    dataset: Any,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_micro_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches ``{"input_ids": LongTensor[micro_batch_size, seq_len]}`` of this
    rank, following :func:`micro_batch_indices` from global micro-step ``start_micro_step`` on
    (resuming jumps straight there, touching no skipped item). ``dataset`` is any sized dataset
    whose items have ``"input_ids"``."""
    n = len(dataset)
    steps = _check_layout(n, micro_batch_size, rank, world_size)
    if start_micro_step < 0:
        raise ValueError(f"start_micro_step must be non-negative, got {start_micro_step}")

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        epoch, first = divmod(start_micro_step, steps)
        while True:
            perm = _epoch_permutation(n, seed, epoch)
            for k in range(first, steps):
                start = (k * world_size + rank) * micro_batch_size
                yield _collate(dataset, perm[start : start + micro_batch_size].tolist())
            epoch, first = epoch + 1, 0

    return generate()


def eval_batches(
    dataset: Any,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """A fixed list of this rank's evaluation micro-batches, in dataset order, unshuffled.

    Batch ``i`` of rank ``r`` holds items ``[(i*W + r)*B, (i*W + r + 1)*B)``; every rank gets
    the same number of batches, ``min(max_batches, len(dataset) // (W*B))``.
    """
    steps = _check_layout(len(dataset), micro_batch_size, rank, world_size)
    if max_batches is not None:
        if max_batches < 0:
            raise ValueError(f"max_batches must be non-negative, got {max_batches}")
        steps = min(steps, max_batches)
    batches = []
    for i in range(steps):
        start = (i * world_size + rank) * micro_batch_size
        batches.append(_collate(dataset, range(start, start + micro_batch_size)))
    return batches
