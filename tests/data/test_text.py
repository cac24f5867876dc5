"""Tests for byte-level text domains and their Avalanche stream."""

from __future__ import annotations

import datasets
import pytest
import torch

from peer_ll.data.text import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    TEXT_VOCAB_SIZE,
    decode,
    documents_to_blocks,
    encode,
    iterate_blocks,
    make_blocks,
    text_domain_stream,
)
from peer_ll.data.text_domains import (
    BUILTIN_DOMAINS,
    builtin_domain,
    load_domain_splits,
    text_domain,
)

SMALL = {"max_docs": 12, "max_bytes": 40_000}


@pytest.fixture(scope="module")
def small_stream():
    return text_domain_stream(block_size=32, max_bytes_per_domain=20_000, seed=0)


def _doc_ids(splits: datasets.DatasetDict, split: str) -> set[str]:
    return set(splits[split]["doc_id"])


@pytest.mark.parametrize("name", BUILTIN_DOMAINS)
def test_builtin_domains_load_nonempty_documents(name):
    splits = load_domain_splits(name, **SMALL)
    assert set(splits) == {"train", "test"}
    for split in ("train", "test"):
        part = splits[split]
        assert part.column_names == ["text", "domain", "doc_id"]
        assert len(part) >= 1
        assert all(text for text in part["text"])
        assert set(part["domain"]) == {name}
    size = sum(len(t.encode()) for s in ("train", "test") for t in splits[s]["text"])
    assert 0 < size <= SMALL["max_bytes"]
    assert len(splits["train"]) + len(splits["test"]) <= SMALL["max_docs"]


def test_stdlib_domain_skips_site_packages_pydoc_data_and_tests():
    ids = builtin_domain("python-stdlib").doc_ids
    assert "os.py" in ids and "json/decoder.py" in ids
    assert list(ids) == sorted(ids)
    banned = ("site-packages", "pydoc_data", "test", "tests")
    assert not [i for i in ids if set(i.split("/")[:-1]) & set(banned)]
    with_tests = builtin_domain("python-stdlib", include_tests=True).doc_ids
    assert len(with_tests) > len(ids)


def test_unicode_domain_is_a_tab_separated_catalog():
    text = builtin_domain("unicode-names").read("U+0000")
    assert "U+00E9\té\tLl\tLATIN SMALL LETTER E WITH ACUTE\n" in text
    assert "U+000A" not in text  # control characters have no name


@pytest.mark.parametrize("name", BUILTIN_DOMAINS)
def test_split_is_by_document_and_deterministic(name):
    first = load_domain_splits(name, seed=3, **SMALL)
    again = load_domain_splits(name, seed=3, **SMALL)
    assert not _doc_ids(first, "train") & _doc_ids(first, "test")
    for split in ("train", "test"):
        assert first[split]["doc_id"] == again[split]["doc_id"]
        assert first[split]["text"] == again[split]["text"]
    other = load_domain_splits(name, seed=4, **SMALL)
    assert first["test"]["doc_id"] != other["test"]["doc_id"]


def test_full_split_is_by_document_and_limits_never_move_a_document():
    full = load_domain_splits("pydoc-topics", test_fraction=0.2)
    n = len(builtin_domain("pydoc-topics").doc_ids)
    assert len(full["train"]) + len(full["test"]) == n
    assert len(full["test"]) == round(0.2 * n)
    assert not _doc_ids(full, "train") & _doc_ids(full, "test")
    small = load_domain_splits("pydoc-topics", test_fraction=0.2, max_docs=10)
    assert _doc_ids(small, "test") <= _doc_ids(full, "test")
    assert _doc_ids(small, "train") <= _doc_ids(full, "train")
    assert (len(small["train"]), len(small["test"])) == (8, 2)


def test_max_bytes_is_shared_in_the_test_fraction():
    splits = load_domain_splits("python-stdlib", max_bytes=10_000, test_fraction=0.1)
    sizes = {s: sum(len(t.encode()) for t in splits[s]["text"]) for s in ("train", "test")}
    # Only a UTF-8 character cut at the budget can leave a split short, by < 4 bytes.
    assert 8_996 <= sizes["train"] <= 9_000 and 996 <= sizes["test"] <= 1_000


@pytest.mark.parametrize(
    "text", ["", "plain ascii", "héllo wörld — ü ∑ 日本語 🙂", "tab\tnew\nline\x00nul"]
)
def test_encode_decode_round_trip(text):
    tokens = encode(text, bos=True, eos=True)
    assert tokens.dtype == torch.long
    assert tokens.shape == (len(text.encode("utf-8")) + 2,)
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
    assert bool((tokens[1:-1] < BYTE_VOCAB_SIZE).all())
    assert decode(tokens) == text
    assert decode(encode(text).tolist()) == text


def test_vocab_constants_and_decode_rejects_out_of_range_ids():
    assert (BYTE_VOCAB_SIZE, BOS_ID, EOS_ID, TEXT_VOCAB_SIZE) == (256, 256, 257, 258)
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 258\), got \[258\]"):
        decode(torch.tensor([104, 258]))
    assert decode(encode("é")[:1]) == "\ufffd"  # a character cut in half


def test_blocks_have_block_size_plus_one_and_stride_block_size():
    tokens = torch.arange(23)
    blocks = make_blocks(tokens, 5)
    assert blocks.shape == (4, 6) and blocks.dtype == torch.long  # (23 - 1) // 5 blocks
    assert torch.equal(blocks[1], torch.arange(5, 11))
    assert torch.equal(blocks[:-1, -1], blocks[1:, 0])  # every token is a target once
    assert make_blocks(torch.arange(5), 5).shape == (0, 6)
    x, y = next(iterate_blocks(blocks, batch_size=3))
    assert x.shape == y.shape == (3, 5)
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches = list(iterate_blocks(blocks, batch_size=3, shuffle=True, seed=1))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    seen = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in batches])
    assert sorted(seen[:, 0].tolist()) == blocks[:, 0].tolist()


def test_documents_to_blocks_puts_bos_before_each_document():
    blocks = documents_to_blocks(["ab", "cd"], 2)  # BOS a b BOS c d
    assert blocks.tolist() == [[BOS_ID, 97, 98], [98, BOS_ID, 99]]


def test_user_folder_of_text_files_becomes_a_domain(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} ünïcode " * 40, encoding="utf-8")
    (tmp_path / "sub" / "deep.txt").write_text("nested " * 50, encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched", encoding="utf-8")
    domain = text_domain("notes", tmp_path)
    assert domain.doc_ids == (
        "doc0.txt",
        "doc1.txt",
        "doc2.txt",
        "doc3.txt",
        "doc4.txt",
        "sub/deep.txt",
    )
    assert domain.read("doc2.txt").startswith("document 2 ünïcode")
    splits = load_domain_splits(domain, test_fraction=0.3)
    assert (len(splits["train"]), len(splits["test"])) == (4, 2)
    assert set(splits["train"]["domain"]) == {"notes"}
    listed = text_domain("listed", [tmp_path / "doc0.txt", tmp_path / "skip.md"])
    assert len(listed.doc_ids) == 2
    bench = text_domain_stream([domain, "pydoc-topics"], block_size=16, max_bytes_per_domain=4_000)
    assert bench.domain_names == ("notes", "pydoc-topics")
    assert bench.get_split("notes", "test").shape[1] == 17


def test_saved_hf_dataset_folder_becomes_a_domain(tmp_path):
    rows = {"text": [f"row {i} " * 20 for i in range(6)], "label": list(range(6))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    domain = text_domain("saved", tmp_path / "saved")
    assert len(domain.doc_ids) == 6 and domain.read("3") == rows["text"][3]
    with pytest.raises(ValueError, match="text_column must be a column"):
        text_domain("saved", tmp_path / "saved", text_column="body")


def test_bad_arguments_raise_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"name must be one of .*got 'klingon'"):
        load_domain_splits("klingon")
    with pytest.raises(FileNotFoundError, match=r"source must hold files matching glob"):
        text_domain("empty", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"source must be an existing path"):
        text_domain("missing", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got 0"):
        text_domain_stream(["pydoc-topics"], block_size=0)
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got 0"):
        make_blocks(torch.arange(10), 0)
    with pytest.raises(ValueError, match=r"test_fraction must be a float in \(0, 1\), got 1.0"):
        load_domain_splits("pydoc-topics", test_fraction=1.0)
    with pytest.raises(ValueError, match=r"max_bytes must be None or an int >= 2, got 0"):
        load_domain_splits("pydoc-topics", max_bytes=0)
    with pytest.raises(ValueError, match=r"domains must have distinct names"):
        text_domain_stream(["pydoc-topics", "pydoc-topics"])
    with pytest.raises(ValueError, match=r"must fill one block of 65 tokens in its test split"):
        text_domain_stream(["pydoc-topics"], block_size=64, max_bytes_per_domain=200)
    (tmp_path / "one.txt").write_text("only one document", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must have at least 2 documents, got 1"):
        load_domain_splits(text_domain("one", tmp_path))


def test_stream_has_one_experience_per_domain_with_task_labels(small_stream):
    bench = small_stream
    assert bench.domain_names == BUILTIN_DOMAINS
    for stream in (bench.train_stream, bench.test_stream):
        assert len(stream) == len(BUILTIN_DOMAINS)
        for i, exp in enumerate(stream):
            assert exp.current_experience == i
            assert exp.task_label == i and exp.task_labels == [i]
            assert exp.domain == BUILTIN_DOMAINS[i]
            x, y, t = exp.dataset[0]
            assert x.shape == y.shape == (32,) and x.dtype == y.dtype == torch.long
            assert torch.equal(x[1:], y[:-1]) and t == i
            assert len(exp.dataset) == bench.get_split(exp.domain, stream.name).shape[0]


def test_stream_splits_match_documents_and_do_not_overlap(small_stream):
    for name in small_stream.domain_names:
        docs = small_stream.documents[name]
        assert not _doc_ids(docs, "train") & _doc_ids(docs, "test")
        train = small_stream.get_split(name, "train")
        text = "".join(docs["train"]["text"])
        assert decode(train[0]) == text[: len(decode(train[0]))]
        assert int(train.max()) < TEXT_VOCAB_SIZE
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        small_stream.get_split("pydoc-topics", "val")
    with pytest.raises(ValueError, match=r"domain must be one of"):
        small_stream.get_split("klingon")


def test_stream_batches_through_an_avalanche_dataloader(small_stream):
    exp = small_stream.train_stream[1]
    loader = torch.utils.data.DataLoader(
        exp.dataset, batch_size=4, collate_fn=exp.dataset.collate_fn
    )
    x, y, t = next(iter(loader))
    assert x.shape == y.shape == (4, 32)
    assert t.tolist() == [1, 1, 1, 1]
