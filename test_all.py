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



# ====================================================================================================================
# Stage 2: model.py
# ====================================================================================================================
# ------------------------------------------------------------------------------------------------------
# Stage 2: model.py -- the Transformer LM, its switches, accounting and inference
# ------------------------------------------------------------------------------------------------------
import json
import math

import pytest
import torch
import torch.nn.functional as F

import model as M


@pytest.fixture
def _model_one_thread():
    """Tiny models are dominated by per-op overhead; a second intra-op thread only adds synchronization
    (10x slower on a loaded 2-core box). Every test in this section runs single-threaded, then restores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model_tiny(**switches):
    """A tiny model (fast on CPU) with any switches; fixed seed so tests are deterministic."""
    torch.manual_seed(0)
    base = dict(vocab_size=37, context_length=32, d_model=32, num_layers=2, num_heads=4)
    base.update(switches)
    return M.TransformerLM(**base)


# Every switch value at least once (and a few combinations).
_MODEL_SWITCHES = [
    {},
    {"norm": "layernorm"},
    {"norm": "none"},
    {"norm_position": "post"},
    {"norm_position": "post", "norm": "layernorm"},
    {"position": "sinusoidal"},
    {"position": "nope"},
    {"ffn": "silu"},
    {"ffn": "relu"},
    {"num_experts": 4, "experts_top_k": 2},
    {"num_experts": 3, "experts_top_k": 1, "ffn": "relu"},
    {"attention": "sliding", "window_size": 5},
    {"num_kv_heads": 2},
    {"num_kv_heads": 1},
    {"qk_norm": True},
    {"tie_embeddings": True},
    {"attn_impl": "naive"},
    {"attn_impl": "naive", "attention": "sliding", "window_size": 4, "num_kv_heads": 2},
    {"attention": "sliding", "window_size": 3, "num_kv_heads": 1, "qk_norm": True, "position": "sinusoidal"},
]


def _model_id(sw):
    return ",".join(f"{k}={v}" for k, v in sw.items()) or "default"


# --- primitives vs independent computations -------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_linear_matches_f_linear_and_init():
    torch.manual_seed(0)
    lin = M.Linear(300, 200)
    assert lin.weight.shape == (200, 300)
    x = torch.randn(2, 5, 300)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    std = math.sqrt(2 / 500)
    assert abs(lin.weight.std().item() - std) < 0.1 * std  # truncation shrinks std by ~1.3%
    assert lin.weight.abs().max().item() <= 3 * std + 1e-6


@pytest.mark.usefixtures("_model_one_thread")
def test_model_embedding_matches_f_embedding_and_init():
    torch.manual_seed(0)
    emb = M.Embedding(1000, 64)
    ids = torch.randint(0, 1000, (3, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max().item() <= 3.0
    assert abs(emb.weight.std().item() - 1.0) < 0.05


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_rmsnorm_matches_torch_and_float64(dtype):
    torch.manual_seed(0)
    norm = M.RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(4, 9, 64) * 30).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), **tol)
    torch.testing.assert_close(M.RMSNorm(64)(x.float()), F.rms_norm(x.float(), (64,), eps=1e-5))


@pytest.mark.usefixtures("_model_one_thread")
def test_model_layernorm_matches_torch():
    torch.manual_seed(0)
    ln = M.LayerNorm(48)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(48))
        ln.bias.copy_(torch.randn(48))
    x = torch.randn(3, 5, 48) * 4 + 2
    torch.testing.assert_close(ln(x), F.layer_norm(x, (48,), ln.weight, ln.bias, eps=1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_silu_swiglu_feedforward_vs_reference():
    torch.manual_seed(0)
    x = torch.randn(1000) * 10
    torch.testing.assert_close(M.silu(x), F.silu(x))
    ffn = M.SwiGLU(16, 48)
    h = torch.randn(2, 3, 16)
    h64 = h.double()
    w1, w2, w3 = (getattr(ffn, n).weight.double() for n in ("w1", "w2", "w3"))
    ref = (F.silu(h64 @ w1.T) * (h64 @ w3.T)) @ w2.T
    torch.testing.assert_close(ffn(h).double(), ref, atol=1e-5, rtol=1e-5)
    relu = M.FeedForward(16, 64, "relu")
    torch.testing.assert_close(relu(h), F.relu(h @ relu.w1.weight.T) @ relu.w2.weight.T)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_softmax_stable_and_matches_torch():
    x = torch.tensor([[1000.0, 1001.0, 999.0], [-1e4, 0.0, 1e4], [0.0, 0.0, 0.0]])
    y = M.softmax(x, dim=-1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.softmax(x, dim=-1))
    z = torch.randn(4, 5, 6)
    torch.testing.assert_close(M.softmax(z, dim=1), torch.softmax(z, dim=1))


@pytest.mark.usefixtures("_model_one_thread")
def test_model_sdpa_from_scratch_matches_torch_any_batch_dims():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 7, 8), torch.randn(2, 3, 4, 9, 8), torch.randn(2, 3, 4, 9, 5)
    mask = torch.rand(7, 9) > 0.3
    mask[:, 0] = True  # every query sees something
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
                               F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_causal_window_mask_hand_example():
    # 3 queries = the last 3 of 5 keys (positions 2, 3, 4), window 2: each sees itself and one before
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(M.causal_window_mask(3, 5, 2), expected)
    assert torch.equal(M.causal_window_mask(3, 3, None), torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("tq,tk", [(6, 6), (1, 6), (3, 6)])
def test_model_backends_agree_with_each_other_and_torch(window, tq, tk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, tq, 8), torch.randn(2, 4, tk, 8), torch.randn(2, 4, tk, 8)
    a = M.naive_attention(q, k, v, causal=True, window=window)
    b = M.sdpa_attention(q, k, v, causal=True, window=window)
    mask = M.causal_window_mask(tq, tk, window)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_rope_matches_complex_float64_rotation():
    torch.manual_seed(0)
    theta, d_k, T = 10000.0, 16, 12
    rope = M.RotaryPositionalEmbedding(theta, d_k, 64)
    x = torch.randn(2, T, d_k)
    pos = torch.randint(0, 64, (2, T))
    y = rope(x, pos)
    # independent: pair (x[2j], x[2j+1]) as a complex number times e^{i pos theta^(-2j/d)}
    freqs = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)
    angle = pos.double()[..., None] * freqs
    z = torch.view_as_complex(x.double().reshape(2, T, d_k // 2, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(2, T, d_k)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert "cos" not in dict(rope.state_dict())  # tables are buffers, not weights


@pytest.mark.usefixtures("_model_one_thread")
def test_model_rope_relative_position_property():
    torch.manual_seed(0)
    rope = M.RotaryPositionalEmbedding(10000.0, 32, 128)
    q, k = torch.randn(32), torch.randn(32)

    def score(m, n):
        return (rope(q[None], torch.tensor([m])) * rope(k[None], torch.tensor([n]))).sum().item()

    base = score(10, 3)
    for shift in (1, 17, 60):
        assert abs(score(10 + shift, 3 + shift) - base) < 1e-4
    assert abs(score(10, 4) - base) > 1e-3  # a different offset gives a different score


# --- attention module, causality, switches -------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1}, {"attention": "sliding", "window_size": 4},
                                {"qk_norm": True}], ids=_model_id)
def test_model_attention_naive_equals_sdpa_in_model(sw):
    m = _model_tiny(**sw)
    x = torch.randint(0, 37, (3, 20))
    M.set_attention_backend(m, "naive")
    a = m(x)
    assert m.config.attn_impl == "naive" and all(l.attn.attn_impl == "naive" for l in m.layers)
    M.set_attention_backend(m, "sdpa")
    torch.testing.assert_close(a, m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_mhsa_matches_independent_multihead_computation():
    torch.manual_seed(0)
    d, H, T = 24, 3, 7
    mha = M.MultiHeadSelfAttention(d, H, max_seq_len=16, theta=10000.0, attn_impl="naive")
    x = torch.randn(2, T, d)
    x64 = x.double()
    q = (x64 @ mha.q_proj.weight.double().T).view(2, T, H, 8).transpose(1, 2)
    k = (x64 @ mha.k_proj.weight.double().T).view(2, T, H, 8).transpose(1, 2)
    v = (x64 @ mha.v_proj.weight.double().T).view(2, T, H, 8).transpose(1, 2)
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rot = torch.polar(torch.ones(T, 4, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * freqs)
    q = torch.view_as_real(torch.view_as_complex(q.reshape(2, H, T, 4, 2).contiguous()) * rot).reshape(2, H, T, 8)
    k = torch.view_as_real(torch.view_as_complex(k.reshape(2, H, T, 4, 2).contiguous()) * rot).reshape(2, H, T, 8)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, T, d)
    ref = a @ mha.output_proj.weight.double().T
    torch.testing.assert_close(mha(x).double(), ref, atol=1e-5, rtol=1e-5)
    # token_positions with a batch shape: explicit positions 0..T-1 give the same result
    torch.testing.assert_close(mha(x, torch.arange(T).expand(2, T)).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_SWITCHES, ids=_model_id)
def test_model_causality_every_variant(sw):
    """Changing token t changes no logit at positions < t."""
    m = _model_tiny(**sw)
    m.eval()
    x = torch.randint(0, 37, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 37
    with torch.no_grad():
        lx, ly = m(x), m(y)
    torch.testing.assert_close(lx[:, :9], ly[:, :9], atol=1e-5, rtol=1e-5)
    assert (lx[:, 9:] - ly[:, 9:]).abs().max() > 1e-4  # and it does change the rest


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_SWITCHES, ids=_model_id)
def test_model_every_switch_forward_backward(sw):
    m = _model_tiny(**sw)
    x = torch.randint(0, 37, (4, 24))
    logits = m(x)
    assert logits.shape == (4, 24, 37) and torch.isfinite(logits).all()
    loss = F.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten()) + m.aux_loss
    loss.backward()
    for name, p in m.named_parameters():
        if ".experts." in name and p.grad is None:
            continue  # an expert that received no token this batch has no gradient
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert m.config.to_dict()["d_ff"] is not None


@pytest.mark.usefixtures("_model_one_thread")
def test_model_window_limits_receptive_field():
    """With window 3 and 2 layers a token influences logits at most 2*(3-1) = 4 positions later."""
    m = _model_tiny(attention="sliding", window_size=3, position="nope")
    m.eval()
    x = torch.randint(0, 37, (1, 16))
    y = x.clone()
    y[0, 2] = (y[0, 2] + 5) % 37
    with torch.no_grad():
        d = (m(x) - m(y)).abs().amax(-1)[0]
    assert d[2:7].min() > 1e-6 and d[7:].max() < 1e-6


@pytest.mark.usefixtures("_model_one_thread")
def test_model_moe_routing_sums_and_mixture():
    torch.manual_seed(0)
    moe = M.MoEFeedForward(16, 32, num_experts=4, top_k=2)
    x = torch.randn(3, 5, 16)
    probs, gates, idx = moe.route(x.reshape(-1, 16))
    torch.testing.assert_close(probs.sum(-1), torch.ones(15))
    torch.testing.assert_close(gates.sum(-1), torch.ones(15))
    # the output is the gate-weighted sum of the chosen experts, recomputed token by token
    y = moe(x).reshape(-1, 16)
    xf = x.reshape(-1, 16)
    for n in range(15):
        ref = sum(gates[n, j] * moe.experts[int(idx[n, j])](xf[n]) for j in range(2))
        torch.testing.assert_close(y[n], ref, atol=1e-5, rtol=1e-5)
    # aux = E * sum_i f_i P_i, by hand
    f = torch.bincount(idx.flatten(), minlength=4).float() / 30
    torch.testing.assert_close(moe.aux_loss, 4 * (f * probs.mean(0)).sum())


@pytest.mark.usefixtures("_model_one_thread")
def test_model_moe_uniform_router_gives_aux_one_and_model_weighting():
    m = _model_tiny(num_experts=4, experts_top_k=1, moe_aux_weight=0.5)
    for layer in m.layers:
        torch.nn.init.zeros_(layer.ffn.router.weight)  # uniform probabilities
    m(torch.randint(0, 37, (2, 8)))
    # P_i = 1/4 for all i, sum_i f_i = 1 -> E * sum f_i P_i = 1 regardless of ties
    torch.testing.assert_close(m.aux_loss, torch.tensor(0.5))
    dense = _model_tiny()
    dense(torch.randint(0, 37, (2, 8)))
    assert float(dense.aux_loss) == 0.0


@pytest.mark.usefixtures("_model_one_thread")
def test_model_matches_torch_layers_peer():
    cfg = M.ModelConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    ours = M.TransformerLM.from_config(cfg)
    peer = M.TorchLayersLM(cfg)
    peer.load_state_dict(ours.state_dict())
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(ours(x), peer(x), atol=1e-4, rtol=1e-4)


# --- state dict, config, registry ------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_state_dict_names_match_cs336_layout():
    m = _model_tiny()
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn.{p}_proj.weight" for p in ("q", "k", "v", "output")}
        expected |= {f"layers.{i}.ln1.weight", f"layers.{i}.ln2.weight"}
        expected |= {f"layers.{i}.ffn.{w}.weight" for w in ("w1", "w2", "w3")}
    sd = m.state_dict()
    assert set(sd) == expected
    assert sd["layers.0.attn.q_proj.weight"].shape == (32, 32)
    assert sd["layers.0.ffn.w1.weight"].shape == (m.config.d_ff, 32)  # [out, in]
    # a reference-layout dict built from plain tensors loads, and round-trips exactly
    fresh = _model_tiny()
    ref = {k: torch.randn_like(v) for k, v in sd.items()}
    fresh.load_state_dict(ref)
    assert all(torch.equal(fresh.state_dict()[k], ref[k]) for k in ref)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_tied_embeddings_share_one_matrix():
    m = _model_tiny(tie_embeddings=True)
    assert m.lm_head.weight is m.token_embeddings.weight
    assert M.num_params(m) == M.num_params(_model_tiny()) - 37 * 32


@pytest.mark.usefixtures("_model_one_thread")
def test_model_config_roundtrip_and_defaults():
    cfg = M.ModelConfig(vocab_size=10, context_length=8, d_model=96, num_layers=1, num_heads=4)
    assert cfg.d_ff == 256  # 8/3 * 96 = 256, a multiple of 64
    assert M.ModelConfig(vocab_size=10, context_length=8, d_model=64, num_layers=1, num_heads=4).d_ff == 192
    assert M.ModelConfig(vocab_size=10, context_length=8, d_model=64, num_layers=1, num_heads=4, ffn="relu").d_ff == 256
    assert cfg.num_kv_heads == 4
    d = json.loads(json.dumps(cfg.to_dict()))
    assert M.ModelConfig.from_dict(d) == cfg
    m = M.TransformerLM.from_config(cfg)
    assert m.config == cfg


@pytest.mark.usefixtures("_model_one_thread")
def test_model_register_custom_backend_is_used():
    calls = []

    def counting(q, k, v, *, causal, window):
        calls.append((q.shape, k.shape, causal, window))
        return M.naive_attention(q, k, v, causal=causal, window=window)

    M.register_attention_backend("test_model_counting", counting)
    try:
        m = _model_tiny(num_kv_heads=2)
        x = torch.randint(0, 37, (2, 10))
        ref = m(x)
        M.set_attention_backend(m, "test_model_counting")
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == 2 and calls[0][1] == (2, 4, 10, 8)  # KV heads expanded to H for the backend
        with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
            M.set_attention_backend(m, "nope")
    finally:
        M.ATTENTION_BACKENDS.pop("test_model_counting")


# --- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_bad_token_ids_and_lengths():
    m = _model_tiny()
    with pytest.raises(ValueError, match="token id 37 is outside the vocabulary"):
        m(torch.tensor([[1, 37]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's context_length 32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        M.generate(m, [1, 2, 99], 2)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        M.generate(m, [1] * 30, 5)


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(d_model=30, num_heads=4), "d_model=30 is not divisible by num_heads=4"),
    (dict(num_kv_heads=3), "num_heads=4 is not divisible by num_kv_heads=3"),
    (dict(norm="batchnorm"), r"ModelConfig.norm='batchnorm' is not one of \['rmsnorm', 'layernorm', 'none'\]"),
    (dict(norm_position="middle"), "norm_position='middle'"),
    (dict(position="alibi"), r"position='alibi' is not one of \['rope', 'sinusoidal', 'nope'\]"),
    (dict(ffn="gelu"), r"ffn='gelu' is not one of"),
    (dict(attention="local"), r"attention='local' is not one of \['full', 'sliding'\]"),
    (dict(attention="sliding"), "needs window_size"),
    (dict(window_size=4), "only used with attention='sliding'"),
    (dict(num_experts=2, experts_top_k=3), "experts_top_k=3"),
    (dict(attn_impl="flash9"), "attn_impl='flash9' is not one of"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_model_bad_config_values(kwargs, pattern):
    base = dict(vocab_size=37, context_length=32, d_model=32, num_layers=2, num_heads=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        M.ModelConfig(**base)
    with pytest.raises(ValueError, match=pattern):
        M.TransformerLM(**base)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_bad_config_dict_and_state_dict():
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['n_layer'\]"):
        M.ModelConfig.from_dict({"vocab_size": 5, "context_length": 4, "d_model": 8, "num_layers": 1,
                                 "num_heads": 2, "n_layer": 3})
    m = _model_tiny()
    sd = m.state_dict()
    bad = dict(sd)
    del bad["layers.1.ffn.w2.weight"]
    bad["layers.1.ffn.w4.weight"] = torch.zeros(3)
    with pytest.raises(M.StateDictMismatchError,
                       match=r"missing keys \['layers.1.ffn.w2.weight'\]; unexpected keys \['layers.1.ffn.w4.weight'\]"):
        M.load_model_state(m, bad)
    with pytest.raises(RuntimeError, match="missing keys"):  # also a RuntimeError, like torch's own
        m.load_state_dict(bad)
    wrong = dict(sd)
    wrong["lm_head.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match=r"lm_head.weight: checkpoint \(5, 32\) vs model \(37, 32\)"):
        m.load_state_dict(wrong)
    # wrapper prefixes from torch.compile / DDP are accepted
    M.load_model_state(m, {"_orig_mod.module." + k: v for k, v in sd.items()})


# --- accounting ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_flops_and_params_hand_count():
    # V=10, T=4, d=8, L=1, H=2 (dh=4), d_ff=16, SwiGLU, full causal attention, untied.
    cfg = M.ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16)
    # forward FLOPs per token (2mnp per matmul, one token = one row):
    #   q, k, v, output projections: 4 * 2*8*8                       = 512
    #   Q K^T: 2 heads * 2 * dh(4) * mean keys (1+2+3+4)/4 = 2.5      =  40
    #   A V: same                                                     =  40
    #   SwiGLU w1, w3 (8->16), w2 (16->8): 3 * 2*8*16                 = 768
    #   LM head 8 -> 10: 2*8*10                                       = 160
    #   total                                                         = 1520
    assert M.flops_per_token(cfg) == 1520
    assert M.flops_per_token(cfg, training=True) == 3 * 1520
    # full rows (Kaplan/PaLM convention): 4 keys per query -> attention 2 * 2*2*4*4 = 128, total 1568
    assert M.flops_per_token(cfg, causal_average=False) == 1568
    # parameters: embedding 80 + [attn 4*64 + ln1 8 + ln2 8 + ffn 3*128] + ln_final 8 + head 80 = 824
    assert M.num_params(cfg) == 824
    assert M.num_params(cfg, include_embeddings=False) == 824 - 160
    m = M.TransformerLM.from_config(cfg)
    assert M.num_params(m) == 824 and M.num_params(m, include_embeddings=False) == 664


@pytest.mark.usefixtures("_model_one_thread")
def test_model_flops_agree_with_torch_flop_counter():
    """torch's FlopCounterMode counts 2mnp for every mm/bmm the naive model really runs (full T x T)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = M.ModelConfig(vocab_size=50, context_length=12, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        attn_impl="naive")
    m = M.TransformerLM.from_config(cfg)
    with FlopCounterMode(display=False) as fc:
        m(torch.randint(0, 50, (3, 12)))
    assert fc.get_total_flops() == 3 * 12 * M.flops_per_token(cfg, causal_average=False)


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_SWITCHES, ids=_model_id)
def test_model_num_params_formula_matches_module(sw):
    m = _model_tiny(**sw)
    assert M.num_params(m.config) == M.num_params(m)
    assert M.num_params(m.config, include_embeddings=False) == M.num_params(m, include_embeddings=False)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_moe_and_window_flops():
    dense = M.ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16)
    moe = M.ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16,
                        num_experts=4, experts_top_k=2)
    # MoE: router 2*8*4 = 64, two experts 2*768 -> 1520 - 768 + 64 + 1536 = 2352
    assert M.flops_per_token(moe) == 2352
    win = M.ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16,
                        attention="sliding", window_size=2)
    # mean keys min(i+1, 2) over i=0..3 = (1+2+2+2)/4 = 1.75 -> scores 2 * 2*2*4*1.75 = 56 (vs 80)
    assert M.flops_per_token(win) == M.flops_per_token(dense) - 80 + 56


@pytest.mark.usefixtures("_model_one_thread")
def test_model_memory_estimate_hand_count():
    cfg = M.ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16)
    mem = M.memory_estimate(cfg, batch_size=2, optimizer="adamw", dtype_bytes=4)
    assert mem["params"] == 824 * 4 and mem["grads"] == 824 * 4 and mem["optimizer_state"] == 2 * 824 * 4
    # activations per token (sdpa, scores not stored): per layer 4d (norm in/out x2) = 32, q,k,v 24, attn out 8,
    # logsumexp 2 heads, SwiGLU 4*16 = 64 -> 130; final norm 16 + logits/softmax 20 -> 166 per token
    assert mem["activations"] == 166 * 2 * 4 * 4
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    naive = M.memory_estimate(M.ModelConfig(**{**cfg.to_dict(), "attn_impl": "naive"}), 2)
    # materialized scores + probs: 2 * H * T = 16 per token instead of 2
    assert naive["activations"] - mem["activations"] == (16 - 2) * 2 * 4 * 4
    with pytest.raises(ValueError, match="optimizer='lion'"):
        M.memory_estimate(cfg, 2, optimizer="lion")


# --- inference ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_top_p_filter_hand_example():
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    # sorted 0.5, 0.25, 0.15, 0.1 ; mass before: 0, 0.5, 0.75, 0.9 ; top_p 0.7 keeps 0.5 and 0.25
    torch.testing.assert_close(M.top_p_filter(p, 0.7), torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(M.top_p_filter(p, 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(M.top_p_filter(p, 1.0), p)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_sampler_distribution_and_temperature():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    draws = torch.stack([M.sample_from_probs(p, g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[1] == 0 and (freq - p[0]).abs().max() < 0.03
    logits = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(M.logits_to_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    assert torch.equal(M.logits_to_probs(logits, 0), torch.tensor([0.0, 0.0, 1.0]))


_MODEL_CACHE_VARIANTS = [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1}, {"attention": "sliding", "window_size": 4},
                         {"attention": "sliding", "window_size": 5, "num_kv_heads": 2}, {"position": "sinusoidal"},
                         {"position": "nope"}, {"num_experts": 3, "experts_top_k": 2}, {"attn_impl": "naive"},
                         {"norm_position": "post", "qk_norm": True}]


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_CACHE_VARIANTS, ids=_model_id)
def test_model_kv_cache_greedy_equals_recompute(sw):
    m = _model_tiny(**sw)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4]]
    cached = M.generate(m, prompts, 14, temperature=0, use_cache=True)
    full = M.generate(m, prompts, 14, temperature=0, use_cache=False)
    alone = [M.generate(m, p, 14, temperature=0, use_cache=False)[0] for p in prompts]
    assert cached == full == alone
    assert all(len(o) == 14 for o in cached)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_kv_cache_logits_match_full_forward():
    """Prefill + one-token steps reproduce the full forward's logits at every position (rolling buffer too)."""
    for sw in ({}, {"attention": "sliding", "window_size": 3, "num_kv_heads": 2}):
        m = _model_tiny(**sw).eval()
        x = torch.randint(0, 37, (2, 20))
        with torch.no_grad():
            full = m(x)
            cache = M.KVCache(m.config, 2, 20)
            steps = [m(x[:, :7], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        if sw:
            assert cache.capacity == 3 and cache.k[0].shape[2] == 3  # O(window) memory


@pytest.mark.usefixtures("_model_one_thread")
def test_model_generate_sampling_reproducible_and_eos():
    m = _model_tiny()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = M.generate(m, [[1, 2], [3]], 10, temperature=1.0, top_p=0.9, generator=g1)
    b = M.generate(m, [[1, 2], [3]], 10, temperature=1.0, top_p=0.9, generator=g2)
    assert a == b
    greedy = M.generate(m, [1, 2, 3], 12, temperature=0)[0]
    eos = greedy[4]
    stopped = M.generate(m, [1, 2, 3], 12, temperature=0, eos_id=eos)[0]
    assert stopped == greedy[:greedy.index(eos) + 1]
    # nucleus with tiny top_p is greedy
    assert M.generate(m, [1, 2, 3], 12, temperature=1.0, top_p=1e-6, generator=g1)[0] == greedy
    with pytest.raises(ValueError, match="top_p"):
        M.generate(m, [1], 2, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        M.generate(m, [1], 2, temperature=-1)


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", [{}, {"attention": "sliding", "window_size": 4, "num_kv_heads": 2}], ids=_model_id)
def test_model_speculative_greedy_equals_target_greedy(sw):
    target = _model_tiny(**sw)
    torch.manual_seed(1)
    draft = M.TransformerLM(37, 32, 16, 1, 2)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    for k in (1, 3, 5):
        out, stats = M.speculative_generate(target, draft, prompts, 20, k=k, temperature=0, return_stats=True)
        assert out == M.generate(target, prompts, 20, temperature=0)
        assert 0 <= stats["acceptance_rate"] <= 1 and stats["proposed"] > 0
    # a draft identical to the target is always accepted
    out, stats = M.speculative_generate(target, target, prompts, 20, k=4, temperature=0, return_stats=True)
    assert stats["acceptance_rate"] == 1.0 and out == M.generate(target, prompts, 20, temperature=0)


def _model_chi2_critical(df: int) -> float:
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile (z = 3.09)
    z = 3.090232
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.usefixtures("_model_one_thread")
def test_model_speculative_sampling_keeps_target_distribution():
    """The first two sampled tokens follow the target's distribution, though the draft's is far away."""
    V = 6
    torch.manual_seed(0)
    target = M.TransformerLM(V, 16, 16, 1, 2)
    draft = M.TransformerLM(V, 16, 16, 1, 2)
    with torch.no_grad():  # flip the draft's head so the two distributions differ a lot
        draft.lm_head.weight.mul_(-1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0, -1], -1)
    assert 0.5 * (p1 - q1).abs().sum() > 0.2  # the test has power: the draft alone would fail it
    g = torch.Generator().manual_seed(0)
    n = 1000
    firsts, pairs = [], []
    stats_acc = []
    for _ in range(n):
        out, st = M.speculative_generate(target, draft, prompt, 2, k=2, temperature=1.0, generator=g,
                                         return_stats=True)
        firsts.append(out[0][0])
        pairs.append(out[0])
        stats_acc.append(st["accepted"])
    counts = torch.bincount(torch.tensor(firsts), minlength=V).double()
    expected = n * p1.double()
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    critical = _model_chi2_critical(int(keep.sum()) - 1)
    assert chi2 < critical, (counts, expected)
    # power: sampling the draft instead would give an expected statistic far above the critical value
    assert n * ((q1 - p1) ** 2 / p1).sum().item() > 5 * critical
    # second token given the first: compare to the target's conditional for the most common first token
    t0 = int(counts.argmax())
    seconds = torch.tensor([o[1] for o in pairs if o[0] == t0])
    with torch.no_grad():
        p2 = torch.softmax(target(torch.tensor([prompt + [t0]]))[0, -1], -1).double()
    c2 = torch.bincount(seconds, minlength=V).double()
    e2 = len(seconds) * p2
    keep2 = e2 > 5
    chi2b = ((c2[keep2] - e2[keep2]) ** 2 / e2[keep2]).sum().item()
    assert chi2b < _model_chi2_critical(int(keep2.sum()) - 1), (c2, e2)
    assert 0 < sum(stats_acc) < 2 * n  # both the accept and the reject paths ran


@pytest.mark.usefixtures("_model_one_thread")
def test_model_speculative_accept_exact_distribution_vectorized_check():
    """speculative_accept's first emitted token is distributed as p, checked against the exact formula."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.1, 0.7]])
    n = 6000
    first = torch.zeros(4)
    for _ in range(n):
        d = M.sample_from_probs(q, g)
        out, _ = M.speculative_accept(p, q, d, g)
        first[out[0]] += 1
    assert ((first / n) - p[0]).abs().max() < 0.025
    assert first[3] == 0  # a token the target gives probability 0 is never emitted


# --- command line ------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_cli_table_and_generate_from_checkpoint(tmp_path, capsys):
    M.main(["table", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert "gpt2-small" in out and "gpt2-xl" in out
    m = _model_tiny()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "scratchlm-checkpoint-v1", "model": m.state_dict(), "model_config": m.config.to_dict(),
                "iteration": 3}, ckpt)
    M.main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
            "--temperature", "0"])
    out = capsys.readouterr().out
    expected = M.generate(m, [1, 2, 3], 5, temperature=0)[0]
    assert ",".join(map(str, expected)) in out
    # the contract's alternative layout: config dict with a "model" sub-dict
    torch.save({"model": m.state_dict(), "config": {"model": m.config.to_dict()}}, ckpt)
    M.main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
            "--temperature", "0"])
    assert ",".join(map(str, expected)) in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.main(["generate", "--checkpoint", str(tmp_path / "missing.pt"), "--prompt-ids", "1"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        M.main(["generate", "--checkpoint", str(tmp_path / "junk.pt"), "--prompt-ids", "1"])


@pytest.mark.usefixtures("_model_one_thread")
def test_model_block_cs336_signature_and_composition():
    torch.manual_seed(0)
    block = M.TransformerBlock(d_model=16, num_heads=2, d_ff=32, max_seq_len=8, theta=10000.0)
    assert set(block.state_dict()) == {"ln1.weight", "ln2.weight", "attn.q_proj.weight", "attn.k_proj.weight",
                                       "attn.v_proj.weight", "attn.output_proj.weight", "ffn.w1.weight",
                                       "ffn.w2.weight", "ffn.w3.weight"}
    x = torch.randn(2, 8, 16)
    h = x + block.attn(block.ln1(x))
    torch.testing.assert_close(block(x), h + block.ffn(block.ln2(h)))
    # MHSA without position (CS336's first signature)
    mha = M.MultiHeadSelfAttention(16, 2)
    assert mha.rope is None and mha(x).shape == x.shape
    # 1-D input gives 2-D logits
    m = _model_tiny()
    ids = torch.randint(0, 37, (9,))
    torch.testing.assert_close(m(ids), m(ids[None])[0])


@pytest.mark.usefixtures("_model_one_thread")
def test_model_batched_eos_stops_rows_independently():
    m = _model_tiny()
    prompts = [[1, 2, 3], [4, 5]]
    alone = [M.generate(m, p, 10, temperature=0)[0] for p in prompts]
    eos = alone[0][3]
    batched = M.generate(m, prompts, 10, temperature=0, eos_id=eos)
    for out, ref in zip(batched, alone):
        expect = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert out == expect


@pytest.mark.usefixtures("_model_one_thread")
def test_model_cli_generate_with_tokenizer_dir(tmp_path, capsys):
    """End to end with tokenizer.py: a byte-level tokenizer (no merges) saved next to the checkpoint."""
    import tokenizer as tk
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"<|endoftext|>"
    tok = tk.Tokenizer(vocab, [], ["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    m = M.TransformerLM(257, 32, 32, 1, 2)
    torch.save({"model": m.state_dict(), "model_config": m.config.to_dict()}, tmp_path / "ckpt.pt")
    M.main(["generate", "--checkpoint", str(tmp_path / "ckpt.pt"), "--prompt", "ab", "--max-new-tokens", "6",
            "--temperature", "0"])
    out = capsys.readouterr().out
    new = [t for t in M.generate(m, tok.encode("ab"), 6, temperature=0, eos_id=256)[0] if t != 256]
    assert "ab" + tok.decode(new) in out



# ===================================================================================================
# Stage 3: train.py -- loss, optimizers, schedules, clipping, batches, synthetic corpus, downloads,
# checkpoints / exact resume, the training loop end to end, bad inputs.
# ===================================================================================================
import gzip as _train_gzip
import http.server as _train_http
import io as _train_io
import json as _train_json
import math as _train_math
import threading as _train_threading
from pathlib import Path as _TrainPath

import numpy as _train_np
import pytest
import torch as _train_torch
import torch.nn.functional as _train_F

import train as T


# ---------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------
def test_train_cross_entropy_matches_torch_and_is_stable():
    g = _train_torch.Generator().manual_seed(0)
    logits = _train_torch.randn(4, 7, 11, generator=g)
    targets = _train_torch.randint(0, 11, (4, 7), generator=g)
    ref = _train_F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert _train_torch.allclose(T.cross_entropy(logits, targets), ref, atol=1e-6)
    assert _train_torch.allclose(T.cross_entropy_fast(logits, targets), ref, atol=1e-6)
    # huge logits: naive exp overflows to inf; ours must stay finite and equal torch's
    huge = logits * 1e4
    ours = T.cross_entropy(huge, targets)
    assert _train_torch.isfinite(ours)
    assert _train_torch.allclose(ours, _train_F.cross_entropy(huge.reshape(-1, 11), targets.reshape(-1)), rtol=1e-5)
    # hand-worked: uniform logits over V classes -> loss ln V
    assert abs(float(T.cross_entropy(_train_torch.zeros(3, 5), _train_torch.tensor([0, 1, 4]))) - _train_math.log(5)) < 1e-6
    # bits per byte: 2 tokens, total ln(2)*8 nats over 4 bytes = 2 bits/byte
    assert abs(T.bits_per_byte(8 * _train_math.log(2), 4) - 2.0) < 1e-12


# ---------------------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------------------
def _train_grads(steps, shape, seed=0):
    g = _train_torch.Generator().manual_seed(seed)
    return [_train_torch.randn(*shape, generator=g, dtype=_train_torch.float64) for _ in range(steps)]


def test_train_adamw_matches_float64_formula():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    theta0 = _train_torch.randn(5, 3, generator=_train_torch.Generator().manual_seed(1), dtype=_train_torch.float64)
    grads = _train_grads(6, (5, 3))
    p = _train_torch.nn.Parameter(theta0.clone().float())
    opt = T.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    theta, m, v = theta0.clone(), _train_torch.zeros_like(theta0), _train_torch.zeros_like(theta0)
    for t, gr in enumerate(grads, start=1):
        p.grad = gr.float()
        opt.step()
        m = b1 * m + (1 - b1) * gr
        v = b2 * v + (1 - b2) * gr * gr
        alpha = lr * _train_math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        theta = theta - alpha * m / (v.sqrt() + eps)
        theta = theta - lr * wd * theta
    assert _train_torch.allclose(p.detach().double(), theta, atol=1e-6)


def test_train_adamw_matches_torch_adamw():
    grads = _train_grads(8, (4, 6), seed=2)
    init = _train_torch.randn(4, 6, generator=_train_torch.Generator().manual_seed(3))
    a = _train_torch.nn.Parameter(init.clone())
    b = _train_torch.nn.Parameter(init.clone())
    oa = T.AdamW([a], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ob = _train_torch.optim.AdamW([b], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for gr in grads:
        a.grad, b.grad = gr.float(), gr.float().clone()
        oa.step()
        ob.step()
    # torch applies decay before the Adam step, the handout after: equal to O(lr^2 * wd)
    assert _train_torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="learning rate"):
        T.AdamW([a], lr=-1.0)


def test_train_muon_newton_schulz_orthogonalizes_and_steps():
    G = _train_torch.randn(16, 48, generator=_train_torch.Generator().manual_seed(0))
    O = T.zeropower_via_newtonschulz5(G)
    s = _train_torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3  # all singular values pushed near 1 (quintic NS lands in ~[0.7, 1.2])
    U, _, Vh = _train_torch.linalg.svd(G, full_matrices=False)
    cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cos > 0.95  # direction of the exact orthogonal factor U V^T
    assert T.zeropower_via_newtonschulz5(G.T).shape == (48, 16)  # tall matrices handled via the transpose
    # first Muon step (nesterov): buf = (1-mu) g ; update = g + mu (buf - g) ; W -= lr * scale * NS(update)
    w = _train_torch.nn.Parameter(_train_torch.zeros(48, 16))
    w.grad = G.T.clone()
    opt = T.Muon([w], lr=0.1, momentum=0.9)
    opt.step()
    upd = G.T + 0.9 * ((1 - 0.9) * G.T - G.T)
    expect = -0.1 * (48 / 16) ** 0.5 * T.zeropower_via_newtonschulz5(upd)
    assert _train_torch.allclose(w.detach(), expect, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        T.Muon([_train_torch.nn.Parameter(_train_torch.zeros(3))])


# ---------------------------------------------------------------------------------------------------
# schedules, clipping
# ---------------------------------------------------------------------------------------------------
def test_train_cosine_schedule_hand_values():
    f = lambda it: T.get_lr_cosine_schedule(it, 1.0, 0.1, 10, 110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert abs(f(60) - 0.55) < 1e-12  # halfway: min + (max - min) / 2
    assert abs(f(35) - (0.1 + 0.45 * (1 + _train_math.cos(_train_math.pi / 4)))) < 1e-12
    assert f(110) == pytest.approx(0.1) and f(500) == 0.1


def test_train_wsd_schedule_hand_values():
    f = lambda it: T.get_lr_wsd_schedule(it, 1.0, 0.1, 10, 100, decay_fraction=0.2)
    assert f(0) == 0.0 and f(5) == 0.5
    assert f(10) == 1.0 and f(50) == 1.0 and f(79) == 1.0  # stable until 80 = 100 - 0.2 * 100
    assert f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1) and f(150) == 0.1


def test_train_gradient_clipping_matches_torch():
    for max_norm in (0.1, 1e3):  # clipped and untouched
        g = _train_torch.Generator().manual_seed(0)
        ps = [_train_torch.nn.Parameter(_train_torch.randn(3, 4, generator=g)) for _ in range(3)]
        qs = [_train_torch.nn.Parameter(p.detach().clone()) for p in ps]
        for p, q in zip(ps[:2], qs[:2]):  # the third has no grad: skipped
            p.grad = _train_torch.randn(3, 4, generator=g)
            q.grad = p.grad.clone()
        n1 = T.gradient_clipping(ps, max_norm)
        n2 = _train_torch.nn.utils.clip_grad_norm_(qs, max_norm)
        assert abs(n1 - float(n2)) < 1e-5
        for p, q in zip(ps[:2], qs[:2]):
            assert _train_torch.allclose(p.grad, q.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------
def test_train_get_batch_windows_shapes_and_bad_inputs(tmp_path):
    data = _train_np.arange(100, dtype=_train_np.uint16)
    path = tmp_path / "d.bin"
    data.tofile(path)
    mm = _train_np.memmap(path, dtype=_train_np.uint16, mode="r")
    x, y = T.get_batch(mm, 32, 8, "cpu", _train_np.random.default_rng(0))
    assert x.shape == y.shape == (32, 8) and x.dtype == _train_torch.int64
    assert _train_torch.equal(y, x + 1)  # arange data: each window is consecutive, targets shifted by one
    assert _train_torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert int(x[:, 0].min()) >= 0 and int(y.max()) <= 99
    starts = set()
    for s in range(20):
        xs, _ = T.get_batch(mm, 64, 8, "cpu", _train_np.random.default_rng(s))
        starts |= set(xs[:, 0].tolist())
    assert starts == set(range(92))  # every start 0..n-T-1 is reachable, none beyond
    a, _ = T.get_batch(mm, 4, 8, "cpu", _train_np.random.default_rng(7))
    b, _ = T.get_batch(mm, 4, 8, "cpu", _train_np.random.default_rng(7))
    assert _train_torch.equal(a, b)
    with pytest.raises(ValueError, match="device"):
        T.get_batch(mm, 4, 8, "cuda:99" if not _train_torch.cuda.is_available() else "nonsense_device")
    with pytest.raises(ValueError, match="device"):
        T.get_batch(mm, 4, 8, "not-a-device")
    with pytest.raises(ValueError, match="context window"):
        T.get_batch(mm[:8], 4, 8, "cpu")


# ---------------------------------------------------------------------------------------------------
# synthetic corpus
# ---------------------------------------------------------------------------------------------------
def _train_coin_story(w):
    w.write("A story about ")
    w.pick(["heads.", "tails."])


def test_train_synthetic_determinism_and_entropy_bookkeeping(tmp_path):
    a = T.SyntheticCorpus(seed=3).write(tmp_path / "a.txt", 50_000)
    b = T.SyntheticCorpus(seed=3).write(tmp_path / "b.txt", 50_000)
    c = T.SyntheticCorpus(seed=4).write(tmp_path / "c.txt", 50_000)
    ta, tb, tc = ((tmp_path / n).read_text() for n in ("a.txt", "b.txt", "c.txt"))
    assert ta == tb and a == b and ta != tc
    assert a["bytes"] == len(ta.encode()) and ta.count(T.EOT) == a["stories"]
    # the grammar is uniquely decodable: check mode verifies prefix-freeness at every decision
    for text, bits in T.SyntheticCorpus(seed=5, check=True).stories(300):
        assert bits > 0 and text.startswith("Once upon a time")
    # two equally likely choices per story -> exactly 1 bit per story
    st = T.SyntheticCorpus(seed=0, story_fn=_train_coin_story).write(tmp_path / "coin.txt", 10_000)
    assert st["bits"] == st["stories"]
    assert st["bits_per_byte"] == st["stories"] / st["bytes"]
    texts = (tmp_path / "coin.txt").read_text().split(T.EOT)[:-1]
    assert set(texts) == {"A story about heads.", "A story about tails."}
    # a non-decodable grammar is caught in check mode
    bad = lambda w: w.pick(["a", "ab"])
    with pytest.raises(AssertionError, match="prefix"):
        list(T.SyntheticCorpus(check=True, story_fn=bad).stories(5))
    # weighted choice: p = 1/4 costs exactly 2 bits
    w = T.StoryWriter(__import__("random").Random(0))
    while True:
        before = w.bits
        i = w.pick(["x", "y"], [1, 3])
        if i == 0:
            assert w.bits - before == 2.0
            break


# ---------------------------------------------------------------------------------------------------
# downloads (local only: a Range-capable HTTP server on 127.0.0.1 and file:// URLs)
# ---------------------------------------------------------------------------------------------------
class _TrainRangeHandler(_train_http.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        path = _TrainPath(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            body = data[start:]
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def _train_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _TrainRangeHandler(*a, directory=str(root), **k)
    srv = _train_http.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = _train_threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_train_download_resume_verify_and_unpack(tmp_path, _train_server):
    root, base = _train_server
    payload = bytes(range(256)) * 1000
    (root / "f.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "f.bin"
    dest.parent.mkdir()
    _TrainPath(str(dest) + ".part").write_bytes(payload[:1234])  # an interrupted earlier download
    T.download(base + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == payload and not _TrainPath(str(dest) + ".part").exists()
    assert _TrainPath(str(dest) + ".sha256").read_text().strip() == __import__("hashlib").sha256(payload).hexdigest()
    T.download(base + "/f.bin", dest, progress=False)  # cached: verified, not re-downloaded
    dest.write_bytes(payload[:-1] + b"X")  # corrupted cache is detected
    with pytest.raises(ValueError, match="SHA-256"):
        T.download(base + "/f.bin", dest, progress=False)
    with pytest.raises(ValueError, match="verification"):
        T.download(base + "/f.bin", tmp_path / "g.bin", sha256="0" * 64, progress=False)
    with pytest.raises(ConnectionError, match="404"):
        T.download(base + "/missing.bin", tmp_path / "m.bin", progress=False)
    # file:// URL with a partial file
    fdest = tmp_path / "viafile.bin"
    _TrainPath(str(fdest) + ".part").write_bytes(payload[:999])
    T.download((root / "f.bin").as_uri(), fdest, progress=False)
    assert fdest.read_bytes() == payload
    # the dataset path of the owt files (gzip) through a mirror
    ds = root / "datasets" / "stanford-cs336" / "owt-sample" / "resolve" / "main"
    ds.mkdir(parents=True)
    for name, text in (("owt_train.txt.gz", "train text\n" * 50), ("owt_valid.txt.gz", "valid text\n" * 5)):
        (ds / name).write_bytes(_train_gzip.compress(text.encode()))
    files = T.fetch_dataset("owt", tmp_path / "cache", mirror=base, progress=False)
    assert files["train"].read_text() == "train text\n" * 50 and files["val"].read_text() == "valid text\n" * 5
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt"):
        T.unpack(bad, tmp_path / "bad.txt", "gz", progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        T.fetch_dataset("imagenet", tmp_path)


# ---------------------------------------------------------------------------------------------------
# checkpoints, the training loop, exact resume
# ---------------------------------------------------------------------------------------------------
def _train_cfg(tmp_path, **kw):
    args = T.get_parser().parse_args([])
    cfg = T.config_from_args(args)
    base = dict(data_dir=str(tmp_path.parent / "train_data_cache"), synthetic_bytes=150_000,
                synthetic_val_bytes=20_000, vocab_size=300, bpe_train_bytes=None, context_length=32, d_model=32,
                num_layers=2, num_heads=2, batch_size=8, max_steps=8, warmup_iters=2, eval_interval=1000,
                ckpt_interval=1000, log_interval=1000, num_samples=0, plot=False, out_dir=str(tmp_path / "run"),
                final_eval_tokens=2048, eval_tokens=1024, device="cpu")
    base.update(kw)
    for k, v in base.items():
        setattr(cfg, k, v)
    T.validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def _train_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traindata") / "x"
    cfg = _train_cfg(tmp)
    return T.prepare_data(cfg, log=lambda *a, **k: None)


def _train_quiet(*a, **k):
    pass


def test_train_checkpoint_round_trip(tmp_path, _train_data):
    cfg = _train_cfg(tmp_path)
    model = T.build_model(cfg, _train_data.tokenizer.vocab_size)
    opt = T.build_optimizer(model, cfg)
    x = _train_torch.randint(0, 300, (2, 16))
    model(x).sum().backward()
    opt.step()
    path = tmp_path / "c.pt"
    _train_torch.manual_seed(42)
    T.save_checkpoint(model, opt, 17, path, model_config=model.config.to_dict())
    expect_next = _train_torch.rand(3)
    buf = _train_io.BytesIO()
    T.save_checkpoint(model, opt, 17, buf)
    ckpt = _train_torch.load(path, weights_only=True)  # safe loading works: only tensors and primitives
    assert ckpt["iteration"] == 17 and ckpt["model_config"]["d_model"] == 32
    model2 = T.build_model(_train_cfg(tmp_path, seed=99), 300)
    opt2 = T.build_optimizer(model2, cfg)
    _train_torch.manual_seed(0)
    assert T.load_checkpoint(path, model2, opt2) == 17
    assert _train_torch.equal(_train_torch.rand(3), expect_next)  # RNG state restored
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert _train_torch.equal(a, b), k
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    m1 = sd1["optimizers"][1]["state"][0]["exp_avg"]
    assert _train_torch.equal(m1, sd2["optimizers"][1]["state"][0]["exp_avg"])
    buf.seek(0)
    assert T.load_checkpoint(buf, model2, None) == 17  # binary file objects work too
    assert not _TrainPath(str(path) + ".tmp").exists()
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        T.load_checkpoint(tmp_path / "junk.pt", model2, opt2)
    with pytest.raises(FileNotFoundError):
        T.load_checkpoint(tmp_path / "nope.pt", model2, opt2)
    small = T.build_model(_train_cfg(tmp_path, d_model=16), 300)
    with pytest.raises(ValueError, match="incompatible"):
        T.load_checkpoint(path, small, None)


def test_train_exact_resume_after_interruption(tmp_path, _train_data):
    N = 8
    full = T.train(_train_cfg(tmp_path / "a", max_steps=N), _train_data, log=_train_quiet)

    class Killed(Exception):
        pass

    def kill_at_5(step, model, metrics):
        if step == 5:
            raise Killed  # like kill -9 after step 5: the step-4 checkpoint is the last one on disk

    cfg_b = _train_cfg(tmp_path / "b", max_steps=N, ckpt_interval=2)
    with pytest.raises(Killed):
        T.train(cfg_b, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=kill_at_5))
    cfg_b.resume = True
    resumed = T.train(cfg_b, _train_data, log=_train_quiet)
    assert resumed["steps"] == N and len(resumed["losses"]) == N - 4
    assert resumed["losses"] == full["losses"][4:]  # bit-identical losses on CPU
    assert resumed["val"]["loss"] == full["val"]["loss"]
    rows = [_train_json.loads(l) for l in (_TrainPath(cfg_b.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, N + 1))  # log reads as one run


def test_train_end_to_end_loss_falls_and_samples(tmp_path, _train_data, capsys):
    cfg = _train_cfg(tmp_path, max_steps=40, num_samples=1, sample_tokens=20, plot=True, optimizer="adamw",
                     lr=1e-2, adamw_impl="torch", eval_interval=20)
    out = T.train(cfg, _train_data, log=_train_quiet)
    first, last = sum(out["losses"][:3]) / 3, sum(out["losses"][-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert out["val"]["bpb"] < 3.0 and out["val"]["bytes"] > 0 and out["entropy_floor_bpb"] > 0
    assert out["val"]["bpb"] > out["entropy_floor_bpb"]  # no model beats the corpus' entropy (big margin here)
    assert (_TrainPath(cfg.out_dir) / "loss_curve.png").stat().st_size > 1000
    assert len(out["samples"]) == 1
    T.main(["sample", "--checkpoint", str(_TrainPath(cfg.out_dir) / "ckpt.pt"), "--prompt", "Once upon",
            "--max-new-tokens", "10", "--device", "cpu"])
    assert "Once upon" in capsys.readouterr().out


def test_train_bad_inputs_fail_early_and_clearly(tmp_path, _train_data):
    with pytest.raises(ValueError, match="unknown preset"):
        T.config_from_args(T.get_parser().parse_args(["gpt5"]))
    with pytest.raises(ValueError, match="not 'synthetic'"):
        T.config_from_args(T.get_parser().parse_args(["--data", str(tmp_path / "missing.txt")]))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        T.train(_train_cfg(tmp_path, out_dir=str(blocker / "sub")), _train_data, log=_train_quiet)
    # a text file smaller than one context window
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world, this is short.\n" * 3)
    cfg = _train_cfg(tmp_path, data=str(tiny), vocab_size=260, context_length=64, data_dir=str(tmp_path / "dc"))
    with pytest.raises(ValueError, match="context window"):
        T.train(cfg, log=_train_quiet)
    # non-UTF-8 input
    binf = tmp_path / "bin.txt"
    binf.write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(ValueError, match="UTF-8"):
        T.prepare_data(_train_cfg(tmp_path, data=str(binf), data_dir=str(tmp_path / "dc2")), log=_train_quiet)
    # corrupt checkpoint on --resume: error before any training
    cfg = _train_cfg(tmp_path / "r", resume=True)
    _TrainPath(cfg.out_dir).mkdir(parents=True)
    (_TrainPath(cfg.out_dir) / "ckpt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        T.train(cfg, _train_data, log=_train_quiet)
    # incompatible checkpoint on --resume (different width)
    cfg = _train_cfg(tmp_path / "i", max_steps=2)
    T.train(cfg, _train_data, log=_train_quiet)
    cfg2 = _train_cfg(tmp_path / "i", max_steps=4, d_model=16, resume=True)
    with pytest.raises(ValueError, match="incompatible.*d_model"):
        T.train(cfg2, _train_data, log=_train_quiet)
    for bad in (dict(optimizer="sgd"), dict(schedule="linear"), dict(max_steps=0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            _train_cfg(tmp_path, **bad)


def test_train_nan_loss_stops_with_checkpoint_intact(tmp_path, _train_data):
    def poison(step, model, metrics):
        if step == 3:
            with _train_torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    cfg = _train_cfg(tmp_path, max_steps=10, ckpt_interval=2)
    with pytest.raises(FloatingPointError, match="diverged.*intact"):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=poison))
    ckpt = T.read_checkpoint(_TrainPath(cfg.out_dir) / "ckpt.pt")
    assert ckpt["iteration"] == 2  # the last good one; nothing half-written
    assert all(_train_torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_time_budget_stops_run_and_ends_schedule(tmp_path, _train_data):
    import time as _train_time
    cfg = _train_cfg(tmp_path, max_steps=None, max_minutes=0.12, warmup_iters=2, min_lr_ratio=0.1)
    t0 = _train_time.time()
    out = T.train(cfg, _train_data, log=_train_quiet, t_start=t0)
    assert out["stop_reason"] == "time budget" and out["steps"] > 10
    assert _train_time.time() - t0 < 0.12 * 60 + 5  # whole run inside the budget (+ slack for the final eval)
    rows = [_train_json.loads(l) for l in (_TrainPath(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] / cfg.muon_lr for r in rows if r["kind"] == "train"]
    assert max(lrs) > 0.9 and lrs[-1] < 0.25  # full peak reached, decayed to ~min by the budget's end


def test_train_evaluate_scores_every_target_once_for_any_stride():
    # A context-free "model" (fixed logits): its loss on each target does not depend on the window, so any
    # stride must give exactly the unigram NLL summed over all targets, each counted once.
    class _Unigram(_train_torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = _train_torch.randn(7, generator=_train_torch.Generator().manual_seed(0))

        def forward(self, x):
            return self.logits.expand(*x.shape, 7)

    g = _train_np.random.default_rng(0)
    toks = g.integers(0, 7, size=8 * 6 + 1)  # n - 1 - T divisible by 1, 2, 4, 8 below
    logp = _train_torch.log_softmax(_train_torch.randn(7, generator=_train_torch.Generator().manual_seed(0)), 0)
    expect = -float(logp[_train_torch.from_numpy(toks[1:])].sum().double()) / (len(toks) - 1)
    byte_len = _train_np.arange(1, 8)
    for stride in (8, 4, 2, 1):
        r = T.evaluate(_Unigram(), toks, context_length=8, batch_size=5, device="cpu", token_bytes=byte_len,
                       stride=stride)
        assert r["tokens"] == len(toks) - 1 and r["bytes"] == int(byte_len[toks[1:]].sum())
        assert abs(r["loss"] - expect) < 1e-6
        # split over 3 "ranks" and summed = the same
        parts = [T.evaluate(_Unigram(), toks, context_length=8, batch_size=5, device="cpu", token_bytes=byte_len,
                            stride=stride, rank=k, world_size=3) for k in range(3)]
        assert sum(p["tokens"] for p in parts) == len(toks) - 1
        # equal_batches (FSDP: every rank runs the same number of forwards) changes the count of forwards, not
        # the result: a rank out of windows runs a dummy batch and discards it.
        calls = []

        class _Counting(_Unigram):
            def forward(self, x):
                calls.append(x.shape[0])
                return super().forward(x)

        eq = []  # 7 ranks: with stride 8 there are only 6 windows, so rank 6 has none of its own
        for k in range(7):
            calls.clear()
            eq.append(T.evaluate(_Counting(), toks, context_length=8, batch_size=5, device="cpu",
                                 token_bytes=byte_len, stride=stride, rank=k, world_size=7, equal_batches=True))
            eq[-1]["forwards"] = len(calls)
        assert len({e["forwards"] for e in eq}) == 1
        assert sum(e["tokens"] for e in eq) == len(toks) - 1
        assert abs(sum(e["loss"] * e["tokens"] for e in eq) / (len(toks) - 1) - expect) < 1e-6
    with pytest.raises(ValueError, match="stride"):
        T.evaluate(_Unigram(), toks, context_length=8, batch_size=5, device="cpu", stride=9)


def test_train_data_name_selects_its_preset():
    # `python train.py --data owt` is the OWT run (32K vocab, the owt model), not the CPU demo pointed at OWT;
    # an explicit preset word or flag still wins.
    p = T.get_parser()
    owt = T.config_from_args(p.parse_args(["--data", "owt"]))
    assert (owt.preset, owt.data, owt.vocab_size) == ("owt", "owt", 32_000)
    ts = T.config_from_args(p.parse_args(["--data", "tinystories"]))
    assert (ts.preset, ts.vocab_size, ts.context_length) == ("tinystories", 10_000, 256)
    assert T.config_from_args(p.parse_args([])).preset == "demo"
    assert T.config_from_args(p.parse_args(["--data", "owt", "--vocab-size", "1000"])).vocab_size == 1000
    assert T.config_from_args(p.parse_args(["demo", "--data", "owt"])).preset == "demo"



# ====================================================================================================================
# Stage 4: kernels.py
# ====================================================================================================================
# ---------------------------------------------------------------------------------------------------------------
# Stage 4 tests: kernels.py (fused RMSNorm, FlashAttention-2 in PyTorch and Triton, model integration).
#
# Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1). The knob is read when a
# @triton.jit function is decorated, so it must be set before kernels.py is imported; kernels.py sets it itself
# at import when no CUDA device exists (that works even if torch or an earlier section already imported triton,
# see test_kern_interpreter_env_works_after_triton_import), and we set it here too before importing kernels.
#
# Tolerances (max |got - ref| <= tol * max(1, max |ref|), reference = float64 math on the same inputs):
#   fp32 : 2e-5   (observed ~1e-6: fp32 accumulation over <= 70 terms)
#   bf16 : 4e-2   (observed <= ~1.2e-2 of max|ref|: bf16 has 8 mantissa bits, O/dQ/dK/dV are rounded to bf16
#                  and P / dS are rounded to bf16 before the tile matmuls, exactly as on a GPU's tensor cores)
#   L (log-sum-exp) is always fp32: 2e-5 for every input dtype.
# bf16 under the interpreter: Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16 bits (a bug),
# so kernels.py upcasts dot operands to fp32 there (exact for bf16 values); all other bf16 rounding (loads,
# stores, P.to(bf16)) is emulated faithfully, so these bf16 checks are meaningful, not fp32 in disguise:
# test_kern_flash_triton_bf16_rounding_is_real checks the bf16 error is real but bounded.
# ---------------------------------------------------------------------------------------------------------------
import os as _kern_os
import subprocess as _kern_subprocess
import sys as _kern_sys

import pytest
import torch

if not torch.cuda.is_available():
    _kern_os.environ.setdefault("TRITON_INTERPRET", "1")

import model as M  # noqa: E402
import kernels as KN  # noqa: E402

_KERN_TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
_KERN_HAS_TRITON_RUNTIME = KN.HAVE_TRITON and (torch.cuda.is_available() or KN.INTERPRET)
_kern_needs_triton = pytest.mark.skipif(not _KERN_HAS_TRITON_RUNTIME,
                                        reason="triton not installed (or no CUDA and no interpreter)")
_KERN_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kern_assert_close(name, got, ref, tol):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"
    return err


def _kern_attention_case(fn, B, T, d, causal, dtype, seed=0, Tk=None):
    """Run fn(Q, K, V) -> (O, L) with autograd; compare O, L, dQ, dK, dV to float64 naive attention."""
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    q = torch.randn(B, T, d, generator=g).to(_KERN_DEV, dtype).requires_grad_()
    k = torch.randn(B, Tk, d, generator=g).to(_KERN_DEV, dtype).requires_grad_()
    v = torch.randn(B, Tk, d, generator=g).to(_KERN_DEV, dtype).requires_grad_()
    o, L = fn(q, k, v)
    do = torch.randn(B, T, d, generator=g).to(_KERN_DEV, dtype)
    o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, L_ref = KN.attention_reference(q64, k64, v64, causal)
    o_ref.backward(do.double())
    tol = _KERN_TOL[dtype]
    errs = {"O": _kern_assert_close("O", o, o_ref, tol),
            "L": _kern_assert_close("L", L, L_ref, 2e-5)}
    for name, a, b in (("dQ", q.grad, q64.grad), ("dK", k.grad, k64.grad), ("dV", v.grad, v64.grad)):
        errs[name] = _kern_assert_close(name, a, b, tol)
    assert o.dtype == dtype and q.grad.dtype == dtype and L.dtype == torch.float32
    return errs


def _kern_triton_fn(causal, tiles=None):
    def fn(q, k, v):
        o = KN.FlashAttention2Triton.apply(q, k, v, causal, tiles)
        return o, KN.saved_logsumexp(o)
    return fn


def _kern_torch_fn(causal, q_tile, k_tile):
    def fn(q, k, v):
        o = KN.FlashAttention2PyTorch.apply(q, k, v, causal, q_tile, k_tile)
        return o, KN.saved_logsumexp(o)
    return fn


# ----------------------------------------------------------------------------------------------- RMSNorm

def test_kern_rmsnorm_hand_worked():
    # x = [3, 4]: mean(x^2) = 12.5, rms = 3.5355339; y = x / rms * [1, 2] = [0.8485281, 2.2627417]
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    want = torch.tensor([[3 / 12.5 ** 0.5, 2 * 4 / 12.5 ** 0.5]])
    assert torch.allclose(KN.rmsnorm_torch(x, w, 0.0), want, atol=1e-6)
    assert torch.allclose(KN.RMSNormPyTorch.apply(x, w, 0.0), want, atol=1e-6)
    if _KERN_HAS_TRITON_RUNTIME:
        assert torch.allclose(KN.rmsnorm_triton(x.to(_KERN_DEV), w.to(_KERN_DEV), 0.0).cpu(), want, atol=1e-6)


def test_kern_rmsnorm_torch_matches_model_rmsnorm():
    torch.manual_seed(0)
    norm = M.RMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(24))
    x = torch.randn(2, 5, 24)
    assert torch.allclose(KN.rmsnorm_torch(x, norm.weight, norm.eps), norm(x), atol=1e-6)


def test_kern_rmsnorm_pytorch_backward_gradcheck():
    # The hand-derived backward (dx = r (g dy - x_hat mean(g dy x_hat)), dg = sum dy x_hat) vs finite differences.
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: KN.RMSNormPyTorch.apply(a, b, 1e-5), (x, w))


@_kern_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 96), (7, 1000), (1, 16)])
def test_kern_rmsnorm_triton_matches_float64(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape, generator=g)).to(_KERN_DEV, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(_KERN_DEV).requires_grad_()
    y = KN.rmsnorm_triton(x, w, 1e-5)
    dy = torch.randn(*shape, generator=g).to(_KERN_DEV, dtype)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = KN.rmsnorm_torch(x64, w64, 1e-5)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    tol = _KERN_TOL[dtype]
    _kern_assert_close("y", y, y_ref, tol)
    _kern_assert_close("dx", x.grad, x64.grad, tol)
    _kern_assert_close("dweight", w.grad, w64.grad, 2e-5)      # accumulated in fp32 for every input dtype
    # Same math as the eager version at the same dtype: at most one rounding step apart.
    y_eager = KN.rmsnorm_torch(x.detach(), w.detach(), 1e-5)
    ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert ((y.detach().double() - y_eager.double()).abs() <= ulp * y_eager.double().abs() + 1e-6).all()


@_kern_needs_triton
def test_kern_rmsnorm_triton_noncontiguous_input_and_bf16_gain():
    torch.manual_seed(2)
    base = torch.randn(6, 40, device=_KERN_DEV)
    x_nc = base.t()[:, :6]                                       # (40, 6) view with strides (1, 40)
    assert not x_nc.is_contiguous()
    w = torch.randn(6, device=_KERN_DEV)
    assert torch.allclose(KN.rmsnorm_triton(x_nc, w), KN.rmsnorm_torch(x_nc, w), atol=1e-6)
    # A bf16 gain (model cast to bf16) with fp32 activations: output fp32, gain gradient returned in bf16.
    w16 = w.to(torch.bfloat16).requires_grad_()
    x = x_nc.contiguous().requires_grad_()
    y = KN.rmsnorm_triton(x, w16)
    assert y.dtype == torch.float32 and torch.allclose(y, KN.rmsnorm_torch(x, w16), atol=1e-6)
    y.sum().backward()
    w_ref = w16.detach().float().requires_grad_()
    KN.rmsnorm_torch(x.detach(), w_ref).sum().backward()
    assert w16.grad.dtype == torch.bfloat16
    assert torch.allclose(w16.grad.float(), w_ref.grad, rtol=1e-2, atol=1e-2)


@_kern_needs_triton
def test_kern_rmsnorm_bad_inputs():
    x = torch.randn(4, 8, device=_KERN_DEV)
    with pytest.raises(ValueError, match="weight shape"):
        KN.rmsnorm_triton(x, torch.ones(7, device=_KERN_DEV))
    with pytest.raises(ValueError, match="dtype"):
        KN.rmsnorm_triton(x.long(), torch.ones(8, device=_KERN_DEV))
    with pytest.raises(ValueError, match="hidden size"):
        KN.rmsnorm_triton(torch.randn(1, KN.RMSNORM_MAX_HIDDEN + 1, device=_KERN_DEV),
                          torch.ones(KN.RMSNORM_MAX_HIDDEN + 1, device=_KERN_DEV))
    with pytest.raises(ValueError, match="same device"):
        KN.rmsnorm_triton(x, torch.ones(8, device="meta"))


# ----------------------------------------------------------------------------------------------- attention

def test_kern_flash_torch_gradcheck_float64():
    # FlashAttention2PyTorch's backward (P recomputed from L) vs finite differences, with ragged 3x2 tiles.
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        assert torch.autograd.gradcheck(lambda a, b, c: KN.FlashAttention2PyTorch.apply(a, b, c, causal, 3, 2),
                                        (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,causal,q_tile,k_tile", [
    (1, 37, 32, True, 16, 8), (2, 20, 16, False, 7, 5), (1, 70, 64, True, 64, 64), (1, 1, 16, True, 4, 4),
    (2, 33, 16, True, 8, 16)])
def test_kern_flash_torch_matches_float64(dtype, B, T, d, causal, q_tile, k_tile):
    _kern_attention_case(_kern_torch_fn(causal, q_tile, k_tile), B, T, d, causal, dtype)


@_kern_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,causal", [
    (1, 37, 32, True),      # ragged: 37 = 32 + 5 queries, 2 + 5 key tiles, diagonal tiles masked
    (2, 20, 16, False),     # non-causal, ragged
    (1, 70, 64, True),      # several full tiles below the diagonal (the unmasked loop) + ragged end
    (1, 1, 16, True),       # a single token
    (2, 32, 16, True),      # exact tile multiple
])
def test_kern_flash_triton_matches_float64(dtype, B, T, d, causal):
    _kern_attention_case(_kern_triton_fn(causal), B, T, d, causal, dtype)


@_kern_needs_triton
def test_kern_flash_triton_float16_and_float32_upstream_grad():
    # fp16 inputs; and an fp32 upstream gradient on bf16 activations (autocast-style) is cast, not mis-multiplied.
    _kern_attention_case(_kern_triton_fn(True), 1, 37, 32, True, torch.float16, seed=11)
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 21, 16, generator=g).to(_KERN_DEV, torch.bfloat16) for _ in range(3))
    o, L = KN.flash_attention_triton_forward(q, k, v, True)
    do32 = torch.randn(1, 21, 16, generator=g).to(_KERN_DEV)       # float32 while q, k, v, o are bf16
    dq, dk, dv = KN.flash_attention_triton_backward(q, k, v, o, L, do32, True)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    KN.attention_reference(q64, k64, v64, True)[0].backward(do32.double())
    for name, a, b in (("dQ", dq, q64.grad), ("dK", dk, k64.grad), ("dV", dv, v64.grad)):
        assert a.dtype == torch.bfloat16
        _kern_assert_close(name, a, b, _KERN_TOL[torch.bfloat16])


@_kern_needs_triton
@pytest.mark.parametrize("d", [80, 128])
def test_kern_flash_triton_head_dims(d):
    # 80: not a power of two (padded to 128 on chip, masked); 128: the largest supported.
    _kern_attention_case(_kern_triton_fn(True), 1, 21, d, True, torch.float32, seed=3)


@_kern_needs_triton
@pytest.mark.parametrize("tiles", [(16, 32), (64, 16)])
def test_kern_flash_triton_other_tile_shapes(tiles):
    # BLOCK_Q < BLOCK_K and BLOCK_Q > BLOCK_K exercise the causal start/stop arithmetic in all three kernels.
    _kern_attention_case(_kern_triton_fn(True, tiles), 1, 50, 16, True, torch.float32, seed=4)


@_kern_needs_triton
def test_kern_flash_triton_autotuned_launch_path(monkeypatch):
    # On a GPU, tiles come from triton.autotune (grid lambdas reading meta["BLOCK_Q"/"BLOCK_K"], tuning keys).
    # That host-side path is otherwise GPU-only; with ONE config the autotuner benchmarks nothing, so it runs
    # under the interpreter too. Different tiles per kernel, as the GPU configs have.
    if KN.INTERPRET:
        cfg = lambda bq, bk: [KN.triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=4, num_stages=3)]
        monkeypatch.setattr(KN, "_attn_fwd_tuned", KN.triton.autotune(cfg(32, 16), key=KN._TUNE_KEY)(
            KN._attn_fwd_kernel), raising=False)
        monkeypatch.setattr(KN, "_attn_bwd_dkdv_tuned", KN.triton.autotune(cfg(16, 32), key=KN._TUNE_KEY)(
            KN._attn_bwd_dkdv_kernel), raising=False)
        monkeypatch.setattr(KN, "_attn_bwd_dq_tuned", KN.triton.autotune(cfg(32, 16), key=KN._TUNE_KEY)(
            KN._attn_bwd_dq_kernel), raising=False)
        monkeypatch.setattr(KN, "INTERPRET_TILES", None)
    _kern_attention_case(_kern_triton_fn(True), 2, 45, 32, True, torch.float32, seed=13)


@_kern_needs_triton
def test_kern_flash_triton_rectangular_noncausal():
    _kern_attention_case(_kern_triton_fn(False), 2, 13, 32, False, torch.float32, seed=5, Tk=40)


@_kern_needs_triton
def test_kern_flash_triton_causal_ignores_future():
    # Invariant: changing keys/values at positions > i cannot change output i (the diagonal mask is right).
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 40, 16, device=_KERN_DEV) for _ in range(3))
    o1 = KN.FlashAttention2Triton.apply(q, k, v, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 25:] += 5.0
    v2[:, 25:] -= 3.0
    o2 = KN.FlashAttention2Triton.apply(q, k2, v2, True)
    assert torch.equal(o1[:, :25], o2[:, :25])
    assert not torch.allclose(o1[:, 25:], o2[:, 25:])
    # Query 0 sees only key 0: its output is exactly v[0].
    assert torch.allclose(o1[0, 0], v[0, 0], atol=1e-6)


@_kern_needs_triton
def test_kern_flash_triton_bf16_rounding_is_real():
    # The bf16 path must really round (else the bf16 tests above would be fp32 in disguise) but stay close.
    errs = _kern_attention_case(_kern_triton_fn(True), 1, 37, 32, True, torch.bfloat16, seed=7)
    assert errs["O"] > 1e-4


@_kern_needs_triton
def test_kern_flash_triton_noncontiguous_inputs():
    torch.manual_seed(8)
    q = torch.randn(20, 2, 16, device=_KERN_DEV).transpose(0, 1)   # (2, 20, 16), non-contiguous
    k, v = (torch.randn(2, 20, 16, device=_KERN_DEV) for _ in range(2))
    assert not q.is_contiguous()
    o = KN.FlashAttention2Triton.apply(q, k, v, True)
    o_ref = KN.FlashAttention2Triton.apply(q.contiguous(), k, v, True)
    assert torch.equal(o, o_ref)


def test_kern_flash_bad_inputs():
    q = torch.randn(1, 8, 16)
    fa_torch = KN.FlashAttention2PyTorch.apply
    with pytest.raises(ValueError, match="batch, seq, d"):
        fa_torch(q[0], q[0], q[0], False)
    with pytest.raises(ValueError, match="dtypes differ"):
        fa_torch(q, q.double(), q, False)
    with pytest.raises(ValueError, match="devices differ"):
        fa_torch(q, q.to("meta"), q, False)
    with pytest.raises(ValueError, match="K and V shapes differ"):
        fa_torch(q, q, q[:, :5], False)
    with pytest.raises(ValueError, match="n_queries == n_keys"):
        fa_torch(q, torch.randn(1, 9, 16), torch.randn(1, 9, 16), True)
    with pytest.raises(ValueError, match="share batch and head dim"):
        fa_torch(q, torch.randn(1, 8, 8), torch.randn(1, 8, 8), False)
    if _KERN_HAS_TRITON_RUNTIME:
        fa = KN.FlashAttention2Triton.apply
        for d in (8, 256):
            t = torch.randn(1, 8, d, device=_KERN_DEV)
            with pytest.raises(ValueError, match="head dim"):
                fa(t, t, t, True)
        t = torch.randn(1, 8, 16, device=_KERN_DEV)
        with pytest.raises(ValueError, match="dtype"):
            fa(t.double(), t.double(), t.double(), True)
        with pytest.raises(ValueError, match="powers of two"):
            fa(t, t, t, True, (24, 16))


# ----------------------------------------------------------------------------------------------- integration

def _kern_tiny_model(**switches):
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=61, context_length=32, d_model=64, num_layers=2, num_heads=2, **switches)
    return M.TransformerLM.from_config(cfg)


def _kern_logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["flash_torch", pytest.param("flash_triton", marks=_kern_needs_triton)])
def test_kern_model_backend_matches_sdpa(backend):
    model = _kern_tiny_model().to(_KERN_DEV)
    tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(0)).to(_KERN_DEV)
    M.set_attention_backend(model, "sdpa")
    ref_logits, ref_grads = _kern_logits_and_grads(model, tokens)
    M.set_attention_backend(model, backend)
    before = dict(KN._FALLBACK_COUNTS)
    logits, grads = _kern_logits_and_grads(model, tokens)
    assert KN._FALLBACK_COUNTS == before, "the kernel path must be taken, not the sdpa fallback"
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3), name


@_kern_needs_triton
def test_kern_use_kernels_swaps_both_and_keeps_state_dict():
    model = _kern_tiny_model().to(_KERN_DEV)
    tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1)).to(_KERN_DEV)
    keys_before = list(model.state_dict().keys())
    ref_logits, ref_grads = _kern_logits_and_grads(model, tokens)
    calls = {"n": 0}
    orig = KN.RMSNormTriton.apply

    def counting_apply(*a):
        calls["n"] += 1
        return orig(*a)

    KN.use_kernels(model)
    KN.RMSNormTriton.apply = counting_apply
    try:
        logits, grads = _kern_logits_and_grads(model, tokens)
    finally:
        KN.RMSNormTriton.apply = orig
    n_norms = sum(isinstance(m, M.RMSNorm) for m in model.modules())
    assert calls["n"] == n_norms > 0
    assert all(getattr(m, "attn_impl", "flash_triton") == "flash_triton" for m in model.modules()
               if isinstance(m, M.MultiHeadSelfAttention))
    assert list(model.state_dict().keys()) == keys_before
    assert model.config.attn_impl == "sdpa"   # checkpoints stay loadable without kernels.py
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3), name


def test_kern_backend_falls_back_for_window_and_decoding():
    # Sliding window and causal Tq != Tk (KV-cache decoding) are not covered by the kernels: documented fallback
    # to the sdpa backend, same results.
    torch.manual_seed(9)
    q_full = torch.randn(1, 2, 12, 16)
    k, v = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    sdpa = lambda q, causal, window: KN._sdpa_fallback(q, k, v, causal=causal, window=window)
    for fn in (KN.flash_torch_attention, KN.flash_triton_attention):
        before = sum(KN._FALLBACK_COUNTS.values())
        out_w = fn(q_full, k, v, causal=True, window=4)
        out_dec = fn(q_full[:, :, -3:], k, v, causal=True, window=None)
        assert sum(KN._FALLBACK_COUNTS.values()) == before + 2
        assert torch.allclose(out_w, sdpa(q_full, True, 4), atol=1e-6)
        assert torch.allclose(out_dec, sdpa(q_full[:, :, -3:], True, None), atol=1e-6)
    # A window at least as long as the keys is plain causal attention: the kernel path, no fallback.
    before = sum(KN._FALLBACK_COUNTS.values())
    out_long = KN.flash_torch_attention(q_full, k, v, causal=True, window=12)
    assert sum(KN._FALLBACK_COUNTS.values()) == before
    assert torch.allclose(out_long, sdpa(q_full, True, 12), atol=1e-5)
    # Independent check of the fallback's semantics: decoding the last 3 queries == last 3 rows of full causal.
    full = KN.attention_reference(q_full[0], k[0], v[0], True)[0]
    assert torch.allclose(sdpa(q_full[:, :, -3:], True, None)[0], full[:, -3:], atol=1e-5)


def test_kern_use_kernels_bad_arguments():
    model = _kern_tiny_model()
    with pytest.raises(ValueError, match="attention must be"):
        KN.use_kernels(model, rmsnorm=False, attention="flash_cuda")


# ----------------------------------------------------------------------------------------------- CLI, env

def test_kern_attention_flops_known_answer():
    # causal forward: 4 * B * N^2 * d / 2 = 4 * 1 * 16384^2 * 64 * 16 heads / 2
    assert KN.attention_flops(16, 16384, 64, True, "fwd") == 2 * 16 * 16384 ** 2 * 64
    assert KN.attention_flops(1, 10, 8, False, "fwd+bwd") == 3.5 * 4 * 100 * 8


@_kern_needs_triton
def test_kern_check_command_runs():
    assert KN.main(["check"]) == 0


def test_kern_interpreter_env_works_after_triton_import():
    # kernels.py must turn on the interpreter even when triton (and stage modules) were imported first.
    if torch.cuda.is_available() or not KN.HAVE_TRITON:
        pytest.skip("CPU-with-triton only")
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import torch, triton, triton.language, tokenizer, model, train\n"
            "import kernels as KN\n"
            "q = torch.randn(1, 20, 16)\n"
            "o = KN.FlashAttention2Triton.apply(q, q, q, True)\n"
            "ref = KN.attention_reference(q, q, q, True)[0]\n"
            "assert KN.INTERPRET and torch.allclose(o, ref, atol=1e-5)\n"
            "print('ok')\n")
    root = _kern_os.path.dirname(_kern_os.path.abspath(KN.__file__))
    env = {k: v for k, v in _kern_os.environ.items() if k != "TRITON_INTERPRET"}
    r = _kern_subprocess.run([_kern_sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
def test_kern_gpu_flash_matches_sdpa_bf16():
    torch.manual_seed(10)
    q, k, v = (torch.randn(4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = KN.FlashAttention2Triton.apply(q, k, v, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (o.float() - ref).abs().max().item() < 2e-2


def test_kern_gpu_kernels_compile_for_sm90_without_gpu(tmp_path):
    # The interpreter does not run Triton's GPU compiler; compiling for sm_90 (H100) here catches type / shape /
    # lowering errors in the real GPU path. Fresh cache dir so the compile really happens.
    import importlib.util
    if not KN.HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    ptxas = _kern_os.path.join(_kern_os.path.dirname(KN.triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not _kern_os.path.exists(ptxas):
        pytest.skip("triton wheel ships no ptxas")
    env = dict(_kern_os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = _kern_os.path.dirname(_kern_os.path.abspath(KN.__file__))
    r = _kern_subprocess.run([_kern_sys.executable, "kernels.py", "compile", "--arch", "90",
                              "--only", "attn fwd d=64 bf16", "--only", "attn bwd dK/dV d=64 bf16",
                              "--only", "attn bwd dQ d=64 bf16", "--only", "rmsnorm bwd hidden=4096 bf16"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL COMPILED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("  ok   ") == 4



# ====================================================================================================================
# Stage 5: ddp.py
# ====================================================================================================================
# ---------------------------------------------------------------------------------------------------------------
# ddp.py tests. All multi-process checks run inside ONE spawn of 2 gloo processes (importing torch costs seconds per
# process), each check recorded per rank in a JSON file; the test functions below read those results.
# Every data-parallel result is compared against an independent reference: one process training the same model on
# the whole batch.
# ---------------------------------------------------------------------------------------------------------------
import copy
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ddp as D


class _ddp_MLP(nn.Module):
    """Plain model."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class _ddp_TiedNet(nn.Module):
    """Embedding tied to the output head, a replicated norm, a frozen layer, and an optional branch (used to make
    one rank leave a parameter without gradient)."""

    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.branch = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.use_branch = True

    def forward(self, ids):
        h = self.emb(ids)                                   # (B, T, d)
        h = h + torch.tanh(self.fc(self.norm(h)))
        if self.use_branch:
            h = h + 0.5 * self.branch(h)
        h = self.frozen(h)
        return self.head(h)                                 # (B, T, vocab)


def _ddp_batch(kind, step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)
    ids = torch.randint(0, 13, (n, 5), generator=g)
    return ids, torch.randint(0, 13, (n, 5), generator=g)


def _ddp_loss(kind, out, y):
    return F.mse_loss(out, y) if kind == "mlp" else F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _ddp_build(kind, seed):
    torch.manual_seed(seed)
    return _ddp_MLP() if kind == "mlp" else _ddp_TiedNet()


def _ddp_all_equal_across_ranks(tensors):
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _ddp_check_wrapper(wrap, kind, rank, world, steps=4, unused_on_rank1=False, accumulate=False,
                       unused_everywhere=False):
    model = _ddp_build(kind, seed=rank)                     # different init per rank: construction must fix it
    wrapped = wrap(model)
    assert wrapped.module is model
    assert _ddp_all_equal_across_ranks(list(model.state_dict().values())), "params differ after construction"
    ref = copy.deepcopy(model)
    # weight decay: a parameter handed a zero gradient instead of None would still move (and differ from ref)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9,
                          weight_decay=0.01)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.2, momentum=0.9,
                              weight_decay=0.01)
    if unused_everywhere:
        model.use_branch = ref.use_branch = False
    frozen_before = model.frozen.weight.detach().clone() if kind == "tied" else None
    for step in range(steps):
        x, y = _ddp_batch(kind, step)
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        if unused_on_rank1:
            model.use_branch = rank == 0
        opt.zero_grad()
        if accumulate:  # two micro-batches per rank, the first without communication
            q = half // 2
            with wrapped.no_sync():
                (_ddp_loss(kind, wrapped(xs[:q]), ys[:q]) / 2).backward()
            (_ddp_loss(kind, wrapped(xs[q:]), ys[q:]) / 2).backward()
        else:
            _ddp_loss(kind, wrapped(xs), ys).backward()
        wrapped.finish_gradient_synchronization()
        if unused_everywhere:
            assert model.branch.weight.grad is None, "a parameter no rank used got a gradient"
        opt.step()
        # reference: one process, the whole batch (the mean of the per-rank means)
        ref_opt.zero_grad()
        losses = []
        for r in range(world):
            if unused_on_rank1:
                ref.use_branch = r == 0
            losses.append(_ddp_loss(kind, ref(x[r * half:(r + 1) * half]), y[r * half:(r + 1) * half]))
        (sum(losses) / world).backward()
        ref_opt.step()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), f"step {step}: {n} differs from single process " \
                                                               f"by {(p - q).abs().max().item():.3g}"
    assert _ddp_all_equal_across_ranks(list(model.parameters())), "params differ across ranks after training"
    if kind == "tied":
        assert model.head.weight is model.emb.weight
        assert torch.equal(model.frozen.weight, frozen_before) and model.frozen.weight.grad is None


def _ddp_check_sharded_optimizer(rank, world, optimizer_cls, **kw):
    model = _ddp_build("tied", seed=0)
    ref = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = D.ShardedOptimizer(params, optimizer_cls, **kw)
    ref_opt = optimizer_cls([p for p in ref.parameters() if p.requires_grad], **kw)
    for step in range(4):
        x, y = _ddp_batch("tied", step)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _ddp_loss("tied", m(x), y).backward()
            for g in o.param_groups:
                g["lr"] = 0.01 * (step + 1)                # a schedule writing the outer groups must reach shards
            o.step()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), f"step {step}: {n} differs from unsharded"
    # optimizer state per rank ~ 1/N of the unsharded optimizer's
    full_bytes = sum(t.numel() * t.element_size() for s in ref_opt.state.values() for t in s.values()
                     if torch.is_tensor(t))
    mine = opt.local_state_bytes()
    total = torch.tensor([mine]); dist.all_reduce(total)
    assert total.item() == full_bytes, (total.item(), full_bytes)
    assert mine <= 0.75 * full_bytes, f"rank {rank} holds {mine} of {full_bytes} bytes of optimizer state"
    # consolidated state dict == the unsharded optimizer's; loading it back (any world size) restores the shard
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"])
    for i in ref_sd["state"]:
        for k, v in ref_sd["state"][i].items():
            assert torch.allclose(torch.as_tensor(sd["state"][i][k]).float(), torch.as_tensor(v).float(),
                                  atol=1e-6), (i, k)
    opt2 = D.ShardedOptimizer([p for p in model.parameters() if p.requires_grad], optimizer_cls, **kw)
    opt2.load_state_dict(ref_sd)
    assert opt2.local_state_bytes() == mine


def _ddp_check_fsdp(rank, world, compute_dtype, atol):
    torch.manual_seed(0)
    ref = _ddp_TiedNet()
    ref.use_branch = False
    model = copy.deepcopy(ref)
    import gc
    import weakref
    full_weight = weakref.ref(model.fc.weight)
    fsdp = D.FSDP(model, compute_dtype=compute_dtype)
    gc.collect()
    assert full_weight() is None, "FSDP still holds a full weight after sharding it"
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    assert set(fsdp.gather_full_params()) == set(ref.state_dict())
    for step in range(4):
        x, y = _ddp_batch("tied", step)
        half = x.shape[0] // world
        opt.zero_grad()
        out = fsdp(x[rank * half:(rank + 1) * half])
        assert out.dtype == torch.float32
        _ddp_loss("tied", out, y[rank * half:(rank + 1) * half]).backward()
        fsdp.finish_gradient_synchronization()
        # grads: the shard's shape and dtype for sharded weights; replicated grads identical on every rank
        for sw in fsdp._sharded:
            if sw.name in ("frozen.weight", "branch.weight"):   # frozen; unused (use_branch=False)
                assert sw.shard.grad is None, sw.name
                continue
            g = sw.shard.grad
            assert g is not None and g.shape == sw.shard.shape and g.dtype == sw.shard.dtype, sw.name
            assert sw.shard.shape[0] == -(-sw.full_shape[0] // world)
        assert model.frozen.weight_shard.grad is None
        assert _ddp_all_equal_across_ranks([p.grad for p in fsdp._replicated]), "replicated grads differ"
        opt.step()
        ref_opt.zero_grad()
        _ddp_loss("tied", ref(x), y).backward()
        ref_opt.step()
        full = fsdp.gather_full_params()
        for n, q in ref.state_dict().items():
            assert full[n].dtype == torch.float32
            err = (full[n] - q).abs().max().item()
            assert err <= atol, f"{compute_dtype} step {step}: {n} differs from single process by {err:.3g}"
    assert torch.equal(full["emb.weight"], full["head.weight"])   # still tied
    # only a layer or two are ever gathered at once
    biggest = max(sw.rows * world * sw.full_shape[1] * 4 for sw in fsdp._sharded)
    assert 0 < fsdp.peak_gathered_bytes <= 3 * biggest and fsdp.gathered_bytes == 0
    # full state round trip into a fresh FSDP
    model2 = _ddp_build("tied", seed=5)
    fsdp2 = D.FSDP(model2, compute_dtype=compute_dtype)
    fsdp2.load_full_params(full)
    full2 = fsdp2.gather_full_params()
    assert all(torch.equal(full2[k], full[k]) for k in full)


def _ddp_check_collectives(rank, world):
    x = torch.arange(10, dtype=torch.float32) * (rank + 1) + rank
    a, b = x.clone(), x.clone()
    dist.all_reduce(a)
    D.ring_all_reduce(b)
    assert torch.equal(a, b), (a, b)
    expected = sum(torch.arange(10, dtype=torch.float32) * (r + 1) + r for r in range(world))
    assert torch.equal(a, expected)


def _ddp_check_mismatch(rank, world):
    D.check_same_across_ranks("config", {"d_model": 64, "layers": 2})
    try:
        D.check_same_across_ranks("config", {"d_model": 64 + rank, "layers": 2})
    except ValueError as e:
        assert "d_model" in str(e) and "layers" not in str(e) and "rank1=65" in str(e), str(e)
    else:
        raise AssertionError("no error for differing configs")


_DDP_CHECKS = {
    "collectives": lambda r, w: _ddp_check_collectives(r, w),
    "mismatch": lambda r, w: _ddp_check_mismatch(r, w),
}
_DDP_WRAPPERS = {"naive": D.NaiveDDP, "ddp": D.DDP,
                 "bucketed": lambda m: D.DDPBucketed(m, bucket_size_mb=0.0005),   # several buckets on tiny nets
                 "torchddp": D.TorchDDP}


def _ddp_register_wrapper_checks():
    for name, wrap in _DDP_WRAPPERS.items():
        for kind in ("mlp", "tied"):
            _DDP_CHECKS[f"{name}_{kind}"] = (lambda wrap, kind: lambda r, w: _ddp_check_wrapper(wrap, kind, r, w))(
                wrap, kind)
        if name != "torchddp":
            _DDP_CHECKS[f"{name}_unused_on_one_rank"] = (lambda wrap: lambda r, w: _ddp_check_wrapper(
                wrap, "tied", r, w, unused_on_rank1=True))(wrap)
            _DDP_CHECKS[f"{name}_accumulate"] = (lambda wrap: lambda r, w: _ddp_check_wrapper(
                wrap, "mlp", r, w, accumulate=True))(wrap)
            _DDP_CHECKS[f"{name}_unused_everywhere"] = (lambda wrap: lambda r, w: _ddp_check_wrapper(
                wrap, "tied", r, w, unused_everywhere=True))(wrap)


_ddp_register_wrapper_checks()
_DDP_CHECKS["sharded_torch_adamw"] = lambda r, w: _ddp_check_sharded_optimizer(
    r, w, torch.optim.AdamW, lr=0.01, weight_decay=0.1)
_DDP_CHECKS["fsdp_fp32"] = lambda r, w: _ddp_check_fsdp(r, w, None, atol=1e-5)
_DDP_CHECKS["fsdp_fp16"] = lambda r, w: _ddp_check_fsdp(r, w, torch.float16, atol=3e-2)
_DDP_CHECKS["fsdp_bf16"] = lambda r, w: _ddp_check_fsdp(r, w, torch.bfloat16, atol=1e-1)


def _ddp_checks_worker(out_dir):
    rank, world, _ = D.init_distributed(backend="gloo", timeout_s=60)
    results = {}
    try:
        import train as T
        _DDP_CHECKS["sharded_train_adamw"] = lambda r, w: _ddp_check_sharded_optimizer(
            r, w, T.AdamW, lr=0.01, weight_decay=0.1)
    except (ImportError, AttributeError) as e:  # train.py not there yet: recorded as a failure of that check
        results["sharded_train_adamw"] = f"cannot import train.AdamW: {e}"
    for name, check in _DDP_CHECKS.items():
        try:
            check(rank, world)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=4)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    D.cleanup_distributed()


@pytest.fixture(scope="module")
def _ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_checks")
    D.launch_local(_ddp_checks_worker, 2, str(out))
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def _ddp_assert(results, name):
    for r, res in enumerate(results):
        assert name in res, f"check {name} did not run on rank {r}"
        assert res[name] == "ok", f"rank {r}: {res[name]}"


@pytest.mark.parametrize("wrapper", ["naive", "ddp", "bucketed", "torchddp"])
@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_ddp_wrapper_matches_single_process(_ddp_results, wrapper, kind):
    _ddp_assert(_ddp_results, f"{wrapper}_{kind}")


@pytest.mark.parametrize("wrapper", ["naive", "ddp", "bucketed"])
def test_ddp_wrapper_param_unused_on_one_rank(_ddp_results, wrapper):
    _ddp_assert(_ddp_results, f"{wrapper}_unused_on_one_rank")


@pytest.mark.parametrize("wrapper", ["naive", "ddp", "bucketed"])
def test_ddp_wrapper_param_unused_on_every_rank_keeps_no_grad(_ddp_results, wrapper):
    _ddp_assert(_ddp_results, f"{wrapper}_unused_everywhere")


@pytest.mark.parametrize("wrapper", ["naive", "ddp", "bucketed"])
def test_ddp_wrapper_gradient_accumulation_no_sync(_ddp_results, wrapper):
    _ddp_assert(_ddp_results, f"{wrapper}_accumulate")


@pytest.mark.parametrize("opt", ["sharded_torch_adamw", "sharded_train_adamw"])
def test_ddp_sharded_optimizer_matches_unsharded(_ddp_results, opt):
    _ddp_assert(_ddp_results, opt)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_ddp_fsdp_matches_single_process(_ddp_results, precision):
    _ddp_assert(_ddp_results, f"fsdp_{precision}")


def test_ddp_ring_all_reduce_matches_library(_ddp_results):
    _ddp_assert(_ddp_results, "collectives")


def test_ddp_config_mismatch_names_fields(_ddp_results):
    _ddp_assert(_ddp_results, "mismatch")


def test_ddp_assign_shards_balanced():
    owner = D.assign_shards([100, 60, 50, 10, 1], 2)
    assert owner == [0, 1, 1, 0, 0]  # 100->r0, 60->r1, 50->r1 (60<100), 10->r0 (100<110), 1->r0 (tie 110=110: lowest rank)
    loads = [sum(s for s, o in zip([100, 60, 50, 10, 1], owner) if o == r) for r in range(2)]
    assert loads == [111, 110]


def _ddp_check_rank_without_data(rank, world):
    def load():
        if rank == 1:
            raise FileNotFoundError("data/train.bin does not exist")
        return 1
    try:
        D._all_ranks_ok("data preparation", load)
    except ValueError as e:
        assert "rank 1" in str(e) and "train.bin" in str(e), str(e)
    else:
        raise AssertionError("a rank without data did not fail")


def _ddp_check_transformer(rank, world, strategy):
    """ScratchLM's TransformerLM (tied embeddings) under a strategy == one process on the whole batch."""
    import model as M
    cfg = M.ModelConfig(vocab_size=64, context_length=8, d_model=32, num_layers=2, num_heads=4,
                        tie_embeddings=True)
    torch.manual_seed(0)
    ref = M.TransformerLM.from_config(cfg)
    model = copy.deepcopy(ref)
    run = D.wrap_model(model, strategy)
    params = [p for p in run.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        x = torch.randint(0, 64, (4, 8), generator=g)
        y = torch.randint(0, 64, (4, 8), generator=g)
        loss = F.cross_entropy(run(x[rank * 2:(rank + 1) * 2]).reshape(-1, 64), y[rank * 2:(rank + 1) * 2].reshape(-1))
        loss.backward()
        run.finish_gradient_synchronization()
        opt.step(); opt.zero_grad()
        F.cross_entropy(ref(x).reshape(-1, 64), y.reshape(-1)).backward()
        ref_opt.step(); ref_opt.zero_grad()
    full = D.full_model_state(model, run)
    for n, q in ref.state_dict().items():
        assert torch.allclose(full[n], q, atol=2e-5), f"{strategy}: {n} off by {(full[n] - q).abs().max():.3g}"


_DDP_CHECKS["rank_without_data"] = lambda r, w: _ddp_check_rank_without_data(r, w)
_DDP_CHECKS["transformer_bucketed"] = lambda r, w: _ddp_check_transformer(r, w, "bucketed")
_DDP_CHECKS["transformer_fsdp"] = lambda r, w: _ddp_check_transformer(r, w, "fsdp")


def test_ddp_rank_without_data_fails_on_every_rank(_ddp_results):
    _ddp_assert(_ddp_results, "rank_without_data")


@pytest.mark.parametrize("strategy", ["bucketed", "fsdp"])
def test_ddp_transformer_matches_single_process(_ddp_results, strategy):
    _ddp_assert(_ddp_results, f"transformer_{strategy}")


# ---- the training command: torchrun restart after a killed rank, resume at another world size -----------------

_DDP_TRAIN_ARGS = ["--synthetic-bytes", "150000", "--synthetic-val-bytes", "12000", "--vocab-size", "300",
                   "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--context-length", "16",
                   "--batch-size", "4", "--optimizer", "adamw", "--schedule", "constant", "--warmup-iters", "0",
                   "--eval-interval", "100", "--ckpt-interval", "2", "--log-interval", "1", "--num-samples", "0",
                   "--no-plot", "--eval-tokens", "2000", "--final-eval-tokens", "2000"]


def _ddp_in_process(argv):
    """Run the training command at world size 1 inside this process (no spawn: importing torch costs seconds)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        D._train_entry(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ddp_train_losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if l.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def _ddp_train_runs(tmp_path_factory):
    import shutil
    tmp = tmp_path_factory.mktemp("ddp_train")
    data_dir = str(tmp / "data")
    # B: world size 1 from scratch, 7 steps, global batch 8 (also builds the data caches the others reuse)
    _ddp_in_process(_DDP_TRAIN_ARGS + ["--data-dir", data_dir, "--out-dir", str(tmp / "B"), "--max-steps", "7",
                                       "--batch-size", "8", "--strategy", "ddp"])
    # A: torchrun, 2 ranks, FSDP; the last rank kills itself after step 5 once; torchrun restarts the job
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--max-restarts", "1", D.__file__] + _DDP_TRAIN_ARGS +
                          ["--data-dir", data_dir, "--out-dir", str(tmp / "A"), "--max-steps", "6", "--strategy",
                           "fsdp", "--die-at-step", "5", "--timeout", "60"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp))
    # C: world size 1 resumes A's final (world size 2, FSDP) checkpoint and takes step 7 with another strategy
    shutil.copytree(tmp / "A", tmp / "C")
    _ddp_in_process(_DDP_TRAIN_ARGS + ["--data-dir", data_dir, "--out-dir", str(tmp / "C"), "--max-steps", "7",
                                       "--resume", "--strategy", "zero1"])
    return dict(A=tmp / "A", B=tmp / "B", C=tmp / "C", proc=proc)


def test_ddp_killed_rank_restarts_and_resumes_without_losing_steps(_ddp_train_runs):
    proc = _ddp_train_runs["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "killing myself" in out and "resumed from" in out and "at step 4" in out, out[-3000:]
    a, b = _ddp_train_losses(_ddp_train_runs["A"]), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(a) == [1, 2, 3, 4, 5, 6]           # every step once: none lost, none repeated in the log
    for s in range(1, 7):                              # and each equal to the uninterrupted 1-process run
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    assert a[6] < a[1]


def test_ddp_checkpoint_world_size_2_resumes_at_world_size_1(_ddp_train_runs):
    c, b = _ddp_train_losses(_ddp_train_runs["C"]), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(c) == list(range(1, 8))
    assert abs(c[7] - b[7]) < 1e-4, (c[7], b[7])
    import train as T
    ckpt = T.read_checkpoint(os.path.join(_ddp_train_runs["C"], "ckpt.pt"))   # a plain train.py checkpoint
    assert ckpt["iteration"] == 7 and ckpt["ddp"]["world_size"] == 1
    assert "lm_head.weight" in ckpt["model"] and ckpt["model"]["lm_head.weight"].shape == (300, 32)


def test_ddp_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        D.build_train_parser().parse_args(["--strategy", "nope"])
    with pytest.raises(ValueError, match="(?i)muon"):
        class _Cfg:
            optimizer = "muon"
        D.build_strategy_optimizer(None, None, "fsdp", _Cfg())
    with pytest.raises(ValueError, match="bucket_size_mb"):
        D.DDPBucketed.__init__(object.__new__(D.DDPBucketed), nn.Linear(2, 2), bucket_size_mb=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        D.FSDP(nn.Linear(2, 2), compute_dtype=torch.int8)


def test_ddp_fsdp_defaults_to_adamw_unless_muon_is_asked_for():
    # Presets train with Muon (whole matrices); FSDP shards rows, so with no --optimizer it must pick AdamW, and an
    # explicit --optimizer muon must reach the clear error instead of being silently replaced.
    p = D.build_train_parser()
    assert D.config_for_strategy(p.parse_args(["--strategy", "fsdp"])).optimizer == "adamw"
    assert D.config_for_strategy(p.parse_args(["--strategy", "bucketed"])).optimizer == "muon"
    cfg = D.config_for_strategy(p.parse_args(["--strategy", "fsdp", "--optimizer", "muon"]))
    assert cfg.optimizer == "muon"
    with pytest.raises(ValueError, match="Muon"):
        D.build_strategy_optimizer(None, None, "fsdp", cfg)
