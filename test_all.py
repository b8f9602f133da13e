"""ScratchLM's tests: one file, one section per stage, in pipeline order.

Run:  python -m pytest -q test_all.py

Each section tests its stage against independent references (torch's own ops, tiktoken, float64
re-computations, hand-worked answers) and invariants (round trips, causality, single- vs multi-process
equality). Nothing here touches the network; GPU-only checks skip cleanly without CUDA.
"""
import os
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

# Triton kernels (stage 4) run under Triton's CPU interpreter when there is no GPU. The switch is read when triton
# is first imported, so it is set here, before any stage (or torch.compile) can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ===================================================================================================
# Stage 1: tokenizer.py -- byte-level BPE (training, encode/decode, fast path, GPT-2 parity, bad input)
# ===================================================================================================
import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import tokenizer as tk

_TOK_EOT = "<|endoftext|>"

# A small mixed text with the things that tend to break tokenizers: contractions, runs of spaces and
# newlines, tabs, digits, punctuation clusters, accents, CJK, emoji, RTL scripts, special tokens.
_TOK_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see; they're here.\n\n"
    "  Indented   text\twith\ttabs and    many spaces   \n\n\n\nnumbers 123 4567 89,000.50 3.14159\n"
    "naïve café résumé Ünïcödé — “quotes” ‘single’ … 東京タワー 你好，世界 🤖🙂👍🏽 Привет мир مرحبا שלום\n"
    "<|endoftext|>Second document: the cat in the hat sat on the mat.<|endoftext|><|endoftext|>"
    "CAPS AND I'VE DON'T  \r\n\r\nwindows lines\r\n   trailing spaces   "
) * 3


def _tok_write(path, text):
    Path(path).write_text(text, encoding="utf-8")
    return str(path)


@functools.lru_cache(maxsize=None)
def _tok_trained(extra_specials=()):
    """A small trained tokenizer (vocab, merges) on _TOK_TEXT, shared by several tests."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = _tok_write(Path(d) / "t.txt", _TOK_TEXT)
        return tk.train_bpe(path, 256 + 1 + 300, [_TOK_EOT], num_workers=1, progress=False)


def _tok_tokenizer(fast=True):
    vocab, merges = _tok_trained()
    return tk.Tokenizer(vocab, merges, [_TOK_EOT], fast=fast)


@functools.lru_cache(maxsize=None)
def _tok_gpt2_pair():
    """(our pure-Python GPT-2 tokenizer, our fast one, tiktoken's gpt2), or skip if gpt2 can't load.

    Tests never touch the network, so we only let tiktoken load gpt2 when its two files are already in
    tiktoken's cache folder (CI points TIKTOKEN_CACHE_DIR at ../shared/tiktoken).
    """
    import hashlib
    import tempfile
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    names = [hashlib.sha1((base + f).encode()).hexdigest() for f in ("vocab.bpe", "encoder.json")]
    if not all(os.path.isfile(os.path.join(cache_dir, n)) for n in names):
        pytest.skip(f"tiktoken's gpt2 files are not in {cache_dir} (tests never download); "
                    "set TIKTOKEN_CACHE_DIR to a folder with them")
    try:
        import tiktoken
        ref = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without TIKTOKEN_CACHE_DIR, etc.
        pytest.skip(f"tiktoken gpt2 encoding unavailable ({type(e).__name__}: {e}); "
                    "set TIKTOKEN_CACHE_DIR to a folder with the gpt2 files")
    fast = tk.gpt2_tokenizer(fast=True)
    slow = tk.Tokenizer(fast.vocab, fast.merges, fast.special_tokens, fast=False)
    return slow, fast, ref


# ---- hand-checked training -------------------------------------------------------------------------

def test_tok_get_stats_and_merge_by_hand():
    assert tk.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert tk.get_stats([1, 2], weight=5) == {(1, 2): 5}
    assert tk.merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert tk.merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]  # leftmost wins an overlap
    assert tk.merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]


def test_tok_train_aaabdaaabac_by_hand(tmp_path):
    # One pre-token (all letters). Pair counts: aa 4 (two in each "aaa"), ab 2, bd 1, da 1, ba 1, ac 1.
    # 1) (a, a) -> "aa":  a a a b d a a a b a c -> aa a b d aa a b a c.  Now (aa, a) 2 and (a, b) 2 tie:
    #    b"aa" > b"a", so the lexicographically greater pair is (b"aa", b"a").
    # 2) (aa, a) -> "aaa": aaa b d aaa b a c.  (aaa, b) 2 is now the unique maximum.
    # 3) (aaa, b) -> "aaab".
    path = _tok_write(tmp_path / "a.txt", "aaabdaaabac")
    vocab, merges = tk.train_bpe(path, 259, [], progress=False)
    assert merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]
    assert vocab[256] == b"aa" and vocab[257] == b"aaa" and vocab[258] == b"aaab"
    assert all(vocab[i] == bytes([i]) for i in range(256))
    assert tk.train_bpe_reference("aaabdaaabac", 259) == (vocab, merges)


def test_tok_train_the_cat_in_the_hat_by_hand(tmp_path):
    # Pre-tokens: "the", " cat", " in", " the", " hat". Pair counts: (t,h) 2, (h,e) 2, (a,t) 2 (cat, hat),
    # the rest 1. Ties at 2 -> greatest first byte string: "t" > "h" > "a"          -> 1) (t, h)
    # Then (th, e) 2 and (a, t) 2 tie: b"th" > b"a"                                   -> 2) (th, e)
    # (a, t) 2 is the only count-2 pair left                                          -> 3) (a, t)
    # All remaining pairs have count 1: (" ",c) (c,at) (" ",i) (i,n) (" ",the) (" ",h) (h,at);
    # the greatest is (i, n) since b"i" beats b" ", b"c", b"h"                        -> 4) (i, n)
    # The special token splits "hat" from "the" and is never merged.
    path = _tok_write(tmp_path / "c.txt", "the cat in the hat" + _TOK_EOT)
    vocab, merges = tk.train_bpe(path, 256 + 1 + 4, [_TOK_EOT], progress=False)
    assert merges == [(b"t", b"h"), (b"th", b"e"), (b"a", b"t"), (b"i", b"n")]
    assert vocab[256] == _TOK_EOT.encode() and vocab[257] == b"th" and vocab[260] == b"in"
    tok = tk.Tokenizer(vocab, merges, [_TOK_EOT])
    # "the" -> [the]; " cat" -> [" ", c, at]
    assert tok.encode("the cat") == [258, 32, ord("c"), 259]


def test_tok_tie_break_prefers_lexicographically_greater_pair(tmp_path):
    # "ab cd" -> pre-tokens "ab", " cd": pairs (a,b) 1, (" ",c) 1, (c,d) 1; greatest: (c, d).
    path = _tok_write(tmp_path / "t.txt", "ab cd")
    _, merges = tk.train_bpe(path, 257, [], progress=False)
    assert merges == [(b"c", b"d")]
    # byte-level comparison, not str: b"\xc3\xa9" (é) > b"z", so (é-bytes) wins a tie over (z, z)
    path = _tok_write(tmp_path / "u.txt", "zz é")
    _, merges = tk.train_bpe(path, 257, [], progress=False)
    assert merges == [(b"\xc3", b"\xa9")]


def test_tok_fast_trainer_matches_reference_on_random_texts(tmp_path):
    # Parallel chunked pre-tokenization + incremental counts == the textbook recount-every-step trainer.
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", "aa", " ", "  ", "\n", "x", "é", _TOK_EOT, "1", "!", "'s", "the", " cat", "🙂"]
    for trial in range(12):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(50, 1500)))
        path = _tok_write(tmp_path / f"r{trial}.txt", text)
        vocab_size = 256 + 1 + rng.randint(1, 80)
        ref = tk.train_bpe_reference(text, vocab_size, [_TOK_EOT])
        fast = tk.train_bpe(path, vocab_size, [_TOK_EOT], num_workers=2, chunk_bytes=97, progress=False)
        assert fast == ref, f"trial {trial}"
    # and on real mixed text, multi-chunk, multi-process, with a special token that contains cut-like spots
    text = (_TOK_TEXT + "<|end of\ntext|>a b<|end of\ntext|>") * 2
    specials = [_TOK_EOT, "<|end of\ntext|>"]
    path = _tok_write(tmp_path / "mixed.txt", text)
    assert tk.train_bpe(path, 256 + 2 + 200, specials, num_workers=2, chunk_bytes=300, progress=False) == \
        tk.train_bpe_reference(text, 256 + 2 + 200, specials)


def test_tok_special_tokens_never_merged(tmp_path):
    # "<|endoftext|>" repeated many times would otherwise be the most frequent thing to merge.
    path = _tok_write(tmp_path / "s.txt", ("hi" + _TOK_EOT) * 200)
    vocab, merges = tk.train_bpe(path, 256 + 1 + 20, [_TOK_EOT], progress=False)
    assert merges == [(b"h", b"i")]  # the only pair outside the special tokens; training stops early
    assert all(b"<" not in a + b and b"|" not in a + b for a, b in merges)


# ---- the tokenizer ------------------------------------------------------------------------------------

def test_tok_special_token_isolation_and_longest_match():
    vocab, merges = _tok_trained()
    double = _TOK_EOT + _TOK_EOT
    tok = tk.Tokenizer(vocab, merges, [_TOK_EOT, double])
    assert tok.vocab_size == len(vocab) + 1  # missing special token appended
    eot, dbl = tok.special_ids[_TOK_EOT], tok.special_ids[double]
    assert eot == 256 and dbl == len(vocab) and tok.eot_id == 256
    for t in (tok, tk.Tokenizer(vocab, merges, [_TOK_EOT, double], fast=False)):
        assert t.encode(double) == [dbl]
        assert t.encode(double + _TOK_EOT) == [dbl, eot]
        ids = t.encode("the cat" + _TOK_EOT + "the hat")
        assert ids.count(eot) == 1 and t.decode(ids) == "the cat" + _TOK_EOT + "the hat"
        # neighbours of the special token encode exactly as if alone
        assert ids == t.encode("the cat") + [eot] + t.encode("the hat")
    # without special tokens registered, the string is ordinary text
    plain = tk.Tokenizer(vocab, merges, [])
    assert 256 in plain.vocab and plain.encode(_TOK_EOT) != [256]
    assert plain.decode(plain.encode(_TOK_EOT)) == _TOK_EOT


def test_tok_fast_path_equals_readable_path():
    fast, slow = _tok_tokenizer(fast=True), _tok_tokenizer(fast=False)
    assert fast.use_fast and fast.fast_reason == "ok" and not slow.use_fast
    rng = random.Random(1)
    texts = [_TOK_TEXT, "", " ", "\n", "  \n", "a\n\n b", "x   ", "'s'S'll", "🙂" * 5, "\u0000\u001f\u00a0\u3000 z"]
    texts += [_TOK_TEXT[rng.randrange(len(_TOK_TEXT)):][: rng.randrange(1, 300)] for _ in range(50)]
    for t in texts:
        assert fast.encode(t) == slow.encode(t) == fast.encode_readable(t), repr(t)
    fast.use_fast = False  # the switch forces the readable encoder
    assert fast.encode(_TOK_TEXT) == slow.encode(_TOK_TEXT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_tok_property_round_trip_and_fast_equals_readable(s):
    fast, slow = _tok_tokenizer(True), _tok_tokenizer(False)
    ids = fast.encode(s)
    assert fast.decode(ids) == s
    assert slow.encode(s) == ids
    assert all(0 <= i < fast.vocab_size for i in ids)


def test_tok_fast_path_falls_back_when_ranks_disagree():
    # Merges (b,c), (a,b), (ab,c): BPE on the bytes "abc" merges (b,c) first and gets stuck at [a, bc],
    # so merge-order BPE never produces "abc" from its own bytes -- but tiktoken would emit "abc" whole.
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"ab", 258: b"abc"})
    merges = [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")]
    tok = tk.Tokenizer(vocab, merges)
    assert not tok.use_fast and "not that token" in tok.fast_reason
    assert tok.encode("abc") == [97, 256]
    # ids out of merge order -> also refused
    vocab2 = {i: bytes([i]) for i in range(256)}
    vocab2.update({256: b"bc", 257: b"ab"})
    tok2 = tk.Tokenizer(vocab2, [(b"a", b"b"), (b"b", b"c")])
    assert not tok2.use_fast and "merge order" in tok2.fast_reason
    assert tok2.encode("abc") == [257, 99]


# A special token with a space between letters and a newline inside: both look like safe cut points to
# the chunkers, which must notice they are inside a special token.
_TOK_ODD_SPECIAL = "<|end of\ntext|>"


def test_tok_encode_iterable_equals_encode():
    vocab, merges = _tok_trained()
    double = _TOK_EOT + _TOK_EOT
    rng = random.Random(2)
    text = (_TOK_TEXT + _TOK_ODD_SPECIAL + "a b" + _TOK_ODD_SPECIAL) * 8
    for specials in ([_TOK_EOT], [_TOK_EOT, double], [_TOK_EOT, _TOK_ODD_SPECIAL]):
        for fast in (True, False):
            tok = tk.Tokenizer(vocab, merges, specials, fast=fast)
            tok.STREAM_BUFFER = 300  # flush often: many cut points get exercised
            expected = tok.encode(text)
            # random chunk sizes: cuts land inside words, whitespace runs and special tokens
            cuts = sorted(rng.sample(range(1, len(text)), 400))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert list(tok.encode_iterable(chunks)) == expected
            assert list(tok.encode_iterable(iter(text.splitlines(keepends=True)))) == expected
    assert list(tok.encode_iterable([])) == []


def test_tok_encode_iterable_is_lazy():
    # An endless stream: ids must come out long before the input ends (constant memory).
    import itertools
    tok = _tok_tokenizer()
    endless = itertools.cycle(["the cat in the hat.\n", "a dog" + _TOK_EOT])
    first = list(itertools.islice(tok.encode_iterable(endless), 1000))  # default buffer size
    assert len(first) == 1000 and tok.decode(first).startswith("the cat in the hat.\na dog")


def test_tok_decode_replaces_invalid_utf8_and_rejects_unknown_ids():
    tok = _tok_tokenizer()
    assert tok.decode([0xE6]) == "\ufffd"  # a lone lead byte of a 3-byte character
    assert tok.decode([0xE6, 0x9D, 0xB1]) == "東"
    for bad in ([tok.vocab_size], [-1], [10 ** 9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)


def test_tok_save_load_round_trip_and_metadata(tmp_path):
    tok = _tok_tokenizer()
    tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["merges.txt", "special_tokens.json", "vocab.json"]
    back = tk.Tokenizer.load(tmp_path / "tok")
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == [_TOK_EOT]
    assert back.encode(_TOK_TEXT) == tok.encode(_TOK_TEXT)
    same = tk.Tokenizer.from_files(tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt", [_TOK_EOT])
    assert same.vocab == tok.vocab
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths[:256].tolist() == [1] * 256
    assert lengths[256] == len(_TOK_EOT) and lengths.sum() == sum(len(b) for b in tok.vocab.values())
    assert tk.token_dtype(256) == np.uint16 and tk.token_dtype(65536) == np.uint16
    assert tk.token_dtype(65537) == np.uint32


# ---- GPT-2 parity ------------------------------------------------------------------------------------

_TOK_GPT2_CASES = [
    "Hello world! This is plain ASCII prose, with punctuation; and (parentheses).",
    "Emoji: 🤖🙂👍🏽🏳️‍🌈 and flags 🇫🇷", "CJK: 東京タワー 你好，世界！ 한국어 텍스트",
    "Mixed scripts: Привет мир, مرحبا بالعالم, שלום, ελληνικά, हिन्दी",
    "runs of spaces:     a      b\n\n\n\n   \n\t\t\n  ", "   leading", "trailing   ", "\n\n\n",
    "digits 1234567890 3.14159 1,000,000 2024-11-28 0x1F",
    "contractions: I'm you're he's she'd we'll they've don't CAN'T I'VE 'tis",
    "special: <|endoftext|>after<|endoftext|><|endoftext|> and <|endoftext| not quite",
    "code: def f(x):\n    return x**2  # comment\n", "ÀÉÎÕÜ àéîõü ß ñ ç ø å",
    "\u00a0nbsp\u2003em\u3000ideographic \u200bzero-width", _TOK_TEXT,
]


def test_tok_gpt2_parity_with_tiktoken():
    slow, fast, ref = _tok_gpt2_pair()
    assert fast.use_fast and fast.fast_reason == "ok" and slow.vocab_size == ref.n_vocab == 50257
    assert fast.eot_id == 50256 and len(fast.merges) == 50000
    for text in _TOK_GPT2_CASES:
        expected = ref.encode(text, allowed_special="all")
        assert slow.encode(text) == expected, text
        assert fast.encode(text) == expected, text
        assert slow.decode(expected) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=100))
def test_tok_property_gpt2_readable_matches_tiktoken(s):
    slow, _, ref = _tok_gpt2_pair()
    assert slow.encode(s) == ref.encode(s, allowed_special="all")


# ---- encode_file ------------------------------------------------------------------------------------

def test_tok_encode_file_equals_encode(tmp_path):
    vocab, merges = _tok_trained()
    tok = tk.Tokenizer(vocab, merges, [_TOK_EOT, _TOK_ODD_SPECIAL])
    text = (_TOK_TEXT + _TOK_ODD_SPECIAL + "a b" + _TOK_ODD_SPECIAL) * 20
    src = _tok_write(tmp_path / "in.txt", text)
    out = tmp_path / "out.bin"
    n = tk.encode_file(tok, src, out, num_workers=2, chunk_bytes=997, progress=False)
    ids = np.memmap(out, dtype=tk.token_dtype(tok.vocab_size), mode="r")
    assert ids.dtype == np.uint16 and n == len(ids)
    assert ids.tolist() == tok.encode(text)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.bin"]  # no .tmp left
    # a file with no newlines and no special tokens still cuts at "letter space letter"
    src2 = _tok_write(tmp_path / "one_line.txt", "lorem ipsum dolor sit amet " * 300)
    tk.encode_file(tok, src2, tmp_path / "o2.bin", num_workers=1, chunk_bytes=500, progress=False)
    assert np.fromfile(tmp_path / "o2.bin", dtype=np.uint16).tolist() == tok.encode("lorem ipsum dolor sit amet " * 300)


# ---- bad input ----------------------------------------------------------------------------------------

def test_tok_bad_inputs_give_clear_errors(tmp_path):
    good = _tok_write(tmp_path / "good.txt", "hello world")
    with pytest.raises(ValueError, match="too small"):
        tk.train_bpe(good, 256, [_TOK_EOT], progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        tk.train_bpe(tmp_path / "missing.txt", 300, [], progress=False)
    empty = _tok_write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="empty"):
        tk.train_bpe(empty, 300, [], progress=False)
    with pytest.raises(IsADirectoryError, match="directory"):
        tk.train_bpe(tmp_path, 300, [], progress=False)
    # non-UTF-8: the error names the file and the byte offset (here 1000 + 5)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\n" * 111 + b"x" + b"abcd\xffrest of it\n" + b"more text\n" * 50)
    offset = len(b"line one\n" * 111 + b"x" + b"abcd")
    for kwargs in ({"num_workers": 1}, {"num_workers": 2, "chunk_bytes": 200}):
        with pytest.raises(ValueError, match=rf"bad\.txt.*byte offset {offset}"):
            tk.train_bpe(bad, 300, [], progress=False, **kwargs)
    tok = _tok_tokenizer()
    out = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match=f"byte offset {offset}"):
        tk.encode_file(tok, bad, out, num_workers=2, chunk_bytes=200, progress=False)
    assert not out.exists() and not Path(str(out) + ".tmp").exists()  # nothing half-written
    with pytest.raises(ValueError, match="empty"):
        tk.encode_file(tok, empty, out, progress=False)


def test_tok_malformed_tokenizer_files(tmp_path):
    tok = _tok_tokenizer()
    tok.save(tmp_path / "ok")
    vocab_path, merges_path = tmp_path / "ok" / "vocab.json", tmp_path / "ok" / "merges.txt"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "v.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed vocab file.*JSON"):
        tk.Tokenizer.from_files(bad / "v.json", merges_path)
    (bad / "v.json").write_text(json.dumps(["a", "b"]), encoding="utf-8")
    with pytest.raises(ValueError, match="malformed vocab file"):
        tk.Tokenizer.from_files(bad / "v.json", merges_path)
    (bad / "m.txt").write_text("#version: 0.2\nĠ t h\n", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed merges file.*line 2"):
        tk.Tokenizer.from_files(vocab_path, bad / "m.txt")
    (bad / "m.txt").write_text("#version: 0.2\nzz q\n", encoding="utf-8")  # "zz" is not in the vocab
    with pytest.raises(ValueError, match="not in the vocab"):
        tk.Tokenizer.from_files(vocab_path, bad / "m.txt")
    with pytest.raises(FileNotFoundError):
        tk.Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="single-byte"):
        tk.Tokenizer({0: b"a"}, [])


# ---- command line ------------------------------------------------------------------------------------

def test_tok_cli_train_then_encode(tmp_path, capsys):
    src = _tok_write(tmp_path / "in.txt", _TOK_TEXT)
    tk.main(["train", "--input", src, "--vocab-size", "400", "--out", str(tmp_path / "tok"), "--quiet"])
    tk.main(["encode", "--tokenizer", str(tmp_path / "tok"), "--input", src, "--out", str(tmp_path / "x.bin"),
             "--quiet", "--workers", "1"])
    out = capsys.readouterr().out
    assert "bytes/token" in out
    tok = tk.Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 400 and tok.special_tokens == [_TOK_EOT]
    assert np.fromfile(tmp_path / "x.bin", dtype=np.uint16).tolist() == tok.encode(_TOK_TEXT)
    # --help explains every option (argparse exits 0)
    res = subprocess.run([sys.executable, str(Path(tk.__file__)), "train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--vocab-size" in res.stdout and "--special-tokens" in res.stdout


@functools.lru_cache(maxsize=None)
def _tok_odd_tokenizer():
    vocab, merges = _tok_trained()
    tok = tk.Tokenizer(vocab, merges, [_TOK_EOT, _TOK_ODD_SPECIAL])
    tok.STREAM_BUFFER = 16  # flush after every few characters
    return tok


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["a b", "x\ny", " ", "\n", _TOK_EOT, "<|end of\ntext|>"])),
                max_size=40),
       st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_tok_property_encode_iterable_any_chunking(parts, cuts):
    # arbitrary Unicode around every kind of cut point and special token, split at arbitrary places
    tok = _tok_odd_tokenizer()
    text = "".join(parts)
    cuts = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)
