"""Model presets, corpus loading, tokenizer caching and data-parallel batching."""

from __future__ import annotations

import gzip
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from optional import BUNDLED_DATA, data_file  # noqa: E402

from fsam_ds import data, models
from fsam_ds.data import (
    EOS_TOKEN,
    TokenBlocks,
    eval_batches,
    get_tokenizer,
    is_wikitext,
    load_texts,
    micro_batch_indices,
    micro_batches,
    read_embedded_corpus,
    split_wikitext_articles,
)
from fsam_ds.models import PRESETS, build_model, count_parameters, llama_config

# WikiText layout: every line padded with spaces, headings between blank lines.
SYNTHETIC_WIKITEXT = "".join(
    f" {line} \n"
    for line in [
        "",
        "= Alpha =",
        "",
        "Alpha is the first letter . It has a long history .",
        "",
        "= = Origins = =",
        "",
        "The letter comes from <unk> .",
        "",
        "= = = Early forms = = =",
        "",
        "Early forms vary @-@ widely .",
        "",
        "= Beta =",
        "",
        "Beta follows alpha .",
        "The second paragraph of beta .",
        "",
        "= = Usage = =",
        "",
        "Beta is used in = signs = sometimes .",
        "",
        "= Gamma ( letter ) =",
        "",
        "Gamma is third .",
        "",
    ]
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every default cache location inside the test's temporary folder."""
    monkeypatch.setenv("FSAM_DS_CACHE", str(tmp_path_factory.mktemp("fsam_cache")))


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    train, _ = load_texts("default")
    return train[:400]


# ------------------------------------------------------------------------------------ models


def _nominal(name: str) -> float:
    value, unit = float(name[:-1]), name[-1]
    return value * {"m": 1e6, "b": 1e9}[unit]


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_preset_parameter_count_matches_name(name: str):
    n = models.preset_num_parameters(name)
    assert abs(n - _nominal(name)) <= 0.15 * _nominal(name), (name, n)


def test_tiny_preset_is_tiny():
    assert 50_000 <= models.preset_num_parameters("tiny") <= 150_000


def test_presets_are_dropout_free_and_untied():
    for name in PRESETS:
        cfg = llama_config(name)
        assert cfg.attention_dropout == 0
        assert cfg.tie_word_embeddings is False
        assert cfg.hidden_size % cfg.num_attention_heads == 0


def test_docstring_table_matches_presets():
    rows = re.findall(
        r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+)$",
        models.__doc__ or "",
        flags=re.M,
    )
    assert [r[0] for r in rows] == list(PRESETS)
    for name, hidden, layers, heads, ffn, vocab, max_pos, params in rows:
        p = PRESETS[name]
        assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads) == (
            int(hidden),
            int(layers),
            int(heads),
        )
        assert (p.intermediate_size, p.vocab_size, p.max_position_embeddings) == (
            int(ffn),
            int(vocab),
            int(max_pos),
        )
        assert models.preset_num_parameters(name) == int(params.replace(",", ""))


def test_vocab_and_seq_len_overrides():
    cfg = llama_config("2m", vocab_size=300, max_seq_len=64)
    assert cfg.vocab_size == 300 and cfg.max_position_embeddings == 64
    delta = models.preset_num_parameters("2m") - models.preset_num_parameters("2m", 300)
    assert delta == 2 * PRESETS["2m"].hidden_size * (PRESETS["2m"].vocab_size - 300)


def test_tiny_forward_logits_shape():
    torch.manual_seed(0)
    model = build_model("tiny")
    x = torch.randint(0, 512, (3, 17))
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (3, 17, 512)
    assert torch.isfinite(out.loss)
    assert count_parameters(model) == models.preset_num_parameters("tiny")


def test_float64_build_is_seeded_and_runs():
    torch.manual_seed(1)
    m32 = build_model("2m", vocab_size=300, max_seq_len=32)
    torch.manual_seed(1)
    m64 = build_model("2m", vocab_size=300, max_seq_len=32, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    for a, b in zip(m32.parameters(), m64.parameters(), strict=True):
        assert torch.equal(a.double(), b)
    x = torch.randint(0, 300, (2, 32))
    out = m64(input_ids=x, labels=x)
    assert out.logits.dtype == torch.float64 and out.logits.shape == (2, 32, 300)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m64.parameters())
    again = m64(input_ids=x).logits
    assert torch.equal(again, out.logits.detach())


def test_build_model_from_local_folder(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=300)
    model.save_pretrained(tmp_path)
    loaded = build_model(tmp_path, dtype=torch.float64)
    assert loaded.dtype == torch.float64
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a.double(), b)
    with pytest.raises(ValueError, match="300"):
        build_model(tmp_path, vocab_size=1000)


def test_bad_model_names_list_presets(tmp_path: Path):
    with pytest.raises(ValueError) as err:
        llama_config("huge")
    assert all(name in str(err.value) for name in PRESETS)
    for bad in ("huge", str(tmp_path)):  # an unknown name, a folder without config.json
        with pytest.raises(ValueError) as err:
            build_model(bad)
        assert all(name in str(err.value) for name in PRESETS)
        assert "config.json" in str(err.value)


def test_describe_mentions_shape():
    line = models.describe("24m")
    assert line.startswith("24m:") and "256" in line and "M params" in line


# ------------------------------------------------------------------------------------ texts


def test_embedded_corpus_split_is_deterministic_and_disjoint():
    train, evals = load_texts("default")
    train2, evals2 = load_texts("tinyshakespeare")
    assert (train, evals) == (train2, evals2)
    assert 0.04 < len(evals) / (len(train) + len(evals)) < 0.06
    paragraphs = data.split_paragraphs(read_embedded_corpus())
    assert sorted(train + evals) == sorted(paragraphs)  # a partition of the paragraphs
    assert all(doc.strip() and "\n\n" not in doc for doc in paragraphs)
    other_train, _ = load_texts("default", seed=1)
    assert other_train != train


def test_embedded_corpus_is_tinyshakespeare():
    # the SHA-256 and length of karpathy/char-rnn's input.txt, recorded in tests/data
    import hashlib

    digest, size, _ = (BUNDLED_DATA / "tinyshakespeare.sha256").read_text().split()
    raw = read_embedded_corpus().encode("utf-8")
    assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (digest, int(size))


def test_wikitext_split_by_article_synthetic():
    assert is_wikitext(SYNTHETIC_WIKITEXT)
    docs = split_wikitext_articles(SYNTHETIC_WIKITEXT)
    assert [d.splitlines()[0] for d in docs] == [
        " = Alpha = ",
        " = Beta = ",
        " = Gamma ( letter ) = ",
    ]
    assert " = = = Early forms = = = " in docs[0] and " = = Origins = = " in docs[0]
    assert "The second paragraph of beta" in docs[1] and " = = Usage = = " in docs[1]
    assert not is_wikitext("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak.")


def test_wikitext_file_and_folder(tmp_path: Path):
    (tmp_path / "a.txt").write_text(SYNTHETIC_WIKITEXT, encoding="utf-8")
    train, evals = load_texts(tmp_path / "a.txt", eval_fraction=0.3)
    assert len(train) == 2 and len(evals) == 1
    assert all(d.lstrip().startswith("= ") for d in train + evals)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"one\n\ntwo\n\nthree\n"))
    train, evals = load_texts(tmp_path, eval_fraction=0.0)
    assert len(train) == 6 and evals == []
    (tmp_path / "train.txt").write_text("t1\n\nt2\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("v1\n", encoding="utf-8")
    assert load_texts(tmp_path) == (["t1", "t2"], ["v1"])


def test_wikitext2_valid_split_by_article():
    path = data_file("wikitext-2/valid.txt")  # the excerpt in tests/data: 15 whole articles
    text = path.read_text(encoding="utf-8")
    titles = [line for line in text.splitlines() if re.fullmatch(r" = [^=].* = ", line)]
    train, evals = load_texts(path, eval_fraction=0.1)
    docs = train + evals
    assert len(docs) == len(titles) > 10
    assert sorted(d.splitlines()[0] for d in docs) == sorted(titles)
    assert len(evals) == round(0.1 * len(titles))
    n_sections = sum(1 for line in text.splitlines() if line.startswith(" = = "))
    assert sum(d.count("\n = = ") for d in docs) == n_sections
    assert sum(len(d.split()) for d in docs) == len(text.split())


def test_bundled_wikitext_excerpt():
    """The excerpt in tests/data: whole articles, the first 15 of WikiText-2's valid split."""
    excerpt = BUNDLED_DATA / "wikitext-2" / "valid-excerpt.txt"
    assert excerpt.stat().st_size < 300_000
    train, evals = load_texts(excerpt, eval_fraction=0.0)
    assert len(train) == 15 and evals == [] and train[0].splitlines()[0] == " = Homarus gammarus = "
    # unchanged: the SHA-256 and length of lines 1-850 of WikiText-2's valid.txt, recorded in tests/data
    import hashlib

    digest, size = (BUNDLED_DATA / "wikitext-2" / "valid-excerpt.sha256").read_text().split()[:2]
    raw = excerpt.read_bytes()
    assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (digest, int(size))


def test_missing_path_is_named():
    for bad in ("./no/such/corpus.txt", "/no/such/dir"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            load_texts(bad)


def test_hub_dataset_rows_and_unreachable(monkeypatch: pytest.MonkeyPatch):
    import datasets

    rows = SYNTHETIC_WIKITEXT.splitlines(keepends=True)
    fake = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": rows}),
            "validation": datasets.Dataset.from_dict({"text": ["v one\n", "\n", "v two\n"]}),
        }
    )
    calls = []

    def fake_load(name, config=None):
        calls.append((name, config))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, evals = load_texts("someone/wiki:raw-v1")
    assert calls == [("someone/wiki", "raw-v1")]
    assert len(train) == 3 and evals == ["v one", "v two"]

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="someone/wiki.*no route to host"):
        load_texts("someone/wiki")


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_cache(tmp_path: Path, small_texts: list[str], monkeypatch: pytest.MonkeyPatch):
    tok = get_tokenizer(small_texts, vocab_size=400, cache_dir=tmp_path)
    assert len(tok) == 400
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    for text in (small_texts[3], "Zebra — ünïcode 🎉\n\n\ttabs  and  spaces ", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "tokenizer.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer was retrained instead of loaded from the cache")

    monkeypatch.setattr(data, "_train_bpe", no_training)
    again = get_tokenizer(small_texts, vocab_size=400, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    from_folder = get_tokenizer(str(folder), vocab_size=0)
    assert from_folder.encode(small_texts[5]) == tok.encode(small_texts[5])
    with pytest.raises(AssertionError):  # another corpus is another cache entry
        get_tokenizer(small_texts[:-1], vocab_size=400, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------ blocks


def test_token_blocks_layout_and_cache(tmp_path: Path, small_texts: list[str], monkeypatch: pytest.MonkeyPatch):
    tok = get_tokenizer(small_texts, vocab_size=400, cache_dir=tmp_path / "tok")
    texts = small_texts[:50]
    blocks = TokenBlocks(texts, tok, seq_len=16, cache_dir=tmp_path / "ids")
    expected: list[int] = []
    for t in texts:
        expected += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    n = len(expected) // 16
    assert len(blocks) == n
    item = blocks[n - 1]["input_ids"]
    assert item.dtype == torch.int64 and item.shape == (16,)
    flat = torch.cat([blocks[i]["input_ids"] for i in range(n)]).tolist()
    assert flat == expected[: n * 16]
    assert len(list((tmp_path / "ids").glob("tokens-*.npy"))) == 1
    with pytest.raises(ValueError, match="seq_len"):
        TokenBlocks(texts[:1], tok, seq_len=10_000, cache=False)

    def no_encoding(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(data, "_encode", no_encoding)
    cached = TokenBlocks(texts, tok, seq_len=16, cache_dir=tmp_path / "ids")
    assert np.array_equal(cached.blocks, blocks.blocks)


# ------------------------------------------------------------------------------------ batching


class _Items(torch.utils.data.Dataset):
    """Item i is a block filled with i; counts how many items were read."""

    def __init__(self, n: int, seq_len: int = 4) -> None:
        self.n, self.seq_len, self.reads = n, seq_len, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        return {"input_ids": torch.full((self.seq_len,), i, dtype=torch.long)}


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_data_parallel_union_equals_single_rank_double_batch():
    ds, b, w, steps = _Items(37), 3, 2, 20  # 6 global micro-steps per epoch: 3+ epochs
    ranks = [list(islice(micro_batches(ds, b, rank=r, world_size=w, seed=5), steps)) for r in range(w)]
    single = list(islice(micro_batches(ds, b * w, seed=5), steps))
    for k in range(steps):
        assert ranks[0][k]["input_ids"].shape == (b, 4)
        union = torch.cat([ranks[r][k]["input_ids"] for r in range(w)])
        assert torch.equal(union, single[k]["input_ids"])
        assert torch.equal(
            micro_batch_indices(37, b, k, rank=1, world_size=w, seed=5),
            torch.tensor(_ids(ranks[1][k])),
        )
    epoch0 = [i for k in range(6) for r in range(w) for i in _ids(ranks[r][k])]
    assert len(set(epoch0)) == 36  # no repeats within an epoch
    epoch1 = [i for k in range(6, 12) for i in _ids(single[k])]
    assert epoch1 != epoch0  # reshuffled each epoch


def test_start_micro_step_skips_exactly():
    ds = _Items(37)
    full = list(islice(micro_batches(ds, 3, rank=1, world_size=2, seed=2), 30))
    for start in (0, 1, 5, 6, 13):
        resumed = list(islice(micro_batches(ds, 3, 1, 2, seed=2, start_micro_step=start), 30 - start))
        assert [_ids(x) for x in resumed] == [_ids(x) for x in full[start:]]
    ds.reads = 0
    next(micro_batches(ds, 3, 1, 2, seed=2, start_micro_step=10**9))
    assert ds.reads == 3


def test_eval_batches_are_fixed_and_disjoint():
    ds = _Items(25)
    r0 = eval_batches(ds, 2, rank=0, world_size=3, max_batches=10)
    r1 = eval_batches(ds, 2, rank=1, world_size=3, max_batches=10)
    assert len(r0) == len(r1) == 25 // 6
    assert [_ids(x) for x in r0] == [[0, 1], [6, 7], [12, 13], [18, 19]]
    assert not {i for x in r0 for i in _ids(x)} & {i for x in r1 for i in _ids(x)}
    assert len(eval_batches(ds, 2, 0, 3, max_batches=2)) == 2


def test_batching_errors():
    with pytest.raises(ValueError, match="rank"):
        micro_batches(_Items(10), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="smaller than one global micro-batch"):
        micro_batches(_Items(5), 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="start_micro_step"):
        micro_batches(_Items(10), 2, start_micro_step=-1)
