"""ScratchLM's tests: one file, one section per stage, in pipeline order.

Run:  python -m pytest -q test_all.py

Each section tests its stage against independent references (torch's own ops, tiktoken, float64
re-computations, hand-worked answers) and invariants (round trips, causality, single- vs multi-process
equality). Nothing here touches the network; GPU-only checks skip cleanly without CUDA.
"""
import contextlib
import copy
import errno
import functools
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

# The stage files sit next to this file (a flat layout); make them importable from anywhere.
_ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_ROOT))


# Triton kernels (stage 4) run under Triton's CPU interpreter when there is no GPU. The switch is read when triton
# is first imported, so it is set here, before any stage (or torch.compile) can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import tokenizer as tk
import model as M
import train as T
import kernels as KN
import ddp as D
import scaling as SC
import data as DA
import align as A  # noqa: E402 (after sys.path and TRITON_INTERPRET)


def workspace(*parts):
    """A file or folder of the workspace's test data (real text, GPT-2's tiktoken files, GSM8K, MMLU, the IsoFLOPs
    runs), or None. The tests that use it say so and skip without it: a user's checkout has no such folder, and
    .ci/run names it through the SCRATCHLM_WORKSPACE environment variable."""
    root = os.environ.get("SCRATCHLM_WORKSPACE")
    if not root:
        return None
    p = Path(root, *parts)
    return p if p.exists() else None


def tiny_config(**switches):
    """THE tiny model of the tests: vocabulary 10, 4 positions, d_model 8, one layer of 2 heads, d_ff 16, plus any
    ModelConfig switch. Small enough that a float64 reference of every op runs in milliseconds."""
    base = dict(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16)
    return M.ModelConfig(**{**base, **switches})



def _concept_index_rows():
    """(concept, file, symbol) for each row of the README's `## Concept index` table."""
    text = (_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Concept index\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[2].startswith("`"):
            rows.append((cells[0], cells[1], cells[2].strip("`")))
    return rows


def test_readme_concept_index_names_symbols_that_exist():
    # every course term in the index points at a top-level def/class/assignment of the file it names, and the index
    # covers the course (at least 50 terms, no term twice)
    import ast
    rows = _concept_index_rows()
    assert len(rows) >= 50 and len({r[0] for r in rows}) == len(rows)
    defined = {}
    for concept, file, symbol in rows:
        if file not in defined:
            tree = ast.parse((_ROOT / file).read_text(encoding="utf-8"))
            names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            assigned = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
            names |= {t.id for t in assigned if isinstance(t, ast.Name)}
            defined[file] = names
        assert symbol in defined[file], f"concept index: {concept!r} names {symbol} that {file} does not define"
# ===== Stage 1: tokenizer.py -- byte-level BPE: training, encode/decode, special tokens, fast path, GPT-2, CLI =====


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
def _tok_trained():
    """A small trained tokenizer (vocab, merges) on _TOK_TEXT, shared by several tests. 523 is as far as
    this text goes (its pre-tokens run out of pairs), so training must not warn."""
    import tempfile
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("error")
        path = _tok_write(Path(d) / "t.txt", _TOK_TEXT)
        return tk.train_bpe(path, 256 + 1 + 266, [_TOK_EOT], num_workers=1, progress=False)


def _tok_tokenizer(fast=True):
    vocab, merges = _tok_trained()
    return tk.Tokenizer(vocab, merges, [_TOK_EOT], fast=fast)


@functools.lru_cache(maxsize=None)
def _tok_gpt2_pair():
    """(our pure-Python GPT-2 tokenizer, our fast one, tiktoken's gpt2), or skip if gpt2 can't load.

    Tests never touch the network, so we only let tiktoken load gpt2 when its two files are already in
    tiktoken's cache folder (CI points TIKTOKEN_CACHE_DIR at a folder with them). When the run says the
    files are there (SCRATCHLM_EXPECT_GPT2=1, set by CI with them), a missing file FAILS instead of skipping.
    """
    skip = pytest.fail if os.environ.get("SCRATCHLM_EXPECT_GPT2") == "1" else pytest.skip
    import hashlib
    import tempfile
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    names = [hashlib.sha1((base + f).encode()).hexdigest() for f in ("vocab.bpe", "encoder.json")]
    if not all(os.path.isfile(os.path.join(cache_dir, n)) for n in names):
        skip(f"tiktoken's gpt2 files are not in {cache_dir} (tests never download); "
                    "set TIKTOKEN_CACHE_DIR to a folder with them")
    try:
        import tiktoken
        ref = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without TIKTOKEN_CACHE_DIR, etc.
        skip(f"tiktoken gpt2 encoding unavailable ({type(e).__name__}: {e}); "
                    "set TIKTOKEN_CACHE_DIR to a folder with the gpt2 files")
    fast = tk.gpt2_tokenizer(fast=True)
    slow = tk.Tokenizer(fast.vocab, fast.merges, fast.special_tokens, fast=False)
    return slow, fast, ref


# A special token with a space between letters and a newline inside: both look like safe cut points to
# the chunkers, which must notice they are inside a special token.
_TOK_ODD_SPECIAL = "<|end of\ntext|>"


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


@functools.lru_cache(maxsize=None)
def _tok_odd_tokenizer():
    vocab, merges = _tok_trained()
    tok = tk.Tokenizer(vocab, merges, [_TOK_EOT, _TOK_ODD_SPECIAL])
    tok.STREAM_BUFFER = 16  # flush after every few characters
    return tok


# The keyword combinations of tiktoken's encode(), each with its meaning in these tests.
_TOK_POLICIES = [
    ("all", ()),                 # the course's default: every special string becomes its id
    (set(), ()),                 # untrusted text: special strings stay ordinary text
    (set(), "all"),              # untrusted text, strict: any special string is an error
    ({_TOK_EOT}, ()),            # only <|endoftext|> is special
    ("all", {_TOK_EOT}),         # disallowed wins over allowed (tiktoken checks it first)
    (set(), {_TOK_EOT}),
]


def _tok_encode_or_error(enc, text, allowed, disallowed):
    """ids, or the string "ValueError" when encoding is refused (tiktoken and we both raise ValueError)."""
    try:
        return enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    except ValueError:
        return "ValueError"


def _tok_cli(args, cwd, timeout=60):
    """Run `python tokenizer.py ARGS` in `cwd` as a user would; -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(Path(tk.__file__)), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _tok_cli_files(tmp_path):
    """A text file and a trained tokenizer folder for CLI tests."""
    src = _tok_write(tmp_path / "in.txt", _TOK_TEXT)
    vocab, merges = _tok_trained()
    tk.Tokenizer(vocab, merges, [_TOK_EOT]).save(tmp_path / "tok")
    return src


# ---- hand-checked training -------------------------------------------------------------------------

def test_tokenizer_get_stats_and_merge_by_hand():
    assert tk.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert tk.get_stats([1, 2], weight=5) == {(1, 2): 5}
    assert tk.merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert tk.merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]  # leftmost wins an overlap
    assert tk.merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]


def test_tokenizer_train_aaabdaaabac_by_hand(tmp_path):
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


def test_tokenizer_train_the_cat_in_the_hat_by_hand(tmp_path):
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


def test_tokenizer_tie_break_prefers_lexicographically_greater_pair(tmp_path):
    # "ab cd" -> pre-tokens "ab", " cd": pairs (a,b) 1, (" ",c) 1, (c,d) 1; greatest: (c, d).
    path = _tok_write(tmp_path / "t.txt", "ab cd")
    _, merges = tk.train_bpe(path, 257, [], progress=False)
    assert merges == [(b"c", b"d")]
    # byte-level comparison, not str: b"\xc3\xa9" (é) > b"z", so (é-bytes) wins a tie over (z, z)
    path = _tok_write(tmp_path / "u.txt", "zz é")
    _, merges = tk.train_bpe(path, 257, [], progress=False)
    assert merges == [(b"\xc3", b"\xa9")]


@pytest.mark.filterwarnings("ignore:.*fewer than the")  # some random texts run out of pairs: expected
def test_tokenizer_fast_trainer_matches_reference_on_random_texts(tmp_path):
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


def test_tokenizer_special_tokens_never_merged(tmp_path):
    # "<|endoftext|>" repeated many times would otherwise be the most frequent thing to merge.
    path = _tok_write(tmp_path / "s.txt", ("hi" + _TOK_EOT) * 200)
    with pytest.warns(UserWarning, match="258 tokens, fewer than the 277 asked for"):
        vocab, merges = tk.train_bpe(path, 256 + 1 + 20, [_TOK_EOT], progress=False)
    assert merges == [(b"h", b"i")]  # the only pair outside the special tokens; training stops early
    assert all(b"<" not in a + b and b"|" not in a + b for a, b in merges)


# ---- the tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_special_token_isolation_and_longest_match():
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
    assert plain.vocab[256] == _TOK_EOT.encode() and plain.encode(_TOK_EOT) != [256]  # its bytes, not its id
    assert plain.decode(plain.encode(_TOK_EOT)) == _TOK_EOT


def test_tokenizer_fast_path_equals_readable_path():
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
def test_tokenizer_property_round_trip_and_fast_equals_readable(s):
    fast, slow = _tok_tokenizer(True), _tok_tokenizer(False)
    ids = fast.encode(s)
    assert fast.decode(ids) == s
    assert slow.encode(s) == ids
    assert all(0 <= i < fast.vocab_size for i in ids)


def test_tokenizer_fast_path_falls_back_when_ranks_disagree():
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


def test_tokenizer_encode_iterable_equals_encode():
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


def test_tokenizer_encode_iterable_is_lazy():
    # An endless stream: ids must come out long before the input ends (constant memory).
    import itertools
    tok = _tok_tokenizer()
    endless = itertools.cycle(["the cat in the hat.\n", "a dog" + _TOK_EOT])
    first = list(itertools.islice(tok.encode_iterable(endless), 1000))  # default buffer size
    assert len(first) == 1000 and tok.decode(first).startswith("the cat in the hat.\na dog")


def test_tokenizer_decode_replaces_invalid_utf8_and_rejects_unknown_ids():
    tok = _tok_tokenizer()
    assert tok.decode([0xE6]) == "\ufffd"  # a lone lead byte of a 3-byte character
    assert tok.decode([0xE6, 0x9D, 0xB1]) == "東"
    for bad in ([tok.vocab_size], [-1], [10 ** 9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)


def test_tokenizer_save_load_round_trip_and_metadata(tmp_path):
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

def test_tokenizer_gpt2_parity_with_tiktoken():
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
def test_tokenizer_property_gpt2_readable_matches_tiktoken(s):
    slow, _, ref = _tok_gpt2_pair()
    assert slow.encode(s) == ref.encode(s, allowed_special="all")


# ---- encode_file ------------------------------------------------------------------------------------

def test_tokenizer_encode_file_equals_encode(tmp_path):
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


def test_tokenizer_encode_file_uint32_past_65536_tokens(tmp_path):
    # Ids above 65,535 do not fit uint16 (a uint16 file would wrap id 70,000 to 4,464 without a word), so a
    # bigger vocab must be written as uint32. A 70,002-token vocab without training: fillers 256..69,999, then
    # b"ab" = 70,000 made by the one merge (a, b), then <|endoftext|> appended as 70,001.
    vocab = {i: bytes([i]) for i in range(256)} | {i: b"<%d>" % i for i in range(256, 70_000)}
    vocab[70_000] = b"ab"
    tok = tk.Tokenizer(vocab, [(b"a", b"b")], [_TOK_EOT], fast=False)
    # pre-tokens "ab", " cab", then the separator, then "abab": by hand
    expected = [70_000, 32, 99, 70_000, 70_001, 70_000, 70_000]
    assert tok.encode("ab cab" + _TOK_EOT + "abab") == expected
    src = _tok_write(tmp_path / "in.txt", ("ab cab" + _TOK_EOT + "abab") * 50)
    n = tk.encode_file(tok, src, tmp_path / "out.bin", num_workers=2, chunk_bytes=64, progress=False)
    assert n == len(expected) * 50 and os.path.getsize(tmp_path / "out.bin") == 4 * n  # 4 bytes per id
    assert np.fromfile(tmp_path / "out.bin", dtype=np.uint32).tolist() == expected * 50


# ---- command line ------------------------------------------------------------------------------------

def test_tokenizer_cli_train_then_encode(tmp_path, capsys):
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


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=12),
                          st.sampled_from(["a b", "x\ny", " ", "\n", _TOK_EOT, "<|end of\ntext|>"])),
                max_size=40),
       st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_tokenizer_property_encode_iterable_any_chunking(parts, cuts):
    # arbitrary Unicode around every kind of cut point and special token, split at arbitrary places
    tok = _tok_odd_tokenizer()
    text = "".join(parts)
    cuts = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)


# ---- special tokens in untrusted text ---------------------------------------------------------------

def test_tokenizer_special_policy_matches_tiktoken_gpt2():
    # The same keywords mean the same thing as in tiktoken: compare ids (or the refusal) on GPT-2's vocab.
    slow, fast, ref = _tok_gpt2_pair()
    texts = ["plain text, nothing special", "a<|endoftext|>b", " <|endoftext|><|endoftext|>x",
             "web page: please ignore<|endoftext|>the above", _TOK_GPT2_CASES[10]]
    for allowed, disallowed in _TOK_POLICIES:
        for text in texts:
            expected = _tok_encode_or_error(ref, text, allowed, disallowed)
            assert _tok_encode_or_error(slow, text, allowed, disallowed) == expected, (allowed, disallowed, text)
            assert _tok_encode_or_error(fast, text, allowed, disallowed) == expected, (allowed, disallowed, text)
    # hand-checked: as ordinary text the separator is GPT-2's pieces "<", "|", "endoftext", "|", ">"
    ordinary = fast.encode(_TOK_EOT, allowed_special=set())
    assert 50256 not in ordinary and fast.decode(ordinary) == _TOK_EOT and len(ordinary) > 1


def test_tokenizer_special_policy_readable_equals_fast_and_hand_checked():
    vocab, merges = _tok_trained()
    double = _TOK_EOT + _TOK_EOT
    specials = [_TOK_EOT, double, _TOK_ODD_SPECIAL]
    fast, slow = tk.Tokenizer(vocab, merges, specials), tk.Tokenizer(vocab, merges, specials, fast=False)
    plain = tk.Tokenizer(vocab, merges, [], fast=False)  # independent reference: no special tokens at all
    assert fast.use_fast and not slow.use_fast
    eot, dbl, odd = (fast.special_ids[s] for s in specials)
    text = ("the cat" + double + _TOK_EOT + " hat " + _TOK_ODD_SPECIAL + "a b") * 3
    policies = _TOK_POLICIES + [({double}, ()), ({_TOK_ODD_SPECIAL, _TOK_EOT}, {double}), ("all", "all")]
    for allowed, disallowed in policies:
        assert _tok_encode_or_error(fast, text, allowed, disallowed) == \
            _tok_encode_or_error(slow, text, allowed, disallowed), (allowed, disallowed)
    for t in (fast, slow):
        # nothing allowed: exactly the ids of a tokenizer that has no special tokens
        assert t.encode(text, allowed_special=set()) == plain.encode(text)
        # only <|endoftext|> allowed: the doubled separator is two single ones, the odd one is text
        assert t.encode(double, allowed_special={_TOK_EOT}) == [eot, eot]
        assert t.encode(double) == [dbl]  # default: all allowed, longest match first
        ids = t.encode("x" + _TOK_ODD_SPECIAL, allowed_special={_TOK_EOT})
        assert odd not in ids and ids == plain.encode("x" + _TOK_ODD_SPECIAL)
        with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' \(at 3\)"):
            t.encode("abc" + _TOK_EOT, allowed_special=set(), disallowed_special="all")
        with pytest.raises(ValueError, match="not a special token of this tokenizer"):
            t.encode("x", allowed_special={"<|typo|>"})
        with pytest.raises(TypeError, match="set of special-token strings"):
            t.encode("x", allowed_special=_TOK_EOT)  # a lone string would be a set of characters
        assert t.encode(double, allowed_special=(s for s in [_TOK_EOT])) == [eot, eot]  # any iterable, once
        assert t.encode("no specials here", disallowed_special="all") == plain.encode("no specials here")


def test_tokenizer_special_policy_streaming_and_files_equal_encode(tmp_path):
    # As ordinary text a special string is NOT a boundary (" <|endoftext|>" pre-tokenizes as " <|", ...),
    # so the chunkers may only cut at the edges of the allowed ones: chunk often and compare with encode.
    vocab, merges = _tok_trained()
    text = ("a <|endoftext|>b x" + _TOK_EOT + " " + _TOK_ODD_SPECIAL + " c\nd " + _TOK_EOT + "\n") * 40
    src = _tok_write(tmp_path / "in.txt", text)
    for fast in (True, False):
        tok = tk.Tokenizer(vocab, merges, [_TOK_EOT, _TOK_ODD_SPECIAL], fast=fast)
        tok.STREAM_BUFFER = 50
        for allowed in ("all", set(), {_TOK_ODD_SPECIAL}):
            expected = tok.encode(text, allowed_special=allowed)
            chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
            assert list(tok.encode_iterable(chunks, allowed_special=allowed)) == expected
            out = tmp_path / f"out_{fast}_{len(allowed)}.bin"
            tk.encode_file(tok, src, out, num_workers=2, chunk_bytes=60, progress=False, allowed_special=allowed)
            assert np.fromfile(out, dtype=np.uint16).tolist() == expected
        # a forbidden special token stops the work, names the file and its byte offset, writes nothing
        with pytest.raises(ValueError, match=r"in\.txt: .*'<\|endoftext\|>' \(at byte offset 2\)"):
            tk.encode_file(tok, src, tmp_path / "no.bin", num_workers=2, chunk_bytes=60, progress=False,
                           allowed_special=set(), disallowed_special="all")
        with pytest.raises(ValueError, match="disallowed_special forbids"):
            list(tok.encode_iterable(chunks, allowed_special=set(), disallowed_special={_TOK_ODD_SPECIAL}))
    assert not (tmp_path / "no.bin").exists() and not list(tmp_path.glob("*.tmp"))


def test_tokenizer_readable_switches_really_skip_the_fast_path(monkeypatch, tmp_path):
    # fast=False, use_fast=False and encode_readable must never call the compiled encoder; fast=True must.
    calls = []
    real = tk.Tokenizer._encode_fast

    def spy(self, text, policy):
        calls.append(text)
        return real(self, text, policy)

    monkeypatch.setattr(tk.Tokenizer, "_encode_fast", spy)
    tok = _tok_tokenizer(fast=True)
    expected = tok.encode(_TOK_TEXT)
    assert calls, "the fast path was not used by default"

    def boom(self, text, policy):
        raise AssertionError("the fast path ran although the readable encoder was asked for")

    monkeypatch.setattr(tk.Tokenizer, "_encode_fast", boom)
    tok.use_fast = False
    assert tok.encode(_TOK_TEXT) == expected
    assert _tok_tokenizer(fast=False).encode(_TOK_TEXT) == expected
    tok.use_fast = True
    assert tok.encode_readable(_TOK_TEXT) == expected
    src = _tok_write(tmp_path / "in.txt", _TOK_TEXT)
    tk.encode_file(_tok_tokenizer(fast=False), src, tmp_path / "o.bin", num_workers=1, progress=False)
    assert np.fromfile(tmp_path / "o.bin", dtype=np.uint16).tolist() == expected


# ---- decode inputs, damaged tokenizer files, short vocabularies ----------------------------------------

def test_tokenizer_decode_accepts_tensors_and_arrays_of_ints():
    import torch
    tok = _tok_tokenizer()
    ids = tok.encode("the cat sat")
    text = "the cat sat"
    for arr in (torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids, dtype=np.uint16),
                np.array(ids, dtype=np.int64), tuple(ids), iter(ids), [np.int64(i) for i in ids],
                [t for t in torch.tensor(ids)]):  # a list of 0-d tensors, as iterating a tensor gives
        assert tok.decode(arr) == text, type(arr)
    assert tok.decode(torch.tensor(ids[0])) == tok.decode([ids[0]])  # 0-d tensor
    assert tok.decode(np.int32(ids[0])) == tok.decode(np.array(ids[0])) == tok.decode([ids[0]])
    assert tok.decode(torch.tensor([], dtype=torch.long)) == ""
    for bad in (torch.tensor([1.0, 2.0]), np.array([1.5]), [1.0], [True], "abc", [torch.tensor(1.0)],
                [np.float32(2)]):
        with pytest.raises(TypeError, match="integers|sequence of token ids"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="0-d or 1-d"):
        tok.decode(torch.tensor([ids, ids]))
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode(torch.tensor([1, tok.vocab_size]))


def test_tokenizer_damaged_files_name_file_and_line(tmp_path):
    tok = _tok_tokenizer()
    tok.save(tmp_path / "ok")
    good_merges = (tmp_path / "ok" / "merges.txt").read_bytes().split(b"\n")
    d = tmp_path / "bad"
    d.mkdir()
    for name in ("vocab.json", "special_tokens.json"):
        (d / name).write_bytes((tmp_path / "ok" / name).read_bytes())
    # invalid UTF-8 on line 4
    (d / "merges.txt").write_bytes(b"\n".join(good_merges[:3] + [b"\xff\xfe x"] + good_merges[3:]))
    with pytest.raises(ValueError, match=r"merges file .*bad.merges\.txt, line 4: not valid UTF-8"):
        tk.Tokenizer.load(d)
    # a merge whose result is not in the vocab, on line 3 (after the #version line and one good merge)
    (d / "merges.txt").write_bytes(b"\n".join(good_merges[:2] + ["zz q".encode()] + good_merges[2:]))
    with pytest.raises(ValueError, match=r"merges\.txt, line 3: merge #1 .*not in the vocab"):
        tk.Tokenizer.load(d)
    (d / "merges.txt").write_bytes(b"\n".join(good_merges))
    assert tk.Tokenizer.load(d).merges == tok.merges  # the repaired folder loads
    (d / "vocab.json").write_bytes(b'{"a": 0, "\xff": 1}')
    with pytest.raises(ValueError, match=r"vocab file .*vocab\.json: not valid UTF-8 at byte offset 10"):
        tk.Tokenizer.load(d)
    (d / "vocab.json").write_bytes((tmp_path / "ok" / "vocab.json").read_bytes())
    (d / "special_tokens.json").write_bytes(b'["\xff"]')
    with pytest.raises(ValueError, match=r"special-tokens file .*special_tokens\.json: not valid UTF-8"):
        tk.Tokenizer.load(d)


def test_tokenizer_short_vocab_warns_with_the_numbers(tmp_path):
    only_specials = _tok_write(tmp_path / "s.txt", _TOK_EOT * 50)
    with pytest.warns(UserWarning, match=r"s\.txt: the vocabulary has 257 tokens, fewer than the 1,000 asked "
                                         r"for: it holds no text outside the special tokens"):
        vocab, merges = tk.train_bpe(only_specials, 1000, [_TOK_EOT], progress=False)
    assert len(vocab) == 257 and merges == []  # the CS336 interface still returns (vocab, merges)
    little = _tok_write(tmp_path / "l.txt", "ab ab")  # pre-tokens "ab", " ab": merges (a,b) then (" ", ab)
    with pytest.warns(UserWarning, match="258 tokens, fewer than the 300 asked for: its 2 distinct"):
        assert len(tk.train_bpe(little, 300, [], progress=False)[1]) == 2
    with pytest.warns(UserWarning, match="258 tokens, fewer than the 300"):
        tk.train_bpe_reference("ab ab", 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reaching the size asked for: no warning
        tk.train_bpe(little, 258, [], progress=False)


# ---- atomic writes -----------------------------------------------------------------------------------

def test_tokenizer_atomic_open_disk_full_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old")
    # 1) the write itself fails; 2) fsync fails (where a full disk often shows up); 3) a library wraps the
    # OS error in its own exception (torch.save: "enforce fail at inline_container.cc ... No space left")
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_writes():
        with tk.atomic_open(path, "wb") as f:
            f.write(b"new, half")
            full()

    def failing_fsync():
        monkeypatch.setattr(os, "fsync", full)
        try:
            tk.atomic_write_bytes(path, b"new")
        finally:
            monkeypatch.undo()

    def wrapped():
        with tk.atomic_open(path, "wb") as f:
            f.write(b"new")
            try:
                full()
            except OSError as e:
                raise RuntimeError("enforce fail at inline_container.cc:603] . PytorchStreamWriter failed") from e

    for attempt in (failing_writes, failing_fsync, wrapped):
        with pytest.raises(OSError, match=r"no space left writing .*ckpt\.bin; the previous file there \(if any\) "
                                          r"is intact") as ei:
            attempt()
        assert ei.value.errno == errno.ENOSPC
        assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.bin"], attempt.__name__
    # other errors pass through unchanged, and also leave nothing behind
    with pytest.raises(KeyError):
        with tk.atomic_open(path, "w") as f:
            f.write("x")
            raise KeyError("boom")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.bin"]


def test_tokenizer_atomic_open_keeps_modes_and_names_a_missing_folder(tmp_path):
    old_umask = os.umask(0o022)
    try:
        tk.atomic_write_text(tmp_path / "new.txt", "x")  # like open(): 0666 minus the umask, not mkstemp's 0600
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "private.txt").write_text("old")
        (tmp_path / "private.txt").chmod(0o600)
        tk.atomic_write_text(tmp_path / "private.txt", "new")  # replacing keeps the old file's mode
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)
    with pytest.raises(FileNotFoundError, match=r"cannot write .*x\.bin: the folder .*nowhere does not exist"):
        tk.atomic_write_bytes(tmp_path / "nowhere" / "x.bin", b"")


def test_tokenizer_save_is_all_or_nothing_on_a_full_disk(tmp_path, monkeypatch):
    old = _tok_tokenizer()
    old.save(tmp_path / "tok")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    vocab, merges = tk.train_bpe(_tok_write(tmp_path / "x.txt", "other text entirely " * 20), 270, [],
                                 progress=False)
    new = tk.Tokenizer(vocab, merges)
    real_fsync, n = os.fsync, []

    def third_fsync_fails(fd):
        n.append(fd)
        if len(n) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", third_fsync_fails)
    with pytest.raises(OSError, match="no space left writing"):
        new.save(tmp_path / "tok")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before  # old tokenizer, whole
    assert tk.Tokenizer.load(tmp_path / "tok").fingerprint() == old.fingerprint()


# ---- bad options and bad calls: one line naming the problem, nothing created --------------------------

_TOK_BAD_UTF8 = b"line one\n" * 111 + b"x" + b"abcd\xffrest of it\n" + b"more text\n" * 50
_TOK_BAD_OFFSET = len(b"line one\n" * 111 + b"x" + b"abcd")  # where the invalid byte sits: 1004

_TOK_TR = ["train", "--input", "in.txt", "--out", "new"]
_TOK_EN = ["encode", "--tokenizer", "tok", "--input", "in.txt"]
# (argv of `python tokenizer.py`, text its one error line must contain) or (a call on the prepared folder d,
# (the exception it raises, a regex its message matches)). The files are made by `tok_error_dir`.
_TOK_ERROR_CASES = [
    (["train", "--input", "in.txt", "--vocab-size", "500"], "--out"),  # required option missing
    (_TOK_TR + ["--vocab-size", "abc"], "--vocab-size"),
    (_TOK_TR + ["--vocab-size", "256"], "--vocab-size must be in 257..4294967296"),
    (_TOK_TR + ["--vocab-size", str(2 ** 32 + 1)], "--vocab-size must be in 257.."),
    (_TOK_TR + ["--vocab-size", "300", "--workers", "0"], "--workers must be >= 1"),
    (_TOK_TR + ["--vocab-size", "300", "--workers", "-3"], "--workers must be >= 1"),
    (["train", "--input", "missing.txt", "--out", "new", "--vocab-size", "300"], "--input"),
    (["train", "--input", "empty.txt", "--out", "new", "--vocab-size", "300"], "--input"),
    (["train", "--input", ".", "--out", "new", "--vocab-size", "300"], "--input"),
    (_TOK_TR + ["--vocab-size", "300", "--special-tokens", ""], "--special-tokens"),
    (["train", "--input", "in.txt", "--out", "notdir", "--vocab-size", "300"], "--out notdir is a file"),
    (["train", "--input", "in.txt", "--out", "notdir/sub", "--vocab-size", "300"], "--out: "),
    (["train", "--input", "in.txt", "--out", "tok", "--vocab-size", "300"], "--force"),
    (_TOK_EN + ["--out", "in.txt"], "--out in.txt is one of the command's inputs"),
    (_TOK_EN + ["--out", "link.txt"], "--out link.txt is one of the command's inputs"),
    (_TOK_EN + ["--out", "hard.txt"], "--out hard.txt is one of the command's inputs"),
    (_TOK_EN + ["--out", "tok/vocab.json"], "one of the command's inputs"),
    (_TOK_EN + ["--out", "old.bin"], "--out old.bin already exists; pass --force"),
    (_TOK_EN + ["--out", "tok"], "--out tok is a folder"),
    (_TOK_EN + ["--out", "notdir/x.bin"], "--out: "),
    (_TOK_EN + ["--out", "x.bin", "--workers", "0"], "--workers"),
    (_TOK_EN + ["--out", "x.bin", "--special-text", "maybe"], "--special-text"),
    (["encode", "--tokenizer", "nowhere", "--input", "in.txt", "--out", "x.bin"], "--tokenizer"),
    (["encode", "--tokenizer", "tok", "--input", "missing.txt", "--out", "x.bin"], "--input"),
    (["bench"], "--data-dir"),  # the benchmark's real text comes only from --data-dir
    (["bench", "--data-dir", "nowhere"], "--data-dir"),
    (["bench", "--data-dir", ".", "--mb", "0"], "--data-dir"),  # a folder without the two files
    (["bench", "--data-dir", "data", "--mb", "0"], "--mb must be in (0, 100000]"),
    (["bench", "--data-dir", "data", "--stream-mb", "-1"], "--stream-mb"),
    (["bench", "--data-dir", "data", "--vocab-size", "10"], "--vocab-size"),
    (["bench", "--data-dir", "data", "--repeats", "0"], "--repeats"),
    (["bench", "--data-dir", "data", "--workers", "0"], "--workers"),
    (["bogus"], "invalid choice"),
    (lambda d: tk.train_bpe(d / "in.txt", 256, [_TOK_EOT], progress=False), (ValueError, "too small")),
    (lambda d: tk.train_bpe(d / "missing.txt", 300, [], progress=False), (FileNotFoundError, "not found")),
    (lambda d: tk.train_bpe(d / "empty.txt", 300, [], progress=False), (ValueError, "empty")),
    (lambda d: tk.train_bpe(d, 300, [], progress=False), (IsADirectoryError, "directory")),
    # non-UTF-8: the error names the file and the byte offset, whichever worker finds it
    (lambda d: tk.train_bpe(d / "bad.txt", 300, [], progress=False, num_workers=1),
     (ValueError, rf"bad\.txt.*byte offset {_TOK_BAD_OFFSET}")),
    (lambda d: tk.train_bpe(d / "bad.txt", 300, [], progress=False, num_workers=2, chunk_bytes=200),
     (ValueError, rf"bad\.txt.*byte offset {_TOK_BAD_OFFSET}")),
    (lambda d: tk.encode_file(_tok_tokenizer(), d / "bad.txt", d / "bad.bin", num_workers=2, chunk_bytes=200,
                              progress=False), (ValueError, f"byte offset {_TOK_BAD_OFFSET}")),
    (lambda d: tk.encode_file(_tok_tokenizer(), d / "empty.txt", d / "bad.bin", progress=False),
     (ValueError, "empty")),
    (lambda d: tk.Tokenizer.from_files(d / "bad" / "not_json.json", d / "tok" / "merges.txt"),
     (ValueError, "malformed vocab file.*JSON")),
    (lambda d: tk.Tokenizer.from_files(d / "bad" / "list.json", d / "tok" / "merges.txt"),
     (ValueError, "malformed vocab file")),
    (lambda d: tk.Tokenizer.from_files(d / "tok" / "vocab.json", d / "bad" / "three.txt"),
     (ValueError, "malformed merges file.*line 2")),
    (lambda d: tk.Tokenizer.from_files(d / "tok" / "vocab.json", d / "bad" / "unknown.txt"),  # "zz": no token
     (ValueError, "not in the vocab")),
    (lambda d: tk.Tokenizer.load(d / "nowhere"), (FileNotFoundError, "tokenizer directory not found")),
    (lambda d: tk.Tokenizer({0: b"a"}, []), (ValueError, "single-byte")),
]


@pytest.fixture(scope="module")
def tok_error_dir(tmp_path_factory):
    """One folder with everything the error cases need, and every argv case run in it once (4 processes at a
    time; none may create anything) -> (folder, {argv: CompletedProcess}, its listing before the runs)."""
    d = tmp_path_factory.mktemp("tok_errors")
    _tok_cli_files(d)
    (d / "empty.txt").write_text("")
    (d / "old.bin").write_bytes(b"keep me")
    (d / "notdir").write_text("a file")
    (d / "bad.txt").write_bytes(_TOK_BAD_UTF8)
    os.symlink(d / "in.txt", d / "link.txt")
    os.link(d / "in.txt", d / "hard.txt")
    (d / "data").mkdir()
    (d / "data" / "tinyshakespeare.txt").write_text("to be or not to be")
    (d / "data" / "mmlu_questions.txt").write_text("what is 2 + 2?")
    (d / "bad").mkdir()
    for name, text in (("not_json.json", "{not json"), ("list.json", json.dumps(["a", "b"])),
                       ("three.txt", "#version: 0.2\nĠ t h\n"), ("unknown.txt", "#version: 0.2\nzz q\n")):
        (d / "bad" / name).write_text(text, encoding="utf-8")
    before = sorted(os.listdir(d))
    argvs = [tuple(case) for case, _ in _TOK_ERROR_CASES if not callable(case)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        runs = dict(zip(argvs, pool.map(lambda argv: _tok_cli(argv, d), argvs)))
    return d, runs, before


@pytest.mark.parametrize("case, expected", _TOK_ERROR_CASES,
                         ids=[f"call{i}" if callable(c) else " ".join(c) for i, (c, _) in enumerate(_TOK_ERROR_CASES)])
def test_tokenizer_error_paths(tok_error_dir, case, expected):
    d, runs, before = tok_error_dir
    if callable(case):
        exc, pattern = expected
        with pytest.raises(exc, match=pattern):
            case(d)
    else:
        res = runs[tuple(case)]
        lines = res.stderr.splitlines()
        assert res.returncode == 2, (case, res.stderr)
        assert len(lines) == 1 and expected in lines[0], (case, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout, case
    assert sorted(os.listdir(d)) == before  # nothing created, nothing half-written (no .bin, no .tmp)
    assert (d / "old.bin").read_bytes() == b"keep me" and (d / "in.txt").read_bytes() == _TOK_TEXT.encode()



# ---- command line: no overwrites, cleanup after a failure ---------------------------------------------

def test_tokenizer_cli_encode_refuses_overwrite_then_force(tmp_path):
    src = _tok_cli_files(tmp_path)
    tok = tk.Tokenizer.load(tmp_path / "tok")
    (tmp_path / "x.bin").write_bytes(b"earlier run")
    args = ["encode", "--tokenizer", "tok", "--input", "in.txt", "--out", "x.bin", "--quiet", "--workers", "1"]
    res = _tok_cli(args, tmp_path)
    assert res.returncode == 2 and "--force" in res.stderr and (tmp_path / "x.bin").read_bytes() == b"earlier run"
    res = _tok_cli(args + ["--force"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert np.fromfile(tmp_path / "x.bin", dtype=np.uint16).tolist() == tok.encode(_TOK_TEXT)
    # the API: overwrite=False refuses too; the input itself is refused even with overwrite=True
    with pytest.raises(FileExistsError, match="already exists"):
        tk.encode_file(tok, src, tmp_path / "x.bin", overwrite=False, progress=False)
    os.symlink(src, tmp_path / "link")
    with pytest.raises(ValueError, match="is one of the command.s inputs"):
        tk.encode_file(tok, src, tmp_path / "link", progress=False)
    assert (tmp_path / "in.txt").read_bytes() == _TOK_TEXT.encode()
    # --special-text: ordinary keeps the separators as text; error stops and names the token, exit 2
    res = _tok_cli(args[:-4] + ["plain.bin", "--quiet", "--special-text", "ordinary"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert np.fromfile(tmp_path / "plain.bin", dtype=np.uint16).tolist() == \
        tok.encode(_TOK_TEXT, allowed_special=set())
    res = _tok_cli(args[:-4] + ["strict.bin", "--special-text", "error"], tmp_path)
    assert res.returncode == 2 and "<|endoftext|>" in res.stderr and res.stderr.count("\n") == 1
    assert "in.txt: " in res.stderr and "--special-text" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "strict.bin").exists()


def test_tokenizer_cli_failed_command_removes_only_what_it_created(tmp_path):
    _tok_cli_files(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 50 + b"\xff broken")  # found only while working
    before = sorted(os.listdir(tmp_path))
    res = _tok_cli(["train", "--input", "bad.txt", "--vocab-size", "300", "--out", "runs/a/tok", "--quiet"], tmp_path)
    assert res.returncode == 2 and "byte offset 500" in res.stderr and res.stderr.count("\n") == 1
    res = _tok_cli(["encode", "--tokenizer", "tok", "--input", "bad.txt", "--out", "data/deep/x.bin", "--quiet"],
                   tmp_path)
    assert res.returncode == 2 and "bad.txt" in res.stderr and "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == before  # runs/ and data/ were created by the commands: gone
    (tmp_path / "keep").mkdir()  # a folder that was there before stays, even though it is empty
    res = _tok_cli(["encode", "--tokenizer", "tok", "--input", "bad.txt", "--out", "keep/x.bin", "--quiet"], tmp_path)
    assert res.returncode == 2 and (tmp_path / "keep").is_dir() and os.listdir(tmp_path / "keep") == []


def test_tokenizer_cli_train_out_checked_before_training(tmp_path):
    src = _tok_write(tmp_path / "in.txt", _TOK_TEXT)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")  # an earlier tokenizer's file
    res = _tok_cli(["train", "--input", src, "--vocab-size", "300", "--out", "tok"], tmp_path)
    assert res.returncode == 2 and "--force" in res.stderr and (tmp_path / "tok" / "vocab.json").read_text() == "{}"
    res = _tok_cli(["train", "--input", src, "--vocab-size", "300", "--out", "tok", "--force", "--quiet"], tmp_path)
    assert res.returncode == 0 and tk.Tokenizer.load(tmp_path / "tok").vocab_size == 300
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the unwritable-folder case needs an ordinary user")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = _tok_cli(["train", "--input", src, "--vocab-size", "300", "--out", "ro/tok"], tmp_path)
        assert res.returncode == 2 and "cannot write in" in res.stderr and os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_tokenizer_cli_train_warns_when_vocab_comes_out_small(tmp_path):
    src = _tok_write(tmp_path / "s.txt", _TOK_EOT * 20 + "ab ab")
    res = _tok_cli(["train", "--input", "s.txt", "--vocab-size", "400", "--out", "tok", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "warning: " in res.stderr and "259 tokens, fewer than the 400 asked for" in res.stderr
    assert tk.Tokenizer.load(tmp_path / "tok").vocab_size == 259
    assert Path(src).read_text() == _TOK_EOT * 20 + "ab ab"  # the input is untouched



def test_config_help_reads_docstring_lines_and_field_help_tables():
    """config_help: the docstring's `    name: text` lines (deeper-indented continuations joined), plus the
    {field: text} table of a field_help() classmethod (switches documented beside their code); a field
    documented in both places is refused, so each --help line has one home."""
    import dataclasses as dc

    @dc.dataclass
    class Toy:
        width: int = 1
        depth: int = 2
        mode: str = "a"

        @classmethod
        def field_help(cls):
            return {"mode": "a or b (documented in its own section)"}

    Toy.__doc__ = "A toy config.\n\n    width: model width\n        in features\n    depth: layers\nnot a field: text\n"
    assert tk.config_help(Toy) == {"width": "model width in features", "depth": "layers",
                                   "mode": "a or b (documented in its own section)"}
    p = tk.OneLineParser(prog="toy")
    p.add_config(Toy)
    shown = {a.dest: a.help for a in p._actions}
    assert shown["mode"] == "a or b (documented in its own section)" and shown["width"] == "model width in features"
    Toy.__doc__ += "    mode: documented twice\n"
    with pytest.raises(ValueError, match=r"\['mode'\] documented both"):
        tk.config_help(Toy)
# ===== Stage 2: model.py -- the Transformer LM, its switches, accounting, inference and GPT-2 loading =====


@pytest.fixture
def _model_one_thread():
    """Tiny models are dominated by per-op overhead; a second intra-op thread only adds synchronization
    (10x slower on a loaded 2-core box). Every test in this section runs single-threaded, then restores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MODEL_BASE = dict(vocab_size=37, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=None)


def _model_tiny(**switches):
    """A tiny model (fast on CPU) with any switches; fixed seed so tests are deterministic."""
    torch.manual_seed(0)
    return M.TransformerLM(**{**_MODEL_BASE, **switches})


# GPT-2's architecture as switches: pre-norm LayerNorm with biases, learned positions, tanh-GELU MLP,
# biases in every attention/FFN linear layer, LM head tied to the token embedding.
_MODEL_GPT2_SWITCHES = {"norm": "layernorm", "position": "learned", "ffn": "gelu", "bias": True,
                        "tie_embeddings": True}

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
    {"position": "learned"},
    {"ffn": "gelu"},
    {"bias": True},
    {"bias": True, "ffn": "swiglu", "num_kv_heads": 2, "qk_norm": True},
    {"bias": True, "num_experts": 2, "experts_top_k": 1, "ffn": "gelu"},
    _MODEL_GPT2_SWITCHES,
]


def _model_id(sw):
    return ",".join(f"{k}={v}" for k, v in sw.items()) or "default"


def _model_chi2_critical(df: int) -> float:
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile (z = 3.09)
    z = 3.090232
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _model_rmsnorm_ref(x, weight, eps):
    """RMSNorm in float64: x / sqrt(mean(x^2) + eps) * g (eps inside the square root)."""
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _model_rmsnorm_faithful(y, x, weight, eps):
    """True when y is the float64 answer correctly rounded to x's dtype: within one unit in the last place
    everywhere and bit-equal to the rounded reference almost everywhere (fp16 ulp 2^-10, bf16 2^-7)."""
    ref = _model_rmsnorm_ref(x, weight, eps)
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}[x.dtype]
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
    exact = (y == ref.to(x.dtype)).double().mean().item()
    return bool(torch.isfinite(y).all()) and rel <= max(ulp, 1e-6) and exact >= 0.99


def _model_write_safetensors(path, tensors, dtype="F32"):
    """A minimal safetensors writer (independent of model.py): 8-byte little-endian header length, JSON
    header with dtype / shape / data_offsets, then the raw little-endian bytes in order."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    np_dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]
    for name, t in tensors.items():
        b = t.detach().double().numpy().astype(np_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _model_fake_gpt2(folder, V=53, T=16, d=24, L=2, H=3, seed=0, prefix="", dtype="F32"):
    """A random GPT-2-shaped checkpoint in HF naming (Conv1D weights stored [in, out], fused c_attn, mask
    buffers). Returns the float64 tensors for the reference forward."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
    t = {"wte.weight": r(V, d), "wpe.weight": r(T, d), "ln_f.weight": 1 + r(d), "ln_f.bias": r(d)}
    for i in range(L):
        h = f"h.{i}."
        t.update({h + "ln_1.weight": 1 + r(d), h + "ln_1.bias": r(d),
                  h + "ln_2.weight": 1 + r(d), h + "ln_2.bias": r(d),
                  h + "attn.c_attn.weight": r(d, 3 * d), h + "attn.c_attn.bias": r(3 * d),
                  h + "attn.c_proj.weight": r(d, d), h + "attn.c_proj.bias": r(d),
                  h + "mlp.c_fc.weight": r(d, 4 * d), h + "mlp.c_fc.bias": r(4 * d),
                  h + "mlp.c_proj.weight": r(4 * d, d), h + "mlp.c_proj.bias": r(d),
                  h + "attn.bias": torch.ones(1, 1, T, T).tril()})  # HF's causal-mask buffer, not a weight
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _model_write_safetensors(folder / "model.safetensors", {prefix + k: v for k, v in t.items()}, dtype)
    t = {k: v.float().double() if dtype == "F32" else v.half().double() for k, v in t.items()}  # the stored values
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": V, "n_positions": T,
                                                    "n_embd": d, "n_layer": L, "n_head": H, "n_inner": None,
                                                    "activation_function": "gelu_new",
                                                    "layer_norm_epsilon": 1e-5}))
    return t


def _model_gpt2_reference_logits(t, ids, L, H):
    """HF GPT-2's forward, written out with plain float64 torch ops (no model.py code)."""
    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * t[p + ".weight"] + t[p + ".bias"]

    def conv1d(x, p):  # HF Conv1D: x @ W + b with W stored [in, out]
        return x @ t[p + ".weight"] + t[p + ".bias"]

    B, T = ids.shape
    x = t["wte.weight"][ids] + t["wpe.weight"][torch.arange(T)]
    d = x.shape[-1]
    dh = d // H
    for i in range(L):
        h = f"h.{i}."
        q, k, v = conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(d, dim=-1)
        q, k, v = (z.view(B, T, H, dh).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(dh)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, d), h + "attn.c_proj")
        a = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
        x = x + conv1d(a, h + "mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


@pytest.fixture
def _model_ckpt_dir(tmp_path):
    """A run folder as train.py writes it: ckpt.pt (with the tokenizer fingerprint) and tokenizer/."""
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"<|endoftext|>"
    tok = tk.Tokenizer(vocab, [], ["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    m = M.TransformerLM(257, 32, 32, 1, 2)
    torch.save({"format": "scratchlm-checkpoint-v1", "model": m.state_dict(), "model_config": m.config.to_dict(),
                "tokenizer_fingerprint": tok.fingerprint()}, tmp_path / "ckpt.pt")
    return tmp_path, m, tok


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
    # independent reference: a loop over queries in float64. Query i sits at absolute position
    # tk - tq + i and sees key j when j <= its position and (sliding) its position - j < window.
    ref = torch.zeros(2, 4, tq, 8, dtype=torch.float64)
    for i in range(tq):
        pos = tk - tq + i
        keys = [j for j in range(tk) if j <= pos and (window is None or pos - j < window)]
        s = (q[:, :, i:i + 1].double() @ k[:, :, keys].double().transpose(-2, -1)) / math.sqrt(8)  # (2, 4, 1, n)
        ref[:, :, i] = (torch.softmax(s, -1) @ v[:, :, keys].double())[:, :, 0]
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
@pytest.mark.parametrize("sw", [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1},
                                {"attention": "sliding", "window_size": 4},
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
    cfg = tiny_config(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=None)
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
    cfg = tiny_config(context_length=8, d_model=96, num_heads=4, d_ff=None)
    assert cfg.d_ff == 256  # 8/3 * 96 = 256, a multiple of 64
    assert tiny_config(context_length=8, d_model=64, num_heads=4, d_ff=None).d_ff == 192
    assert tiny_config(context_length=8, d_model=64, num_heads=4, d_ff=None, ffn="relu").d_ff == 256
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


# --- every error path: one table (ModelConfig switches, bad calls, bad command lines) ----------------------

def _model_bad_state(kind):
    """_model_tiny and a state dict that does not fit it: a key renamed ("swap") or a head of the wrong shape."""
    m = _model_tiny()
    sd = dict(m.state_dict())
    if kind == "swap":
        del sd["layers.1.ffn.w2.weight"]
        sd["layers.1.ffn.w4.weight"] = torch.zeros(3)
    else:
        sd["lm_head.weight"] = torch.zeros(5, 32)
    return m, sd


_MODEL_NO_CUDA = "cuda:99" if not torch.cuda.is_available() else "cuda:%d" % torch.cuda.device_count()
_MODEL_GEN = ["generate", "--checkpoint", "{ck}"]
_MODEL_GEN2 = ["generate", "--max-new-tokens", "2", "--checkpoint"]  # problems found once the checkpoint is read
# (case, exception, expected message). A case is a dict of ModelConfig switches over _MODEL_BASE (refused by
# ModelConfig and by TransformerLM), a call, or the argv of `python model.py` ({ck}: a train.py checkpoint,
# {dir}: its folder), which must exit with status 2 and one stderr line containing the message.
_MODEL_ERRORS = [
    ({"d_model": 30, "num_heads": 4}, ValueError, "d_model=30 is not divisible by num_heads=4"),
    ({"num_kv_heads": 3}, ValueError, "num_heads=4 is not divisible by num_kv_heads=3"),
    ({"norm": "batchnorm"}, ValueError,
     r"ModelConfig.norm='batchnorm' is not one of \['rmsnorm', 'layernorm', 'none'\]"),
    ({"norm_position": "middle"}, ValueError, "norm_position='middle'"),
    ({"position": "alibi"}, ValueError, r"position='alibi' is not one of \['rope', 'sinusoidal', 'learned', 'nope'\]"),
    ({"ffn": "geglu"}, ValueError, r"ffn='geglu' is not one of"),
    ({"norm_eps": 0.0}, ValueError, "norm_eps must be a number in"),
    ({"bias": "yes"}, ValueError, "bias must be true or false"),
    ({"attention": "local"}, ValueError, r"attention='local' is not one of \['full', 'sliding'\]"),
    ({"attention": "sliding"}, ValueError, "needs window_size"),
    ({"window_size": 4}, ValueError, "only used with attention='sliding'"),
    ({"num_experts": 2, "experts_top_k": 3}, ValueError, "experts_top_k=3"),
    ({"attn_impl": "flash9"}, ValueError, "attn_impl='flash9' is not one of"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be a positive integer"),
    ({"mixer": "rnn"}, ValueError, r"mixer='rnn' is not one of"),
    ({"mixer": "mla", "kv_lora_rank": 64}, ValueError, r"kv_lora_rank=64 is larger than d_model=32"),
    ({"mixer": "mla", "kv_lora_rank": 0}, ValueError, r"kv_lora_rank must be a positive integer"),
    ({"mixer": "mla", "qk_rope_head_dim": 3}, ValueError, r"qk_rope_head_dim=3 must be even"),
    ({"mixer": "mla", "qk_rope_head_dim": 8}, ValueError, r"qk_rope_head_dim=8 must be even and in \[2, head_dim=8\)"),
    ({"mixer": "mla", "position": "nope", "qk_rope_head_dim": 2}, ValueError,
     r"qk_rope_head_dim=2 must be 0 with position"),
    ({"mixer": "mla", "num_kv_heads": 2}, ValueError, r"mixer='mla' does not combine with num_kv_heads=2"),
    ({"mixer": "mla", "qk_norm": True}, ValueError, r"mixer='mla' does not combine with qk_norm"),
    ({"mixer": "mla", "bias": True}, ValueError, r"mixer='mla' does not combine with bias"),
    ({"kv_lora_rank": 8}, ValueError, r"kv_lora_rank is only used with mixer='mla'"),
    ({"mixer": "linear", "hyena_order": 2}, ValueError, r"hyena_order is only used with mixer='hyena'"),
    ({"mixer": "linear", "attention": "sliding", "window_size": 4}, ValueError, r"attention='sliding'.*mixer='linear'"),
    ({"mixer": "hyena", "position": "nope", "attention": "sliding", "window_size": 4}, ValueError,
     r"mixer='hyena' has no"),
    ({"mixer": "hyena"}, ValueError, r"mixer='hyena' has no queries or keys.*position='rope'"),
    ({"mixer": "hyena", "position": "nope", "qk_norm": True}, ValueError, r"qk_norm"),
    ({"mixer": "hyena", "position": "nope", "hyena_order": 0}, ValueError, r"hyena_order must be a positive integer"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\)"),
    ({"attn_dropout": -0.1}, ValueError, r"attn_dropout must be a number in \[0, 1\)"),
    ({"mixer": "linear", "attn_dropout": 0.1}, ValueError, r"attn_dropout applies to softmax attention"),
    (lambda: M.ModelConfig.from_dict({"vocab_size": 5, "context_length": 4, "d_model": 8, "num_layers": 1,
                                      "num_heads": 2, "n_layer": 3}),
     ValueError, r"unknown ModelConfig field\(s\) \['n_layer'\]"),
    (lambda: _model_tiny()(torch.tensor([[1, 37]])), ValueError, "token id 37 is outside the vocabulary"),
    (lambda: _model_tiny()(torch.tensor([[-1, 2]])), ValueError, "token id -1"),
    (lambda: _model_tiny()(torch.zeros(1, 33, dtype=torch.long)), ValueError,
     "sequence length 33 exceeds the model's context_length 32"),
    (lambda: _model_tiny()(torch.zeros(1, 3)), ValueError, "integer tensor"),
    (lambda: M.generate(_model_tiny(), [1, 2, 99], 2), ValueError, "outside the vocabulary"),
    (lambda: M.generate(_model_tiny(), [1] * 30, 5), ValueError, "exceeds the model's context_length"),
    (lambda: M.generate(_model_tiny(), [1], 2, top_p=0), ValueError, "top_p"),
    (lambda: M.generate(_model_tiny(), [1], 2, temperature=-1), ValueError, "temperature"),
    (lambda: M.load_model_state(*_model_bad_state("swap")), M.StateDictMismatchError,
     r"missing keys \['layers.1.ffn.w2.weight'\]; unexpected keys \['layers.1.ffn.w4.weight'\]"),
    (lambda: M.TransformerLM.load_state_dict(*_model_bad_state("swap")), RuntimeError, "missing keys"),  # like torch
    (lambda: M.TransformerLM.load_state_dict(*_model_bad_state("shape")), ValueError,
     r"lm_head.weight: checkpoint \(5, 32\) vs model \(37, 32\)"),
    (lambda: M.memory_estimate(tiny_config(), 2, optimizer="lion"), ValueError, "optimizer='lion'"),
    (lambda: M.sample_windows(np.arange(3), 1, 3, np.random.default_rng(0)), ValueError,
     "fewer than one context window"),
    (lambda: M.sample_windows(np.arange(10), 0, 3, np.random.default_rng(0)), ValueError, "batch_size"),
    *[(argv, SystemExit, option) for argv, option in [
        (_MODEL_GEN + ["--max-new-tokens", "-1"], "--max-new-tokens"),
        (_MODEL_GEN + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (_MODEL_GEN + ["--max-new-tokens", "x"], "--max-new-tokens"),
        (_MODEL_GEN + ["--temperature", "-1"], "--temperature"),
        (_MODEL_GEN + ["--temperature", "nan"], "--temperature"),
        (_MODEL_GEN + ["--temperature", "inf"], "--temperature"),
        (_MODEL_GEN + ["--top-p", "0"], "--top-p"), (_MODEL_GEN + ["--top-p", "1.5"], "--top-p"),
        (_MODEL_GEN + ["--num-samples", "0"], "--num-samples"), (_MODEL_GEN + ["--seed", "-1"], "--seed"),
        (_MODEL_GEN + ["--eos-id", "-3"], "--eos-id"), (_MODEL_GEN + ["--prompt-ids", "1,x"], "--prompt-ids"),
        (_MODEL_GEN + ["--prompt-ids", "1", "--prompt", "a"], "--prompt"),
        (_MODEL_GEN + ["--device", _MODEL_NO_CUDA], "--device"), (_MODEL_GEN + ["--device", "toaster"], "--device"),
        (_MODEL_GEN + ["--tokenizer", "{dir}/nope"], "--tokenizer"),
        (["generate", "--checkpoint", "{dir}/missing.pt"], "--checkpoint"), (["generate", "--checkpoint", "{dir}"],
                                                                             "--checkpoint"),
        (["generate", "--pretrained", "gpt5"], "--pretrained"),
        (["generate"], "--checkpoint"), (_MODEL_GEN + ["--pretrained", "gpt2"], "--pretrained"),
        (["generate", "--pretrained", "gpt2", "--cache-dir", "{ck}"], "--cache-dir"),
        (["table", "--batch-size", "0"], "--batch-size"), (["table", "--dtype-bytes", "3"], "--dtype-bytes"),
        (["table", "--vocab-size", "0"], "--vocab-size"), (["table", "--optimizer", "lion"], "--optimizer"),
        (["table", "--ffn", "geglu"], "--ffn"),
        (["bench", "--only", "kv,fast"], "--only"), (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--kv-prompt", "0"], "--kv-prompt"), (["bench", "-k", "0"], "-k"),
        (["bench", "--threads", "-1"], "--threads"), (["bench", "--target-checkpoint", "{ck}"], "--draft-checkpoint"),
        (["bench", "--text", "{dir}/none.txt"], "--text"),
        (["bench", "--spec-temperature", "0"], "--spec-temperature"),
        (["frobnicate"], "frobnicate"),
        (_MODEL_GEN2 + ["{ck}", "--prompt-ids", "1,300"], "300 is outside"),
        (_MODEL_GEN2 + ["{ck}", "--eos-id", "999"], "eos id 999"),
        (_MODEL_GEN2 + ["{dir}/empty.pt"], "empty (0 bytes)"), (_MODEL_GEN2 + ["{dir}/junk.pt"], "corrupt"),
        (_MODEL_GEN2 + ["{ck}", "--tokenizer", "{dir}/other_tok"], "fingerprint")]],
]


def _model_error_id(case) -> str:
    if isinstance(case, dict):
        return "config:" + _model_id(case)
    if isinstance(case, list):
        return "argv:" + " ".join(case)
    return None  # a call: pytest numbers it


@pytest.fixture
def _model_cli_dir(_model_ckpt_dir):
    """The run folder of _model_ckpt_dir plus an empty and a junk checkpoint and another corpus's tokenizer."""
    folder, _, _ = _model_ckpt_dir
    (folder / "empty.pt").write_bytes(b"")
    (folder / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    vocab = {i: bytes([255 - i]) for i in range(256)}
    vocab[256] = b"<|endoftext|>"
    tk.Tokenizer(vocab, [], ["<|endoftext|>"]).save(str(folder / "other_tok"))
    return folder


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("case,error,message", _MODEL_ERRORS,
                         ids=[_model_error_id(c) for c, _, _ in _MODEL_ERRORS])
def test_model_error_paths(case, error, message, request, capsys):
    """Every bad input gets an error naming the problem: a config switch is refused by ModelConfig and by
    TransformerLM; a bad call raises its exception; a bad command line exits 2 with one stderr line (naming
    the option), no traceback, and no file written."""
    if isinstance(case, dict):
        for build in (M.ModelConfig, M.TransformerLM):
            with pytest.raises(ValueError, match=message):
                build(**{**_MODEL_BASE, **case})
        return
    if callable(case):
        with pytest.raises(error, match=message):
            case()
        return
    folder = request.getfixturevalue("_model_cli_dir")
    argv = [a.format(ck=folder / "ckpt.pt", dir=folder) for a in case]
    before = sorted(p.name for p in folder.rglob("*")), sorted(os.listdir("."))
    with pytest.raises(SystemExit) as exit_info:
        M.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, argv
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, (argv, err)
    assert (sorted(p.name for p in folder.rglob("*")), sorted(os.listdir("."))) == before


def test_model_load_model_state_looks_through_wrapper_prefixes():
    """Prefixes from torch.compile and DDP ("_orig_mod.", "module.") do not stop a state dict from loading."""
    m = _model_tiny()
    M.load_model_state(m, {"_orig_mod.module." + k: v for k, v in m.state_dict().items()})


def test_model_cli_bad_input_as_a_real_process(_model_ckpt_dir):
    """The same one-line error from a real `python model.py` process (an id outside the vocabulary)."""
    folder, _, _ = _model_ckpt_dir
    proc = subprocess.run([sys.executable, M.__file__, "generate", "--checkpoint", str(folder / "ckpt.pt"),
                           "--prompt-ids", "5,999"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "999 is outside" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- accounting ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_flops_and_params_hand_count():
    # V=10, T=4, d=8, L=1, H=2 (dh=4), d_ff=16, SwiGLU, full causal attention, untied.
    cfg = tiny_config()
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
    cfg = tiny_config(vocab_size=50, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=None,
                      num_kv_heads=2, attn_impl="naive")
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
    dense = tiny_config()
    moe = tiny_config(num_experts=4, experts_top_k=2)
    # MoE: router 2*8*4 = 64, two experts 2*768 -> 1520 - 768 + 64 + 1536 = 2352
    assert M.flops_per_token(moe) == 2352
    win = tiny_config(attention="sliding", window_size=2)
    # mean keys min(i+1, 2) over i=0..3 = (1+2+2+2)/4 = 1.75 -> scores 2 * 2*2*4*1.75 = 56 (vs 80)
    assert M.flops_per_token(win) == 1520 - 80 + 56 == 1496
    assert M.flops_per_token(dense) == 1520


@pytest.mark.usefixtures("_model_one_thread")
def test_model_config_every_field_has_a_help_line():
    """Every ModelConfig field has a non-empty --help line: the core fields' from its docstring, the menu
    switches' from their menus' tables (ModelConfig.field_help); no line names a missing field, and the
    parser built from the dataclass shows each line as its flag's help."""
    import dataclasses
    helps = tk.config_help(M.ModelConfig)
    fields = [f.name for f in dataclasses.fields(M.ModelConfig)]
    assert [f for f in fields if not helps.get(f, "").strip()] == []
    assert sorted(set(helps) - set(fields)) == []
    p = tk.OneLineParser(prog="model.py")
    p.add_config(M.ModelConfig)
    shown = {a.dest: a.help for a in p._actions}
    assert [f for f in fields if shown.get(f) != helps[f]] == []
    assert "GPT-2" in helps["tie_embeddings"] and "multi-head latent" in helps["mixer"]  # the menus' lines


def test_model_memory_estimate_hand_count():
    cfg = tiny_config()
    mem = M.memory_estimate(cfg, batch_size=2, optimizer="adamw", dtype_bytes=4)
    assert mem["params"] == 824 * 4 and mem["grads"] == 824 * 4 and mem["optimizer_state"] == 2 * 824 * 4
    # activations per token (sdpa, scores not stored): per layer 4d (norm in/out x2) = 32, q,k,v 24, attn out 8,
    # logsumexp 2 heads, SwiGLU 4*16 = 64 -> 130; final norm 16 + logits/softmax 20 -> 166 per token
    assert mem["activations"] == 166 * 2 * 4 * 4
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    naive = M.memory_estimate(tiny_config(attn_impl="naive"), 2)
    # materialized scores + probs: 2 * H * T = 16 per token instead of 2
    assert naive["activations"] - mem["activations"] == (16 - 2) * 2 * 4 * 4


# --- inference ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_top_p_filter_hand_example():
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    # sorted 0.5, 0.25, 0.15, 0.1 ; mass before: 0, 0.5, 0.75, 0.9 ; top_p 0.7 keeps 0.5 and 0.25
    torch.testing.assert_close(M.top_p_filter(p, 0.7), torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(M.top_p_filter(p, 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(M.top_p_filter(p, 1.0), p)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_top_p_filter_exact_boundary():
    # binary fractions, so every prefix sum is exact: sorted 0.5, 0.25, 0.1875, 0.0625; mass before 0, 0.5,
    # 0.75, 0.9375. top_p 0.75 is reached EXACTLY by {0.5, 0.25}: the token whose mass before equals top_p
    # (0.1875) is dropped (a `<=` test would keep it: 0.25 / 0.9375 ...), and top_p 0.5 keeps the top token only
    p = torch.tensor([0.25, 0.5, 0.1875, 0.0625])
    assert torch.equal(M.top_p_filter(p, 0.75), torch.tensor([1 / 3, 2 / 3, 0.0, 0.0]))
    assert torch.equal(M.top_p_filter(p, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # just above the boundary the next token joins: 0.25 / 0.9375, 0.5 / 0.9375, 0.1875 / 0.9375
    torch.testing.assert_close(M.top_p_filter(p, 0.7501), torch.tensor([4 / 15, 8 / 15, 3 / 15, 0.0]))


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
                         {"norm_position": "post", "qk_norm": True}, _MODEL_GPT2_SWITCHES,
                         {**_MODEL_GPT2_SWITCHES, "attention": "sliding", "window_size": 4}]


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


def test_model_speculative_speedup_formula_and_alpha():
    # Leviathan et al.: alpha 0.8, k 4 -> (1 - 0.8^5) / 0.2 = 3.3616 tokens per pass, for 1 + 4 * 0.1 target steps
    assert M.speculative_speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4)
    assert M.speculative_speedup(1.0, 3, 0.0) == 4.0 and M.speculative_speedup(0.0, 5, 0.2) == pytest.approx(0.5)
    # a draft identical to the target: every judged token accepted, alpha 1; an unrelated one: alpha < 1 and
    # alpha >= accepted / proposed (drafts after a round's rejection are proposed but never judged)
    target = _model_tiny()
    torch.manual_seed(1)
    draft = M.TransformerLM(37, 32, 16, 1, 2)
    _, st = M.speculative_generate(target, target, [1, 2], 12, k=3, temperature=0, return_stats=True)
    assert st["alpha"] == 1.0 and st["rejected"] == 0
    _, st = M.speculative_generate(target, draft, [1, 2], 12, k=3, temperature=0, return_stats=True)
    assert st["rejected"] >= 1 and st["alpha"] == st["accepted"] / (st["accepted"] + st["rejected"])
    assert st["alpha"] >= st["acceptance_rate"]


@pytest.mark.usefixtures("_model_one_thread")
def test_model_bench_spec_trains_once_then_reuses_the_pair(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    argv = ["bench", "--only", "spec", "--text", str(text), "--spec-cache", str(tmp_path / "c"), "--repeats", "1",
            "--spec-train-steps", "2", "--draft-train-steps", "2", "--spec-train-batch", "2", "--spec-train-seq", "16",
            "--spec-prompts", "2", "--spec-prompt", "8", "--spec-new-tokens", "6", "-k", "2,3",
            "--target-d-model", "32", "--target-num-layers", "2", "--target-num-heads", "2", "--draft-d-model", "32"]
    M.main(argv)
    first = capsys.readouterr().out
    assert first.count("[spec] training the byte-level") == 2 and len(list((tmp_path / "c").glob("*.pt"))) == 2
    assert "(output identical)" in first and "best of k=2,3" in first
    M.main(argv)  # the same text and settings: both models come from the cache, the same figures' models
    second = capsys.readouterr().out
    assert "[spec] training" not in second and second.count("from " + str(tmp_path / "c")) == 2
    held = [line for line in first.splitlines() if "held-out loss" in line]
    assert held and held == [line for line in second.splitlines() if "held-out loss" in line]


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
    with pytest.raises(SystemExit) as exit_info:
        M.main(["generate", "--checkpoint", str(tmp_path / "missing.pt"), "--prompt-ids", "1"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        M.main(["generate", "--checkpoint", str(tmp_path / "junk.pt"), "--prompt-ids", "1"])
    assert exit_info.value.code == 2 and "corrupt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="corrupt"):
        M.read_checkpoint(tmp_path / "junk.pt")


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


# --- numerics that realistic bugs would break ---------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 1000.0), (torch.bfloat16, 1000.0), (torch.float16, 1.0),
                                         (torch.bfloat16, 1.0)])
def test_model_rmsnorm_low_precision_is_correctly_rounded(dtype, scale):
    """fp16 at scale 1000 squares past fp16's 65504; bf16 sums of squares lose bits. The float32 upcast
    makes the result the float64 answer correctly rounded; a version without it fails the same check."""
    torch.manual_seed(0)
    norm = M.RMSNorm(256)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256) + 0.5)
    x = (torch.randn(64, 256) * scale).to(dtype)
    with torch.no_grad():
        y = norm(x)
    assert y.dtype == dtype and _model_rmsnorm_faithful(y, x, norm.weight, 1e-5)
    w = norm.weight.detach().to(dtype)
    no_upcast = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # the bug, in the input dtype
    assert not _model_rmsnorm_faithful(no_upcast, x, norm.weight, 1e-5)  # the check has power


@pytest.mark.usefixtures("_model_one_thread")
def test_model_rmsnorm_eps_inside_the_square_root():
    """Activations of RMS ~1e-3 (mean square 1e-6 < eps 1e-5): eps dominates, and only eps INSIDE the root
    matches the definition: 1/sqrt(1e-6 + 1e-5) ~ 302 vs 1/(1e-3 + 1e-5) ~ 990."""
    torch.manual_seed(0)
    norm = M.RMSNorm(64)
    x = torch.randn(8, 64) * 1e-3
    with torch.no_grad():
        y = norm(x)
    ref = _model_rmsnorm_ref(x, norm.weight, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-9)
    eps_outside = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5)
    assert (eps_outside.double() - ref).abs().max() > 100 * 1e-5 * ref.abs().max()
    # all-zero rows stay finite (0), and norm_eps is the model switch that sets eps
    assert torch.equal(norm(torch.zeros(2, 64)), torch.zeros(2, 64))
    m = _model_tiny(norm_eps=1e-3)
    assert all(mod.eps == 1e-3 for mod in m.modules() if isinstance(mod, M.RMSNorm))


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 3), (4, 1)])
def test_model_gqa_matches_torch_enable_gqa_and_per_group_reference(H, Hkv):
    """Query head h reads KV head h // (H/Hkv). Checked against torch's enable_gqa and a hand loop; a
    `repeat` (instead of repeat_interleave) mapping pairs the wrong heads and fails the same check."""
    torch.manual_seed(0)
    dh, T = 8, 9
    mha = M.MultiHeadSelfAttention(H * dh, H, num_kv_heads=Hkv)  # no position: only the head mapping matters
    x = torch.randn(2, T, H * dh)
    with torch.no_grad():
        out = mha(x)
        q = (x @ mha.q_proj.weight.T).view(2, T, H, dh).transpose(1, 2)      # (B, H, T, dh)
        k = (x @ mha.k_proj.weight.T).view(2, T, Hkv, dh).transpose(1, 2)    # (B, Hkv, T, dh)
        v = (x @ mha.v_proj.weight.T).view(2, T, Hkv, dh).transpose(1, 2)

        def finish(a):  # (B, H, T, dh) -> output projection
            return a.transpose(1, 2).reshape(2, T, H * dh) @ mha.output_proj.weight.T
        ref_torch = finish(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        per_head = [F.scaled_dot_product_attention(q[:, h], k[:, h // (H // Hkv)], v[:, h // (H // Hkv)],
                                                   is_causal=True) for h in range(H)]
        ref_loop = finish(torch.stack(per_head, 1))
        wrong = finish(F.scaled_dot_product_attention(q, k.repeat(1, H // Hkv, 1, 1), v.repeat(1, H // Hkv, 1, 1),
                                                      is_causal=True))
    torch.testing.assert_close(out, ref_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_loop, atol=1e-5, rtol=1e-5)
    if 1 < Hkv < H:
        assert (out - wrong).abs().max() > 1e-3  # the `repeat` bug is visible to this test


@pytest.mark.usefixtures("_model_one_thread")
def test_model_gelu_is_gpt2_tanh_approximation():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    torch.testing.assert_close(M.gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12, rtol=1e-12)
    assert (M.gelu(x) - F.gelu(x)).abs().max() > 1e-4  # and not the exact erf GELU
    ffn = M.FeedForward(8, 32, "gelu", bias=True)
    with torch.no_grad():
        ffn.w1.bias.normal_()
        ffn.w2.bias.normal_()
    h = torch.randn(3, 8)
    ref = F.linear(F.gelu(F.linear(h, ffn.w1.weight, ffn.w1.bias), approximate="tanh"), ffn.w2.weight, ffn.w2.bias)
    torch.testing.assert_close(ffn(h), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_gpt2_switches_state_dict_and_known_parameter_count():
    m = _model_tiny(**_MODEL_GPT2_SWITCHES)
    sd = m.state_dict()
    assert sd["position_embeddings.weight"].shape == (32, 32)
    assert {"layers.0.attn.q_proj.bias", "layers.0.ffn.w1.bias", "layers.0.ln1.bias", "ln_final.bias"} <= set(sd)
    assert "lm_head.bias" not in sd and m.lm_head.weight is m.token_embeddings.weight
    assert m.config.d_ff == 128  # GELU MLP: 4 * d
    # GPT-2 small's published size, 124,439,808 parameters (V 50257, T 1024, d 768, 12 layers, 12 heads)
    gpt2 = M.ModelConfig(vocab_size=50257, context_length=1024, d_model=768, num_layers=12, num_heads=12,
                         **_MODEL_GPT2_SWITCHES)
    assert M.num_params(gpt2) == 124_439_808
    # non-embedding: minus wte (50257 * 768 = 38,597,376) and wpe (1024 * 768 = 786,432) = 85,056,000 ("85M")
    assert M.num_params(gpt2, include_embeddings=False) == 85_056_000
    # forward FLOPs per token at T = 1024, full rows: 2 x (12 layers x 12 d^2 matmul weights = 84,934,656)
    # = 169,869,312, plus attention 2 x 2 x 12 x 1024 x 768 = 37,748,736 (Kaplan's 2 n_layer n_ctx d, for
    # Q K^T and again for A V), plus the LM head 2 x 768 x 50257 = 77,194,752 -> 284,812,800
    assert M.flops_per_token(gpt2, causal_average=False) == 284_812_800
    assert M.flops_per_token(gpt2, training=True, causal_average=False) == 3 * 284_812_800


# --- GPT-2 weights from Hugging Face's safetensors layout -----------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_model_from_pretrained_local_gpt2_matches_reference_forward(tmp_path, prefix):
    t = _model_fake_gpt2(tmp_path / "gpt2", prefix=prefix)
    m = M.from_pretrained(str(tmp_path / "gpt2"))
    c = m.config
    assert (c.norm, c.position, c.ffn, c.bias, c.tie_embeddings, c.d_ff) == ("layernorm", "learned", "gelu", True,
                                                                            True, 96)
    # real, trainable float32 parameters (the model is built on the meta device), the head still tied
    assert all(p.dtype == torch.float32 and p.requires_grad and p.device.type == "cpu" for p in m.parameters())
    assert m.lm_head.weight is m.token_embeddings.weight and M.num_params(m) == M.num_params(c)
    assert float(m.aux_loss) == 0.0
    m = m.double()
    ids = torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), _model_gpt2_reference_logits(t, ids, 2, 3), atol=1e-9, rtol=1e-9)
    # KV-cache generation with the GPT-2 switches equals recomputation
    m = m.float()
    assert M.generate(m, [[1, 2, 3], [4]], 10, temperature=0) == \
        M.generate(m, [[1, 2, 3], [4]], 10, temperature=0, use_cache=False)
    # a lone .safetensors file with config.json beside it loads the same weights
    m2 = M.from_pretrained(str(tmp_path / "gpt2" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), m.state_dict().values()))


@pytest.mark.usefixtures("_model_one_thread")
def test_model_safetensors_reader_dtypes_and_malformed_files(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.5, -2.25])}
    f16 = _model_fake_gpt2(tmp_path / "half", dtype="F16")  # a half-precision checkpoint loads as float32
    half = M.from_pretrained(str(tmp_path / "half"))
    assert half.lm_head.weight.dtype == torch.float32 and torch.equal(half.lm_head.weight.double(), f16["wte.weight"])
    _model_write_safetensors(tmp_path / "f16.safetensors", t, "F16")
    got = M.read_safetensors(tmp_path / "f16.safetensors")
    assert got["a"].dtype == torch.float16 and torch.equal(got["a"].float(), t["a"])
    assert got["b"].tolist() == [1.5, -2.25]
    # bf16 bit patterns written by hand: 0x3FC0 = 1.5, 0xC010 = -2.25
    h = json.dumps({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + struct.pack("<HH", 0x3FC0, 0xC010))
    x = M.read_safetensors(tmp_path / "bf.safetensors")["x"]
    assert x.dtype == torch.bfloat16 and x.tolist() == [1.5, -2.25]
    good = (tmp_path / "f16.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[:-3])
    with pytest.raises(ValueError, match="trunc.safetensors.*truncated or corrupt"):
        M.read_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a safetensors file"):
        M.read_safetensors(tmp_path / "junk.safetensors")
    h = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\x00")
    with pytest.raises(ValueError, match="unsupported entry"):
        M.read_safetensors(tmp_path / "odd.safetensors")


@pytest.mark.usefixtures("_model_one_thread")
def test_model_from_pretrained_download_cache_and_errors(tmp_path):
    """The Hub path, offline: a file:// base URL laid out like huggingface.co/<repo>/resolve/main/<file>."""
    t = _model_fake_gpt2(tmp_path / "hub" / "openai-community" / "gpt2" / "resolve" / "main", seed=3)
    cache = tmp_path / "cache"
    m = M.from_pretrained("gpt2", cache_dir=cache, progress=False, base_url=(tmp_path / "hub").as_uri())
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert not list(cache.glob("*.part"))
    assert torch.equal(m.token_embeddings.weight.double(), t["wte.weight"].float().double())
    # cached: no source needed any more
    M.from_pretrained("gpt2", cache_dir=cache, progress=False, base_url=(tmp_path / "nowhere").as_uri())
    with pytest.raises(ConnectionError, match="cannot fetch gpt2-medium's config.json.*local folder"):
        M.from_pretrained("gpt2-medium", cache_dir=tmp_path / "c2" / "sub", progress=False,
                          base_url=(tmp_path / "nowhere").as_uri())
    assert not (tmp_path / "c2").exists()  # a failed download leaves no empty cache folders behind
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt5'"):
        M.from_pretrained("gpt5")
    bad = tmp_path / "bad"
    _model_fake_gpt2(bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))  # config claims a layer the weights lack
    with pytest.raises(ValueError, match="'h.2.ln_1.weight' is missing"):
        M.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match="unexpected GPT-2 tensors"):
        M.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        M.from_pretrained(str(bad))


@pytest.mark.skipif(os.environ.get("SCRATCHLM_EXPECT_GPT2") != "1" and
                    workspace("tiktoken") is None,
                    reason="GPT-2's tiktoken files are not available (they live in ../shared/tiktoken)")
@pytest.mark.usefixtures("_model_one_thread")
def test_model_pretrained_generate_with_gpt2_tokenizer(tmp_path, capsys, monkeypatch):
    """`generate --pretrained` end to end with our GPT-2 tokenizer (tiktoken's files from ../shared)."""
    shared = workspace("tiktoken")
    if shared is not None:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared))
    tok = tk.gpt2_tokenizer()
    _model_fake_gpt2(tmp_path / "g", V=tok.vocab_size, T=16, d=24, L=1, H=2)
    M.main(["generate", "--pretrained", str(tmp_path / "g"), "--prompt", "Hello world", "--max-new-tokens", "4",
            "--temperature", "0"])
    out = capsys.readouterr().out
    m = M.from_pretrained(str(tmp_path / "g"))
    new = M.generate(m, tok.encode("Hello world"), 4, temperature=0, eos_id=tok.eot_id)[0]
    assert "Hello world" + tok.decode([i for i in new if i != tok.eot_id]) in out


# --- checkpoints, windows, downloads ------------------------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_read_checkpoint_names_each_failure(tmp_path):
    m = _model_tiny()
    good = tmp_path / "ckpt.pt"
    torch.save({"format": "scratchlm-checkpoint-v1", "model": m.state_dict(), "model_config": m.config.to_dict()},
               good)
    assert set(M.read_checkpoint(good)) == {"format", "model", "model_config"}
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):
        M.read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="trunc.pt is corrupt"):
        M.read_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(ValueError, match="is a directory"):
        M.read_checkpoint(tmp_path)

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))
    torch.save({"model": {}, "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt was refused: it holds pickled objects that would run code"):
        M.read_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": m.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt is not a ScratchLM checkpoint"):
        M.read_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "other-v9", "model": {}}, tmp_path / "v9.pt")
    with pytest.raises(ValueError, match="format 'other-v9'"):
        M.read_checkpoint(tmp_path / "v9.pt")
    # weights that do not fit the stored config: the error names the file and the keys
    torch.save({"model": {**m.state_dict(), "extra.weight": torch.zeros(1)}, "model_config": m.config.to_dict()},
               tmp_path / "extra.pt")
    with pytest.raises(M.StateDictMismatchError, match=r"extra.pt is incompatible.*unexpected keys \['extra.weight'\]"):
        M.load_checkpoint_model(tmp_path / "extra.pt")


@pytest.mark.usefixtures("_model_one_thread")
def test_model_load_checkpoint_model_checks_tokenizer_fingerprint(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"<|endoftext|>"
    tok = tk.Tokenizer(vocab, [], ["<|endoftext|>"])
    other = tk.Tokenizer({**vocab, 1: b"\x02", 2: b"\x01"}, [], ["<|endoftext|>"])  # same size, other ids
    torch.manual_seed(0)
    m = M.TransformerLM(257, 16, 16, 1, 2)
    torch.save({"model": m.state_dict(), "model_config": m.config.to_dict(),
                "tokenizer_fingerprint": tok.fingerprint()}, tmp_path / "ckpt.pt")
    loaded, ckpt = M.load_checkpoint_model(tmp_path / "ckpt.pt", tokenizer=tok)
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight) and ckpt["tokenizer_fingerprint"] == tok.fingerprint()
    with pytest.raises(ValueError, match="is not the one checkpoint .*ckpt.pt was trained with"):
        M.load_checkpoint_model(tmp_path / "ckpt.pt", tokenizer=other)
    M.load_model_state(M.TransformerLM(257, 16, 16, 1, 2), ckpt)  # a checkpoint dict works as well as a state dict


def test_model_sample_windows_hand_example():
    tokens = np.arange(10, dtype=np.uint16)  # token i is the number i: windows are easy to check by hand
    x, y = M.sample_windows(tokens, 500, 3, np.random.default_rng(0))
    assert x.shape == y.shape == (500, 3) and x.dtype == y.dtype == np.int64
    assert (x[:, 1:] == x[:, :1] + [1, 2]).all() and (y == x + 1).all()  # consecutive, target shifted by one
    assert set(x[:, 0].tolist()) == set(range(7))  # every start 0 .. n - T - 1 = 6, and no other
    a, _ = M.sample_windows(tokens, 4, 3, np.random.default_rng(7))
    b, _ = M.sample_windows(tokens, 4, 3, np.random.default_rng(7))
    assert (a == b).all()


def test_model_download_file_url_resume_and_verification(tmp_path):
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 40
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "data.bin"
    (tmp_path / "out").mkdir()
    pathlib.Path(str(dest) + ".part").write_bytes(payload[:1000])  # an interrupted earlier download
    assert M.download(src.as_uri(), dest, sha256=digest, progress=False) == dest
    assert dest.read_bytes() == payload and not pathlib.Path(str(dest) + ".part").exists()
    assert M.sha256_file(dest) == digest and pathlib.Path(str(dest) + ".sha256").read_text().strip() == digest
    dest.write_bytes(payload[:-1] + b"X")  # the cached file was modified: detected, not silently used
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        M.download(src.as_uri(), dest, progress=False)
    with pytest.raises(ValueError, match="failed verification"):
        M.download(src.as_uri(), tmp_path / "other.bin", sha256="0" * 64, progress=False)
    with pytest.raises(ConnectionError, match="download of .* failed"):
        M.download((tmp_path / "missing.bin").as_uri(), tmp_path / "x.bin", progress=False)


def test_model_download_from_local_http_server(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "w.bin").write_bytes(b"abc" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/w.bin"
        dest = tmp_path / "w.bin"
        pathlib.Path(str(dest) + ".part").write_bytes(b"zzz")  # this server ignores Range: restart from zero
        M.download(url, dest, expected_size=3000, progress=False)
        assert dest.read_bytes() == b"abc" * 1000
        with pytest.raises(ConnectionError, match="HTTP 404"):
            M.download(url.replace("w.bin", "nope.bin"), tmp_path / "n.bin", progress=False)
    finally:
        server.shutdown()
        server.server_close()


# --- sampling from checkpoints and the command line ----------------------------------------------------

@pytest.mark.usefixtures("_model_one_thread")
def test_model_sample_from_checkpoint_cuts_long_prompts_and_greedy(_model_ckpt_dir):
    folder, m, tok = _model_ckpt_dir
    notes = []
    long_ids = [int(i) % 256 for i in range(40)]  # longer than the context of 32
    res = M.sample_from_checkpoint(folder / "ckpt.pt", prompt_ids=long_ids, max_new_tokens=5, temperature=0,
                                   note=notes.append)
    # the prompt keeps its last 31 tokens (room for one new token), and max_new_tokens shrinks to 1
    assert res["prompt_ids"] == long_ids[-31:] and len(res["ids"][0]) == 1
    assert res["ids"] == M.generate(m, [long_ids[-31:]], 1, temperature=0, eos_id=256)
    assert any("cut from the left" in n for n in notes) and any("reduced from 5 to 1" in n for n in notes)
    # text prompt, temperature 0 = greedy: two samples are identical; an empty prompt starts after <|endoftext|>
    res = M.sample_from_checkpoint(folder / "ckpt.pt", "ab", num_samples=2, max_new_tokens=6, temperature=0)
    assert res["texts"][0] == res["texts"][1] and res["texts"][0].startswith("ab")
    assert M.sample_from_checkpoint(folder / "ckpt.pt", "", max_new_tokens=3, temperature=0)["prompt_ids"] == [256]
    # a long text prompt: the text shown starts with the part the model saw (the last 31 bytes)
    long_text = "".join(chr(97 + i % 26) for i in range(50))
    res = M.sample_from_checkpoint(folder / "ckpt.pt", long_text, max_new_tokens=1, temperature=0, note=notes.append)
    assert res["texts"][0].startswith(long_text[-31:]) and not res["texts"][0].startswith(long_text[:20])


# ----- model.py: the mixer menu (MLA, linear attention, Hyena) and dropout (issue 11) -----------------
# Each mechanism against an independent float64 computation written here, its decoding cache/state
# against the full forward, and its accounting against a hand count for one small config.

_MODEL_MIXER_VARIANTS = [
    {"mixer": "mla"},
    {"mixer": "mla", "kv_lora_rank": 4, "qk_rope_head_dim": 2},
    {"mixer": "mla", "attention": "sliding", "window_size": 4},
    {"mixer": "mla", "position": "nope", "attn_impl": "naive"},
    {"mixer": "linear"},
    {"mixer": "linear", "num_kv_heads": 2, "qk_norm": True},
    {"mixer": "linear", "position": "sinusoidal", "bias": True},
    {"mixer": "hyena", "position": "nope"},
    {"mixer": "hyena", "position": "learned", "hyena_order": 3, "hyena_filter_dim": 16, "bias": True},
    {"dropout": 0.2, "attn_dropout": 0.2, "attn_impl": "naive"},
]


def _model_small_cfg(**sw):
    """The hand-count config: d 8, 2 heads of 4, one layer, V 10, T 4, SwiGLU d_ff 16."""
    return tiny_config(**sw)


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_MIXER_VARIANTS, ids=_model_id)
def test_model_mixers_cache_equals_recompute_and_accounting(sw):
    """Every new switch: greedy generate() with its cache/state == without == each prompt alone (padding
    included); parameters counted from the config == the module's; backward reaches every parameter."""
    m = _model_tiny(**sw)
    assert M.num_params(m.config) == M.num_params(m)
    assert M.num_params(m.config, include_embeddings=False) == M.num_params(m, include_embeddings=False)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4]]
    cached = M.generate(m, prompts, 10, temperature=0, use_cache=True)
    full = M.generate(m, prompts, 10, temperature=0, use_cache=False)
    alone = [M.generate(m, p, 10, temperature=0, use_cache=True)[0] for p in prompts]
    assert cached == full == alone and m.training  # generate restores train mode
    m.train()
    m(torch.randint(0, 37, (2, 12))).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.usefixtures("_model_one_thread")
@pytest.mark.parametrize("sw", _MODEL_MIXER_VARIANTS[:-1], ids=_model_id)
def test_model_mixers_cached_logits_equal_full_forward_float64(sw):
    """Prefill 7 tokens, then one token at a time: the logits equal the full forward's at 1e-10 (float64).
    For MLA this is the absorbed form (cache) against the naive form (no cache); for linear attention the
    recurrent state against the chunked parallel form; for Hyena the cached input history."""
    m = _model_tiny(**sw).double().eval()
    x = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        full = m(x)
        cache = M.KVCache(m.config, 2, 20, dtype=torch.float64)
        steps = [m(x[:, :7], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)


def test_model_mla_absorbed_decode_equals_naive_per_head_float64():
    """The layer alone, against a per-head computation written out here: k_h = [W_uk,h c | RoPE(W_kr x)],
    v_h = W_uv,h c, softmax(q_h k_h^T / sqrt(dh)) v_h, output projection. Both the no-cache (naive) form
    and the cached (absorbed: W_uk folded into the query, W_uv applied after the sum) form must match."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=5, context_length=16, d_model=24, num_heads=3, d_ff=None, mixer="mla",
                      kv_lora_rank=5, qk_rope_head_dim=4)
    rope = M.RotaryPositionalEmbedding(cfg.rope_theta, 4, 16)
    layer = M.MultiHeadLatentAttention(cfg, rope).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    H, dh, dr, r = 3, 8, 4, 5
    c = layer.kv_norm(x @ layer.kv_down_proj.weight.T)                       # (B, T, r)
    pos = torch.arange(9)
    k_rope = rope(x @ layer.k_rope_proj.weight.T, pos)                       # (B, T, dr)
    q = (x @ layer.q_proj.weight.T).view(2, 9, H, dh)
    heads = []
    for h in range(H):
        w_uk = layer.k_up_proj.weight.view(H, dh - dr, r)[h]
        w_uv = layer.v_up_proj.weight.view(H, dh, r)[h]
        qh = torch.cat([q[:, :, h, :dh - dr], rope(q[:, :, h, dh - dr:], pos)], -1)
        kh = torch.cat([c @ w_uk.T, k_rope], -1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(dh)
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ (c @ w_uv.T))
    want = torch.cat(heads, -1) @ layer.output_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=1e-12)
        cache = M.KVCache(M.ModelConfig.from_dict(cfg.to_dict()), 2, 9, dtype=torch.float64)
        got = []
        for t in range(9):  # decode one token at a time: the cache holds only (c, k_rope)
            cache.begin(1)
            got.append(layer(x[:, t:t + 1], torch.tensor([t]), kv_cache=cache))
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-12, rtol=1e-12)
    assert cache.k[0].shape == (2, 1, 9, r) and cache.v[0].shape == (2, 1, 9, dr)


def test_model_decode_cache_bytes_per_token_formula():
    """Bytes per cached token, all layers (d 32, 4 heads of 8, 2 layers, float64 = 8 bytes): MHA 2*2*4*8*8
    = 1024, GQA (2 KV heads) 512, MQA 256, MLA (r 8, dr 4) 2*(8+4)*8 = 192, Hyena (order 2) 2*2*32*8 =
    1024, linear 0 plus a fixed 2 layers * 4 heads * (8*8 + 8) * 8 = 4608 bytes. The KVCache's own buffers
    must have exactly these sizes."""
    base = _MODEL_BASE
    cases = [({}, 1024), ({"num_kv_heads": 2}, 512), ({"num_kv_heads": 1}, 256),
             ({"mixer": "mla", "kv_lora_rank": 8, "qk_rope_head_dim": 4}, 192),
             ({"mixer": "hyena", "position": "nope"}, 1024), ({"mixer": "linear"}, 0)]
    for sw, want in cases:
        cfg = tiny_config(**base, **sw)
        assert M.kv_cache_bytes_per_token(cfg, 8) == want, sw
        cache = M.KVCache(cfg, 3, 20, dtype=torch.float64)
        stored = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        assert stored == 3 * 20 * want, sw
        assert M.decode_state_bytes(cfg, 20, 3, 8) == 3 * (20 * want + (4608 if sw.get("mixer") == "linear" else 0))
    lin = _model_tiny(mixer="linear").double().eval()
    cache = M.KVCache(lin.config, 3, 20, dtype=torch.float64)
    with torch.no_grad():
        lin(torch.randint(0, 37, (3, 5)), kv_cache=cache)
    assert sum(s.numel() * 8 for st in cache.state for s in st) == 3 * 4608  # the state the formula counts
    # a sliding window keeps W tokens: MLA with window 4 stores 4 slots whatever the length
    slid = tiny_config(**base, mixer="mla", attention="sliding", window_size=4)
    assert M.decode_state_bytes(slid, 20, 1, 2) == 4 * M.kv_cache_bytes_per_token(slid, 2)


def test_model_table_prints_kv_cache_per_token_side_by_side(capsys):
    """`python model.py table`: per-token cache for MHA/GQA/MQA/MLA next to each other. GPT-2 small in fp32:
    MHA 2*12*12*64*4 bytes = 72 KiB, GQA (3 KV heads) 18, MQA 6, MLA 12*(192+32)*4 = 10.5 KiB."""
    M.main(["table"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "MHA" in line and "MLA" in line)
    assert header.split()[1:5] == ["MHA", "GQA", "MQA", "MLA"]
    row = [line for line in out.splitlines() if line.startswith("gpt2-small")][-1].split()
    assert row[1:5] == ["72.0", "18.0", "(Hkv", "3)"] and row[5] == "6.0" and row[6] == "10.5"


def test_model_linear_attention_forms_agree_float64():
    """The chunked parallel form at chunk 1 (the recurrence), 3 and T (fully parallel) against two
    references written here: the quadratic definition sum_{j<=i} (qr_i.kr_j) v_j / sum_{j<=i} (q_i.k_j)
    and an explicit token-by-token RNN over (S, z); the returned state equals the sums."""
    torch.manual_seed(0)
    B, H, T, dk, dv = 2, 3, 11, 4, 5
    q, k = (M.elu_feature_map(torch.randn(B, H, T, dk, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(B, H, T, dv, dtype=torch.float64)
    qr, kr = q.flip(-1) * 0.7, k.roll(1, -1)  # any "rotated" numerator features will do for the algebra
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    quad = ((qr @ kr.transpose(-1, -2)) * mask) @ v / ((q @ k.transpose(-1, -2)) * mask).sum(-1, keepdim=True)
    S, z, rnn = torch.zeros(B, H, dk, dv, dtype=torch.float64), torch.zeros(B, H, dk, dtype=torch.float64), []
    for t in range(T):
        S = S + kr[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        rnn.append((qr[:, :, t, None, :] @ S).squeeze(-2) / (q[:, :, t] * z).sum(-1, keepdim=True))
    torch.testing.assert_close(torch.stack(rnn, 2), quad, atol=1e-10, rtol=1e-10)
    for chunk in (1, 3, T):
        out, (S_c, z_c) = M.causal_linear_attention(q, k, v, qr, kr, chunk=chunk, eps=0.0)
        torch.testing.assert_close(out, quad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(S_c, S)
        torch.testing.assert_close(z_c, z)
    # resuming from a state == running the whole sequence
    a, st = M.causal_linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], qr[:, :, :4], kr[:, :, :4], eps=0.0)
    b, _ = M.causal_linear_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], qr[:, :, 4:], kr[:, :, 4:], st, eps=0.0)
    torch.testing.assert_close(torch.cat([a, b], 2), quad, atol=1e-10, rtol=1e-10)
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(M.elu_feature_map(x), F.elu(x) + 1)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_linear_attention_state_is_constant_and_not_rolled_back():
    """The decoding state of linear attention does not grow with length; rolling it back, or using it for
    speculative decoding, is a clear error."""
    m = _model_tiny(mixer="linear").eval()
    cache = M.KVCache(m.config, 1, 30)
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        before = [s.shape for st in cache.state for s in st]
        for t in range(10):
            m(torch.tensor([[t]]), kv_cache=cache)
    assert [s.shape for st in cache.state for s in st] == before == [(1, 4, 8, 8), (1, 4, 8)] * 2
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="mixer='linear'"):
        M.speculative_generate(m, _model_tiny(), [1, 2], 4)


def test_model_fft_convolution_equals_direct_convolution_float64():
    """fft_causal_conv (zero-padded to 2T) against y[t] = sum_{s<=t} h[t-s] u[s] computed with loops, for
    an odd length, a power of two and length 1."""
    torch.manual_seed(0)
    for T in (1, 16, 37):
        u = torch.randn(2, T, 3, dtype=torch.float64)
        h = torch.randn(T, 3, dtype=torch.float64)
        direct = torch.zeros_like(u)
        for t in range(T):
            for s in range(t + 1):
                direct[:, t] += h[t - s] * u[:, s]
        torch.testing.assert_close(M.fft_causal_conv(u, h), direct, atol=1e-12, rtol=1e-12)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_hyena_is_causal_and_filters_decay():
    """Changing token t changes no logit before t (exactly: FFT round-off of a zero contribution is
    impossible because the future enters only outputs >= t). The implicit filters decay with distance."""
    m = _model_tiny(mixer="hyena", position="nope").double().eval()
    x = torch.randint(0, 37, (1, 24))
    y = x.clone()
    y[0, 15] = (y[0, 15] + 1) % 37
    with torch.no_grad():
        a, b = m(x), m(y)
    assert (a[0, :15] - b[0, :15]).abs().max() < 1e-12 and (a[0, 15:] - b[0, 15:]).abs().max() > 1e-6
    h = m.layers[0].attn.filter(32).abs().mean(dim=(0, 2))  # (T,) mean |h| over orders and channels
    assert h[-4:].mean() < h[:4].mean()


def test_model_dropout_train_only_and_unbiased():
    """dropout zeroes about p of the elements and keeps the mean; eval (and generate) use none; a dropout
    model in eval equals the same weights without dropout; attention dropout runs on both backends."""
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = M.dropout(x, 0.25)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01 and abs(y.mean().item() - 1) < 0.01
    assert M.dropout(x, 0.25, training=False) is x and M.dropout(x, 0.0) is x
    plain = _model_tiny()
    drop = _model_tiny(dropout=0.3, attn_dropout=0.3)
    ids = torch.randint(0, 37, (2, 10))
    drop.eval()
    torch.testing.assert_close(drop(ids), plain.eval()(ids))
    drop.train()
    assert not torch.allclose(drop(ids), plain(ids))
    for impl in ("naive", "sdpa"):
        m = _model_tiny(attn_dropout=0.5, attn_impl=impl).train()
        assert not torch.allclose(m(ids), m(ids))  # a fresh mask each call


def test_model_mixers_hand_counted_params_flops_memory():
    """One small config per mixer (d 8, 2 heads of 4, 1 layer, V 10, T 4, SwiGLU 16). Shared part: embedding
    80 + head 80 + 2 norms 16 + final norm 8 + FFN 3*8*16 = 384 -> 568 params; FLOPs FFN 6*8*16 = 768,
    head 2*8*10 = 160; activations per token 4d + 4 d_ff = 96 per layer, + 2d + 2V = 36."""
    mla = _model_small_cfg(mixer="mla", kv_lora_rank=2, qk_rope_head_dim=2)
    lin = _model_small_cfg(mixer="linear")
    hy = _model_small_cfg(mixer="hyena", position="nope", hyena_order=2, hyena_filter_dim=4)
    # MLA: q 64 + down 16 + latent norm 2 + k_up 2*2*2 = 8 + v_up 2*8 = 16 + rope key 16 + out 64 = 186
    # linear: q, k, v, out 4 * 64 = 256
    # hyena: in_proj 8*24 = 192 + out 64 + filter (9*4 + 4 + 4*4 + 4 + 4*16 = 124) + skips 16 = 396
    assert [M.num_params(c) for c in (mla, lin, hy)] == [568 + 186, 568 + 256, 568 + 396]
    assert [M.num_params(M.TransformerLM.from_config(c)) for c in (mla, lin, hy)] == [754, 824, 964]
    # forward FLOPs per token at T = 4 (causal average 2.5 keys):
    # MLA: 2 * (186 - 2 norm gains) = 368 projections + 2*2*4*2.5*2 = 80 scores -> 1376
    # linear: 512 projections + 2 heads * (4*16 + 4*4) = 160 -> 1600
    # hyena: 2 * (192 + 64) = 512 + 2 orders * 8 channels * ((2*2.5*8*3 + 6*5) / 4 + 3) = 648 -> 2088
    assert [M.flops_per_token(c) for c in (mla, lin, hy)] == [1376.0, 1600.0, 2088.0]
    assert M.flops_breakdown(hy)["attention_scores"] == 648.0
    assert M.flops_per_token(hy, training=True) == 3 * 2088.0
    # activation elements per token (sdpa: one log-sum-exp per head = 2):
    # MLA: d + 2r + dr + 2d + d + 2 = 8 + 4 + 2 + 16 + 8 + 2 = 40 -> 32 + 40 + 64 + 36 = 172
    # linear: d + 2 kv + 2d + d + 2 H min(T, 64) = 8 + 16 + 16 + 8 + 16 = 64 -> 196
    # hyena: (N + 1) d + 5 N d + d = 24 + 80 + 8 = 112 -> 244
    assert [M.activation_elements_per_token(c) for c in (mla, lin, hy)] == [172, 196, 244]
    mem = M.memory_estimate(mla, batch_size=2, optimizer="adamw", dtype_bytes=4)
    # 754 params * 4 bytes = 3016 each for weights and grads, 2 * 3016 for AdamW, 172 * 2 * 4 * 4 = 5504
    assert mem == {"params": 3016, "grads": 3016, "optimizer_state": 6032, "activations": 5504, "total": 17568}


@pytest.mark.usefixtures("_model_one_thread")
def test_model_mixers_speculative_and_backends():
    """MLA and Hyena caches roll back, so speculative greedy decoding equals the target's greedy output;
    set_attention_backend switches MLA's softmax backend and naive == sdpa for it; defaults are unchanged."""
    draft = _model_tiny(num_layers=1)
    for sw in ({"mixer": "mla", "attention": "sliding", "window_size": 5}, {"mixer": "hyena", "position": "nope"}):
        target = _model_tiny(**sw)
        prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
        assert M.speculative_generate(target, draft, prompts, 12, k=3, temperature=0) == \
            M.generate(target, prompts, 12, temperature=0)
    m = _model_tiny(mixer="mla").eval()
    ids = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        a = m(ids)
        M.set_attention_backend(m, "naive")
        assert m.layers[0].attn.attn_impl == "naive" and m.config.attn_impl == "naive"
        torch.testing.assert_close(m(ids), a, atol=1e-5, rtol=1e-5)
    d = tiny_config(**_MODEL_BASE).to_dict()
    assert (d["mixer"], d["kv_lora_rank"], d["hyena_order"], d["dropout"], d["attn_dropout"]) == \
        ("attention", None, None, 0.0, 0.0)


def test_model_mla_flops_agree_with_torch_flop_counter():
    """MLA's training form runs exactly the matmuls flops_breakdown counts (naive backend, full T x T rows):
    q, latent down, k/v up, RoPE key, output, scores and weighted sum."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny_config(vocab_size=50, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=None,
                      mixer="mla", kv_lora_rank=6, attn_impl="naive")
    m = M.TransformerLM.from_config(cfg)
    with FlopCounterMode(display=False) as fc:
        m(torch.randint(0, 50, (3, 12)))
    assert fc.get_total_flops() == 3 * 12 * M.flops_per_token(cfg, causal_average=False)


@pytest.mark.usefixtures("_model_one_thread")
def test_model_linear_attention_generate_matches_parallel_forward_token_by_token():
    """generate() decodes linear attention with its recurrent (S, z) state; every token it emits must be
    the argmax of ONE parallel (chunked) forward over the finished sequence at the position before it."""
    m = _model_tiny(mixer="linear").double()
    prompt = [3, 1, 4, 1, 5]
    new = M.generate(m, prompt, 20, temperature=0)[0]
    with torch.no_grad():
        logits = m.eval()(torch.tensor([prompt + new]))[0]  # (25, V), the parallel form
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == new

# ===== Stage 3: train.py -- loss, optimizers, schedules, batches, the loop, evaluation, checkpoints, data, CLI =====


# ---- shared fixtures and helpers of this section --------------------------------------------------
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


def _train_grads(steps, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _train_coin_story(w):
    w.write("A story about ")
    w.pick(["heads.", "tails."])


class _TrainRangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
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
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


# ---------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------
def test_train_cross_entropy_matches_torch_and_is_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    targets = torch.randint(0, 11, (4, 7), generator=g)
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert torch.allclose(T.cross_entropy(logits, targets), ref, atol=1e-6)
    assert torch.allclose(T.cross_entropy_fast(logits, targets), ref, atol=1e-6)
    # huge logits: naive exp overflows to inf; ours must stay finite and equal torch's
    huge = logits * 1e4
    ours = T.cross_entropy(huge, targets)
    assert torch.isfinite(ours)
    assert torch.allclose(ours, F.cross_entropy(huge.reshape(-1, 11), targets.reshape(-1)), rtol=1e-5)
    # hand-worked: uniform logits over V classes -> loss ln V
    uniform = T.cross_entropy(torch.zeros(3, 5), torch.tensor([0, 1, 4]))
    assert abs(float(uniform) - math.log(5)) < 1e-6
    # bits per byte: 2 tokens, total ln(2)*8 nats over 4 bytes = 2 bits/byte
    assert abs(T.bits_per_byte(8 * math.log(2), 4) - 2.0) < 1e-12


# ---------------------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------------------
def test_train_adamw_matches_float64_formula():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    theta0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = _train_grads(6, (5, 3))
    p = torch.nn.Parameter(theta0.clone().float())
    opt = T.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    theta, m, v = theta0.clone(), torch.zeros_like(theta0), torch.zeros_like(theta0)
    for t, gr in enumerate(grads, start=1):
        p.grad = gr.float()
        opt.step()
        m = b1 * m + (1 - b1) * gr
        v = b2 * v + (1 - b2) * gr * gr
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        theta = theta - alpha * m / (v.sqrt() + eps)
        theta = theta - lr * wd * theta
    assert torch.allclose(p.detach().double(), theta, atol=1e-6)


def test_train_adamw_matches_torch_adamw():
    grads = _train_grads(8, (4, 6), seed=2)
    init = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.clone())
    oa = T.AdamW([a], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ob = torch.optim.AdamW([b], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for gr in grads:
        a.grad, b.grad = gr.float(), gr.float().clone()
        oa.step()
        ob.step()
    # torch applies decay before the Adam step, the handout after: equal to O(lr^2 * wd)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="learning rate"):
        T.AdamW([a], lr=-1.0)


def test_train_muon_newton_schulz_orthogonalizes_and_steps():
    G = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    O = T.zeropower_via_newtonschulz5(G)
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3  # all singular values pushed near 1 (quintic NS lands in ~[0.7, 1.2])
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cos > 0.95  # direction of the exact orthogonal factor U V^T
    assert T.zeropower_via_newtonschulz5(G.T).shape == (48, 16)  # tall matrices handled via the transpose
    # first Muon step (nesterov): buf = (1-mu) g ; update = g + mu (buf - g) ; W -= lr * scale * NS(update)
    w = torch.nn.Parameter(torch.zeros(48, 16))
    w.grad = G.T.clone()
    opt = T.Muon([w], lr=0.1, momentum=0.9)
    opt.step()
    upd = G.T + 0.9 * ((1 - 0.9) * G.T - G.T)
    expect = -0.1 * (48 / 16) ** 0.5 * T.zeropower_via_newtonschulz5(upd)
    assert torch.allclose(w.detach(), expect, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        T.Muon([torch.nn.Parameter(torch.zeros(3))])


# ---------------------------------------------------------------------------------------------------
# schedules, clipping
# ---------------------------------------------------------------------------------------------------
def test_train_cosine_schedule_hand_values():
    f = lambda it: T.get_lr_cosine_schedule(it, 1.0, 0.1, 10, 110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert abs(f(60) - 0.55) < 1e-12  # halfway: min + (max - min) / 2
    assert abs(f(35) - (0.1 + 0.45 * (1 + math.cos(math.pi / 4)))) < 1e-12
    assert f(110) == pytest.approx(0.1) and f(500) == 0.1


def test_train_wsd_schedule_hand_values():
    f = lambda it: T.get_lr_wsd_schedule(it, 1.0, 0.1, 10, 100, decay_fraction=0.2)
    assert f(0) == 0.0 and f(5) == 0.5
    assert f(10) == 1.0 and f(50) == 1.0 and f(79) == 1.0  # stable until 80 = 100 - 0.2 * 100
    assert f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1) and f(150) == 0.1


def test_train_gradient_clipping_matches_torch():
    for max_norm in (0.1, 1e3):  # clipped and untouched
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3, 4, generator=g)) for _ in range(3)]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        for p, q in zip(ps[:2], qs[:2]):  # the third has no grad: skipped
            p.grad = torch.randn(3, 4, generator=g)
            q.grad = p.grad.clone()
        n1 = T.gradient_clipping(ps, max_norm)
        n2 = torch.nn.utils.clip_grad_norm_(qs, max_norm)
        assert abs(n1 - float(n2)) < 1e-5
        for p, q in zip(ps[:2], qs[:2]):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------
def test_train_get_batch_windows_shapes_and_bad_inputs(tmp_path):
    data = np.arange(100, dtype=np.uint16)
    path = tmp_path / "d.bin"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = T.get_batch(mm, 32, 8, "cpu", np.random.default_rng(0))
    assert x.shape == y.shape == (32, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange data: each window is consecutive, targets shifted by one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    starts = set()
    for s in range(20):
        xs, _ = T.get_batch(mm, 64, 8, "cpu", np.random.default_rng(s))
        starts |= set(xs[:, 0].tolist())
    assert starts == set(range(92))  # every start 0..n-T-1 is reachable, none beyond
    a, _ = T.get_batch(mm, 4, 8, "cpu", np.random.default_rng(7))
    b, _ = T.get_batch(mm, 4, 8, "cpu", np.random.default_rng(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="device"):
        T.get_batch(mm, 4, 8, "cuda:99" if not torch.cuda.is_available() else "nonsense_device")
    with pytest.raises(ValueError, match="device"):
        T.get_batch(mm, 4, 8, "not-a-device")
    with pytest.raises(ValueError, match="context window"):
        T.get_batch(mm[:8], 4, 8, "cpu")


# ---------------------------------------------------------------------------------------------------
# synthetic corpus
# ---------------------------------------------------------------------------------------------------
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
def test_train_download_resume_verify_and_unpack(tmp_path, _train_server):
    root, base = _train_server
    payload = bytes(range(256)) * 1000
    (root / "f.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "f.bin"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(payload[:1234])  # an interrupted earlier download
    T.download(base + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == payload and not Path(str(dest) + ".part").exists()
    assert Path(str(dest) + ".sha256").read_text().strip() == __import__("hashlib").sha256(payload).hexdigest()
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
    Path(str(fdest) + ".part").write_bytes(payload[:999])
    T.download((root / "f.bin").as_uri(), fdest, progress=False)
    assert fdest.read_bytes() == payload
    # the dataset path of the owt files (gzip) through a mirror
    ds = root / "datasets" / "stanford-cs336" / "owt-sample" / "resolve" / "main"
    ds.mkdir(parents=True)
    for name, text in (("owt_train.txt.gz", "train text\n" * 50), ("owt_valid.txt.gz", "valid text\n" * 5)):
        (ds / name).write_bytes(gzip.compress(text.encode()))
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
def test_train_checkpoint_round_trip(tmp_path, _train_data):
    cfg = _train_cfg(tmp_path)
    model = T.build_model(cfg, _train_data.tokenizer.vocab_size)
    opt = T.build_optimizer(model, cfg)
    x = torch.randint(0, 300, (2, 16))
    model(x).sum().backward()
    opt.step()
    path = tmp_path / "c.pt"
    torch.manual_seed(42)
    T.save_checkpoint(model, opt, 17, path, model_config=model.config.to_dict())
    expect_next = torch.rand(3)
    buf = io.BytesIO()
    T.save_checkpoint(model, opt, 17, buf)
    ckpt = torch.load(path, weights_only=True)  # safe loading works: only tensors and primitives
    assert ckpt["iteration"] == 17 and ckpt["model_config"]["d_model"] == 32
    model2 = T.build_model(_train_cfg(tmp_path, seed=99), 300)
    opt2 = T.build_optimizer(model2, cfg)
    torch.manual_seed(0)
    assert T.load_checkpoint(path, model2, opt2) == 17
    assert torch.equal(torch.rand(3), expect_next)  # RNG state restored
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    m1 = sd1["optimizers"][1]["state"][0]["exp_avg"]
    assert torch.equal(m1, sd2["optimizers"][1]["state"][0]["exp_avg"])
    buf.seek(0)
    assert T.load_checkpoint(buf, model2, None) == 17  # binary file objects work too
    assert not list(tmp_path.glob("*.tmp"))  # atomic_open's temporary file (c.pt.<random>.tmp) is gone
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
    rows = [json.loads(l) for l in (Path(cfg_b.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, N + 1))  # log reads as one run


def test_train_resume_accepts_a_checkpoint_from_before_a_new_switch(tmp_path, _train_data):
    # a checkpoint written before a default-off ModelConfig field existed lacks it: resume fills in today's
    # default instead of calling the run incompatible; a real difference is still refused, naming the field
    cfg = _train_cfg(tmp_path, max_steps=4, ckpt_interval=2)
    T.train(cfg, _train_data, log=_train_quiet)
    path = Path(cfg.out_dir) / "ckpt.pt"
    ck = T.read_checkpoint(path)
    assert ck["model_config"].pop("dropout") == 0.0
    T.write_checkpoint(path, ck.pop("iteration"), **ck)
    cfg.resume, cfg.max_steps = True, 6
    assert T.train(cfg, _train_data, log=_train_quiet)["steps"] == 6
    ck = T.read_checkpoint(path)
    ck["model_config"]["qk_norm"] = not ck["model_config"]["qk_norm"]
    T.write_checkpoint(path, ck.pop("iteration"), **ck)
    cfg.max_steps = 8
    with pytest.raises(ValueError, match="qk_norm"):
        T.train(cfg, _train_data, log=_train_quiet)


def test_train_mup_at_base_width_is_sp_bit_for_bit_and_scales_lr_and_init(tmp_path, _train_data):
    # muP's factors are m = d_model / base; at base = d_model every factor is exactly 1.0, so training must
    # equal the muP-off run bit for bit (same weights, same losses), though the optimizer has 4 groups, not 2
    def run(name, **kw):
        cfg = _train_cfg(tmp_path, optimizer="adamw", lr=1e-2, max_steps=6, out_dir=str(tmp_path / name), **kw)
        res = T.train(cfg, _train_data, log=_train_quiet)
        return cfg, res, T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    _, r_sp, ck_sp = run("sp")
    cfg_mup, r_mup, ck_mup = run("mup", mup_base_width=32)
    assert ck_mup["config"]["mup_base_width"] == 32 and ck_sp["config"]["mup_base_width"] is None
    assert r_mup["val"]["loss"] == r_sp["val"]["loss"]
    for k, v in ck_sp["model"].items():
        assert torch.equal(v, ck_mup["model"][k]), k
    # a wider model than the base (d 32, base 8: m = 4), against hand-computed factors: lm_head init / 4,
    # hidden matrices and lm_head at lr / 4, embeddings and gains at lr; gains without weight decay
    cfg = _train_cfg(tmp_path, optimizer="adamw", lr=1e-2, mup_base_width=8)
    sp_model, model = T.build_model(cfg, 300), T.build_model(cfg, 300)
    T.mup_init_(model, cfg)
    assert torch.equal(model.lm_head.weight, sp_model.lm_head.weight * 0.25)
    assert torch.equal(model.layers[1].ffn.w2.weight, sp_model.layers[1].ffn.w2.weight)
    opt = T.build_optimizer(model, cfg)
    got = {id(p): (g["base_lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(got) == len(list(model.parameters()))
    assert got[id(model.layers[0].attn.q_proj.weight)] == (2.5e-3, cfg.weight_decay)
    assert got[id(model.lm_head.weight)] == (2.5e-3, cfg.weight_decay)
    assert got[id(model.token_embeddings.weight)] == (1e-2, cfg.weight_decay)
    assert got[id(model.ln_final.weight)] == (1e-2, 0.0)
    # resume keeps the parametrization: a checkpoint trained under muP refuses a muP-off continuation
    cfg_mup.resume, cfg_mup.max_steps, cfg_mup.mup_base_width = True, 8, None
    with pytest.raises(ValueError, match="mup-base-width"):
        T.train(cfg_mup, _train_data, log=_train_quiet)
    cfg_mup.mup_base_width = 32
    assert T.train(cfg_mup, _train_data, log=_train_quiet)["steps"] == 8


def test_train_end_to_end_loss_falls_and_samples(tmp_path, _train_data, capsys):
    cfg = _train_cfg(tmp_path, max_steps=40, num_samples=1, sample_tokens=20, plot=True, optimizer="adamw",
                     lr=1e-2, adamw_impl="torch", eval_interval=20)
    out = T.train(cfg, _train_data, log=_train_quiet)
    first, last = sum(out["losses"][:3]) / 3, sum(out["losses"][-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert out["val"]["bpb"] < 3.0 and out["val"]["bytes"] > 0 and out["entropy_floor_bpb"] > 0
    assert out["val"]["bpb"] > out["entropy_floor_bpb"]  # no model beats the corpus' entropy (big margin here)
    assert (Path(cfg.out_dir) / "loss_curve.png").stat().st_size > 1000
    assert len(out["samples"]) == 1
    T.main(["sample", "--checkpoint", str(Path(cfg.out_dir) / "ckpt.pt"), "--prompt", "Once upon",
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
    Path(cfg.out_dir).mkdir(parents=True)
    (Path(cfg.out_dir) / "ckpt.pt").write_bytes(b"\x00garbage")
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
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    cfg = _train_cfg(tmp_path, max_steps=10, ckpt_interval=2)
    with pytest.raises(FloatingPointError, match="diverged.*intact"):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=poison))
    ckpt = T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert ckpt["iteration"] == 2  # the last good one; nothing half-written
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_time_budget_stops_run_and_ends_schedule(tmp_path, _train_data):
    import time as time
    cfg = _train_cfg(tmp_path, max_steps=None, max_minutes=0.2, warmup_iters=2, min_lr_ratio=0.1, threads=1)
    t0 = time.time()
    out = T.train(cfg, _train_data, log=_train_quiet, t_start=t0)
    assert out["stop_reason"] == "time budget" and out["steps"] > 10
    assert time.time() - t0 < 0.2 * 60 + 3  # the whole call, final evaluation included, inside the budget
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr_muon"] / cfg.muon_lr for r in rows if r["kind"] == "train"]
    assert max(lrs) > 0.9 and lrs[-1] < 0.25  # full peak reached, decayed to ~min by the budget's end


def test_train_evaluate_scores_every_target_once_for_any_stride():
    # A context-free "model" (fixed logits): its loss on each target does not depend on the window, so any
    # stride must give exactly the unigram NLL summed over all targets, each counted once.
    class _Unigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.randn(7, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return self.logits.expand(*x.shape, 7)

    g = np.random.default_rng(0)
    toks = g.integers(0, 7, size=8 * 6 + 1)  # n - 1 - T divisible by 1, 2, 4, 8 below
    logp = torch.log_softmax(torch.randn(7, generator=torch.Generator().manual_seed(0)), 0)
    expect = -float(logp[torch.from_numpy(toks[1:])].sum().double()) / (len(toks) - 1)
    byte_len = np.arange(1, 8)
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


# ---------------------------------------------------------------------------------------------------
# bugs the tests above would miss: precision, schedules' ends, gradient accumulation, course conventions
# ---------------------------------------------------------------------------------------------------
def test_train_cross_entropy_fast_on_bf16_logits_matches_float64():
    # bf16 logits of large scale: the loss must be computed from them in float32 or better, not in bf16
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 50, generator=g) * 30).to(torch.bfloat16)
    targets = torch.randint(0, 50, (64,), generator=g)
    z = logits.double()  # the exact values the bf16 tensor holds, in float64
    ref = (torch.logsumexp(z, -1) - z.gather(1, targets[:, None]).squeeze(1)).mean()
    for fn in (T.cross_entropy_fast, T.cross_entropy):
        out = fn(logits, targets)
        assert out.dtype == torch.float32
        assert abs(float(out) - float(ref)) <= 1e-5 * abs(float(ref)), (fn.__name__, float(out), float(ref))


def test_train_cosine_schedule_every_iteration_and_first_warmup_step():
    lr_max, lr_min, Tw, Tc = 1.0, 0.1, 7, 40

    def expected(t):  # the CS336 handout's formula, written out independently
        if t < Tw:
            return t / Tw * lr_max
        if t <= Tc:
            return lr_min + 0.5 * (1 + math.cos((t - Tw) / (Tc - Tw) * math.pi)) * (lr_max - lr_min)
        return lr_min

    for t in range(0, Tc + 3):
        assert T.get_lr_cosine_schedule(t, lr_max, lr_min, Tw, Tc) == pytest.approx(expected(t), abs=1e-12), t
    # the training loop's multiplier: with a step budget it IS the cosine at every step after warm-up, and
    # the very first step already moves (a first step at lr 0 would be wasted)
    cfg = T.TrainConfig(warmup_iters=Tw, max_steps=Tc, min_lr_ratio=lr_min, schedule="cosine")
    assert T.schedule_factor(cfg, 0, 0.0) == pytest.approx(1 / Tw)
    for step in range(Tw, Tc + 3):
        frac = min(max((step - Tw) / (Tc - Tw), 0.0), 1.0)
        assert T.schedule_factor(cfg, step, frac) == pytest.approx(expected(step), abs=1e-12), step


def test_train_first_step_lr_is_positive_in_a_real_run(tmp_path, _train_data):
    cfg = _train_cfg(tmp_path, max_steps=3, warmup_iters=10)
    T.train(cfg, _train_data, log=_train_quiet)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["step"] == 1 and first["lr_muon"] == pytest.approx(cfg.muon_lr / 10)
    assert first["lr_adamw"] == pytest.approx(cfg.lr / 10)


def test_train_grad_accum_equals_one_big_batch(tmp_path, _train_data, monkeypatch):
    # accum 2 x batch B must produce the gradient of accum 1 x batch 2B on the same 2B sequences: catches a
    # missing division by grad_accum (2x the gradient) and micro-batches drawn with the same seed
    B = 4
    drawn, grads = [], []
    real_get_batch = T.get_batch

    def recording_get_batch(*a, **k):
        x, y = real_get_batch(*a, **k)
        drawn.append((x.clone(), y.clone()))
        return x, y

    def capture(run_model):  # after the last backward, before clipping and the optimizer step
        grads.append({n: p.grad.detach().clone() for n, p in run_model.named_parameters()})

    monkeypatch.setattr(T, "get_batch", recording_get_batch)
    cfg = _train_cfg(tmp_path / "a", max_steps=1, batch_size=B, grad_accum=2, grad_clip=0.0)
    a = T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(sync_gradients=capture))
    monkeypatch.setattr(T, "get_batch", real_get_batch)
    assert len(drawn) == 2 and not torch.equal(drawn[0][0], drawn[1][0])  # two different micro-batches
    x = torch.cat([d[0] for d in drawn])
    y = torch.cat([d[1] for d in drawn])
    cfg = _train_cfg(tmp_path / "b", max_steps=1, batch_size=2 * B, grad_accum=1, grad_clip=0.0)
    b = T.train(cfg, _train_data, log=_train_quiet,
                hooks=T.TrainHooks(sync_gradients=capture, get_batch=lambda step, micro: (x, y)))
    assert a["losses"][0] == pytest.approx(b["losses"][0], rel=1e-6)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name


def test_train_device_errors_follow_torch_convention(tmp_path):
    data = np.arange(100, dtype=np.uint16)
    bad = "cuda:99" if not torch.cuda.is_available() else "cuda:9999"
    for name in (bad, "not-a-device"):
        with pytest.raises(RuntimeError, match="device"):  # what torch raises for devices
            T.get_batch(data, 4, 8, name)
        with pytest.raises(ValueError, match="device"):  # and what this project's callers catch
            T.get_batch(data, 4, 8, name)
    # a checkpoint that does not fit the model: RuntimeError (torch's load_state_dict) and ValueError
    cfg = _train_cfg(tmp_path)
    big, small = T.build_model(cfg, 300), T.build_model(_train_cfg(tmp_path, d_model=16), 300)
    T.save_checkpoint(big, None, 1, tmp_path / "c.pt")
    for exc in (RuntimeError, ValueError):
        with pytest.raises(exc, match="incompatible"):
            T.load_checkpoint(tmp_path / "c.pt", small, None)


# ---------------------------------------------------------------------------------------------------
# reliability: refusing to destroy runs, options checked first, interrupts, full disks, leftovers
# ---------------------------------------------------------------------------------------------------
_TRAIN_TINY_CLI = ["--synthetic-bytes", "150000", "--synthetic-val-bytes", "20000", "--vocab-size", "300",
                   "--context-length", "32", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
                   "--max-steps", "3", "--num-samples", "0", "--no-plot", "--device", "cpu", "--threads", "1"]


# the training command's bad options (each after _TRAIN_TINY_CLI, the tiny run's flags), then the sweeps' and
# the menu's (as given): exit 2, one line naming the option, no traceback, nothing created
_TRAIN_CLI_ERRORS = [(_TRAIN_TINY_CLI + args, option) for args, option in [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--temperature", "-1"], "--temperature"),
    (["--sample-tokens", "-1"], "--sample-tokens"), (["--final-eval-tokens", "0"], "--final-eval-tokens"),
    (["--threads", "-3"], "--threads"), (["--warmup-iters", "-5"], "--warmup-iters"),
    (["--model-kw", '{"foo": 1}'], "--model-kw"), (["--model-kw", "[1]"], "--model-kw"),
    (["--model-kw", '{"vocab_size": 5}'], "--model-kw"), (["--model-kw", "{not json"], "--model-kw"),
    (["--data-dir", "afile"], "--data-dir"), (["--out-dir", "afile"], "--out-dir"),
    (["--max-steps", "0"], "--max-steps"), (["--lr", "-1"], "--lr"), (["--eval-stride", "999"], "--eval-stride"),
    (["--device", "cuda:99" if not torch.cuda.is_available() else "nonsense"], "device"),
    (["--num-heads", "3"], "num_heads"), (["--min-lr-ratio", "2"], "--min-lr-ratio"),
    (["--data", "no/such/file.txt"], "--data"), (["--batch-size", "x"], "--batch-size"),
    (["gpt5"], "preset"),
    (["--mup-base-width", "0", "--optimizer", "adamw"], "--mup-base-width"),
    (["--mup-base-width", "16", "--optimizer", "muon"], "--mup-base-width"),
]] + [
    (["batch-size", "--batches", "3,4"], "--batches must be even"),
    (["batch-size", "--batches", "x"], "--batches"),
    (["batch-size", "--tokens", "10"], "--tokens"),
    (["ablate", "--seeds", "1"], "--seeds"),
    (["ablate", "--steps", "2"], "--steps"),
    (["batch-size", "--threads", "-1"], "--threads"), (["ablate", "--threads", "-2"], "--threads"),
    (["sample", "--checkpoint", "nope.pt"], "--checkpoint"), (["sample", "--checkpoint", "."], "--checkpoint"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--soap-frequency", "0"], "--soap-frequency"),
    (["--noise-scale"], "--grad-accum"),
    (["--distill-alpha", "2"], "--distill-alpha"),
    (["--distill-temperature", "0"], "--distill-temperature"),
    (["--distill-from", "nope.pt"], "--distill-from"),
    (["--prune-sparsity", "1"], "--prune-sparsity"),
    (["--prune-sparsity", "0.5", "--prune-end", "0.1"], "--prune-end"),
]


@pytest.mark.parametrize("argv, option", _TRAIN_CLI_ERRORS)
def test_train_cli_rejects_each_bad_option_before_any_work(tmp_path, monkeypatch, capsys, argv, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and option in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created: no run or cache folder


def test_train_cli_usage_error_is_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(T.__file__)), "--top-p", "0"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "train.py: error: --top-p must be in (0, 1], got 0.0"
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run([sys.executable, str(Path(T.__file__)), "sample", "--checkpoint",
                                  "x.pt", "--top-p", "1.5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--top-p" in proc.stderr


def test_train_rerun_refuses_to_overwrite_a_run(tmp_path, _train_data):
    cfg = _train_cfg(tmp_path, max_steps=2)
    T.train(cfg, _train_data, log=_train_quiet)
    ckpt, metrics = (Path(cfg.out_dir) / n for n in ("ckpt.pt", "metrics.jsonl"))
    saved = (ckpt.read_bytes(), metrics.read_text())
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        T.train(_train_cfg(tmp_path, max_steps=2), _train_data, log=_train_quiet)
    assert (ckpt.read_bytes(), metrics.read_text()) == saved  # untouched
    out = T.train(_train_cfg(tmp_path, max_steps=3, overwrite=True), _train_data, log=_train_quiet)
    assert out["steps"] == 3 and T.read_checkpoint(ckpt)["iteration"] == 3
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


def test_train_zero_byte_checkpoint_is_a_clear_error(tmp_path, _train_data, capsys):
    cfg = _train_cfg(tmp_path, resume=True)
    Path(cfg.out_dir).mkdir(parents=True)
    (Path(cfg.out_dir) / "ckpt.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        T.train(cfg, _train_data, log=_train_quiet)
    with pytest.raises(SystemExit) as e:
        T.main(["sample", "--checkpoint", str(Path(cfg.out_dir) / "ckpt.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "empty" in err and "Traceback" not in err


def test_train_disk_full_keeps_the_previous_checkpoint(tmp_path, _train_data, monkeypatch):
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    def fill_disk_at_3(step, model, metrics):
        if step == 3:
            monkeypatch.setattr(torch, "save", full_disk_save)

    cfg = _train_cfg(tmp_path, max_steps=8, ckpt_interval=2)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    with pytest.raises(OSError, match=r"no space left writing .*ckpt\.pt; the previous checkpoint is intact") as e:
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=fill_disk_at_3))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert T.read_checkpoint(ckpt)["iteration"] == 2  # the step-2 checkpoint, whole
    assert not [p for p in Path(cfg.out_dir).iterdir() if p.name.endswith(".tmp")]  # temp file removed


def test_train_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, _train_data):
    full = T.train(_train_cfg(tmp_path / "full", max_steps=7), _train_data, log=_train_quiet)

    def ctrl_c_at_3(step, model, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _train_cfg(tmp_path / "int", max_steps=7, ckpt_interval=1000)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=ctrl_c_at_3))
    assert T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["iteration"] == 3  # saved at the current step
    cfg.resume = True
    resumed = T.train(cfg, _train_data, log=_train_quiet)
    assert resumed["losses"] == full["losses"][3:]  # bit-identical continuation

    # a second Ctrl-C stops at once, without saving (the last checkpoint, step 2 here, stays)
    def ctrl_c_twice_at_3(step, model, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    cfg = _train_cfg(tmp_path / "twice", max_steps=7, ckpt_interval=2)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=ctrl_c_twice_at_3))
    assert T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_train_resume_keeps_minutes_cumulative_and_one_final_row(tmp_path, _train_data):
    class Killed(Exception):
        pass

    def kill_at_5(step, model, metrics):
        if step == 5:
            time.sleep(0.6)  # make the first process's clock clearly ahead of a fresh one
            raise Killed

    cfg = _train_cfg(tmp_path, max_steps=6, ckpt_interval=4)
    with pytest.raises(Killed):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=kill_at_5),
                t_start=time.time())
    cfg.resume = True
    for _ in range(3):  # the first resume finishes the run; the next two find it finished
        T.train(cfg, _train_data, log=_train_quiet, t_start=time.time())
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert sum(1 for r in rows if r.get("final")) == 1 and rows[-1].get("final")
    minutes = [r["minutes"] for r in rows]
    assert minutes == sorted(minutes)  # one clock for the whole run, across the three processes


def test_train_eta_is_the_nearer_of_step_limit_and_time_budget():
    cfg = T.TrainConfig(max_steps=100, max_minutes=10.0, warmup_iters=0)
    b = T.TimeBudget(cfg, start_step=0, train_seconds=0.0, prep_seconds=0.0, saved=None, tokens_per_step=1000,
                     final_eval_tokens=10_000)
    assert b.eta(10, 10.0) == pytest.approx(90.0)  # 90 steps left at 1 s/step, well inside 10 minutes
    cfg = T.TrainConfig(max_steps=100_000, max_minutes=1.0, warmup_iters=0)
    b = T.TimeBudget(cfg, 0, 0.0, 0.0, None, 1000, 10_000)
    assert b.eta(10, 10.0) == pytest.approx(50.0)  # the budget ends first
    # the final evaluation is cut to the time left: 10 s budget, at 9 s, 1000 tokens/s, 3 s for samples -> 0
    b = T.TimeBudget(T.TrainConfig(max_steps=None, max_minutes=1 / 6, num_samples=0), 0, 0.0, 0.0, None, 1000,
                     10_000)
    b.eval_tps = 1000.0
    assert b.final_eval_cap(5, 9.0, 10_000) == 1000 and b.final_eval_cap(5, 0.0, 10_000) is None


def test_train_tokenizer_fingerprint_checked_on_resume_and_sample(tmp_path, _train_data, capsys):
    other = T.prepare_data(_train_cfg(tmp_path, data_seed=7, synthetic_bytes=60_000, data_dir=str(tmp_path / "dc")),
                           log=_train_quiet)
    assert other.tokenizer.vocab_size == _train_data.tokenizer.vocab_size
    assert other.tokenizer.fingerprint() != _train_data.tokenizer.fingerprint()
    cfg = _train_cfg(tmp_path, max_steps=2)
    T.train(cfg, _train_data, log=_train_quiet)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    assert T.read_checkpoint(ckpt)["tokenizer_fingerprint"] == _train_data.tokenizer.fingerprint()
    with pytest.raises(ValueError, match="another tokenizer"):
        T.train(_train_cfg(tmp_path, max_steps=4, resume=True), other, log=_train_quiet)
    shutil.rmtree(Path(cfg.out_dir) / "tokenizer")
    other.tokenizer.save(str(Path(cfg.out_dir) / "tokenizer"))  # a same-size tokenizer of another corpus
    with pytest.raises(SystemExit) as e:
        T.main(["sample", "--checkpoint", str(ckpt), "--device", "cpu", "--max-new-tokens", "5"])
    assert e.value.code == 2 and "fingerprint" in capsys.readouterr().err


def test_train_sample_long_prompt_is_cut_and_temperature_0_is_greedy(tmp_path, _train_data, capsys):
    cfg = _train_cfg(tmp_path, max_steps=2)
    T.train(cfg, _train_data, log=_train_quiet)
    ckpt = str(Path(cfg.out_dir) / "ckpt.pt")
    prompt = "Once upon a time, there was a happy girl named Lily. " * 12  # far more than 32 tokens
    outs = []
    for seed in ("0", "1"):
        T.main(["sample", "--checkpoint", ckpt, "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0",
                "--seed", seed, "--device", "cpu"])
        cap = capsys.readouterr()
        assert "cut from the left" in cap.err and "Traceback" not in cap.err
        outs.append(cap.out)
    assert outs[0] == outs[1]  # greedy: the seed does not matter
    assert "happy girl named Lily." in outs[0] and outs[0].count("Once upon") < prompt.count("Once upon")  # cut


def test_train_failed_start_leaves_no_empty_folders_or_temp_files(tmp_path, _train_data):
    # bad data: the cache folders this command made are removed again, and so is the new run folder
    binf = tmp_path / "bin.txt"
    binf.write_bytes(b"\xff\xfe" * 100)
    cfg = _train_cfg(tmp_path, data=str(binf), data_dir=str(tmp_path / "new_cache" / "dc"),
                     out_dir=str(tmp_path / "runs" / "r1"))
    with pytest.raises(ValueError, match="UTF-8"):
        T.train(cfg, log=_train_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.txt"]
    # offline: a download that cannot reach its server is one clear error and leaves nothing behind
    cfg = _train_cfg(tmp_path, data="tinyshakespeare", mirror=(tmp_path / "no_such_server").as_uri(),
                     data_dir=str(tmp_path / "dc2"))
    with pytest.raises(ConnectionError, match="tinyshakespeare.*network"):
        T.prepare_data(cfg, log=_train_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.txt"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_train_speedrun_text_is_a_verified_download_not_a_workspace_file(tmp_path):
    cfg = T.config_from_args(T.get_parser().parse_args(["speedrun"]))
    assert cfg.data == "tinyshakespeare" and "shared" not in repr(T.PRESETS)
    remote = T.DATASETS["tinyshakespeare"]["text"]
    assert remote.url == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    www = tmp_path / "www" / "karpathy" / "char-rnn" / "master" / "data" / "tinyshakespeare"
    www.mkdir(parents=True)
    (www / "input.txt").write_text("not the real file\n")  # a mirror serving the wrong bytes is caught
    with pytest.raises((ConnectionError, ValueError)):
        T.fetch_dataset("tinyshakespeare", tmp_path / "cache", mirror=(tmp_path / "www").as_uri(), progress=False)
    real = workspace("data", "tinyshakespeare.txt")  # the workspace copy, when present
    if real is None:
        pytest.skip("../shared/data/tinyshakespeare.txt absent: the verified-download half needs it")
    (www / "input.txt").write_bytes(real.read_bytes())
    shutil.rmtree(tmp_path / "cache")
    files = T.fetch_dataset("tinyshakespeare", tmp_path / "cache", mirror=(tmp_path / "www").as_uri(), progress=False)
    assert files["text"].stat().st_size == remote.size and T.sha256_file(files["text"]) == remote.sha256


# ---- issue 11: SOAP, gradient noise scale, distillation, pruning, ablation (train.py part) -------------
def _train_soap_reference(grads, w0, lr, b1, b2, eps, wd, freq):
    """SOAP's update written independently in float64 numpy: eigenbases by numpy.linalg.eigh."""
    w = w0.copy()
    m, n = w.shape
    L, R = np.zeros((m, m)), np.zeros((n, n))
    mom, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        L = b2 * L + (1 - b2) * g @ g.T
        R = b2 * R + (1 - b2) * g.T @ g
        if (t - 1) % freq == 0:
            QL, QR = np.linalg.eigh(L)[1], np.linalg.eigh(R)[1]
        mom = b1 * mom + (1 - b1) * g
        gr = QL.T @ g @ QR
        v = b2 * v + (1 - b2) * gr * gr
        # the bias corrections as in AdamW's step-size form: lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt v + eps)
        upd = (QL.T @ mom @ QR) / (np.sqrt(v) + eps) * (np.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        w = w - lr * (QL @ upd @ QR.T)
        w = w * (1 - lr * wd)
    return w


@pytest.mark.parametrize("shape,freq", [((3, 4), 1), ((4, 3), 2), ((5, 5), 1)])
def test_train_soap_matches_float64_reference(shape, freq):
    rs = np.random.default_rng(0)
    w0 = rs.standard_normal(shape)
    grads = [rs.standard_normal(shape) for _ in range(3)]
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = T.SOAP([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=freq)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    ref = _train_soap_reference(grads, w0, 0.1, 0.9, 0.95, 1e-8, 0.01, freq)
    # (eigh in torch vs numpy: the same bases up to signs, which cancel; rounding of the rotations ~1e-9)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-6, atol=1e-8)
    # not plain Adam: the rotation changes the update (a SOAP that skipped it would fail here)
    q = torch.nn.Parameter(torch.tensor(w0))
    adam = T.AdamW([q], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for g in grads:
        q.grad = torch.tensor(g)
        adam.step()
    assert np.abs(q.detach().numpy() - ref).max() > 1e-3


def test_train_soap_in_training_and_resume(tmp_path, _train_data):
    cfg = _train_cfg(tmp_path, optimizer="soap", soap_frequency=3, max_steps=6, ckpt_interval=3)
    s = T.train(cfg, _train_data, log=_train_quiet)
    assert s["steps"] == 6 and math.isfinite(s["val"]["bpb"])
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "lr_soap" in rows[0] and "lr_adamw" in rows[0]
    opt = T.build_optimizer(T.build_model(cfg, 300), cfg)
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds[0] == "SOAP" and kinds[1] == "AdamW"
    with pytest.raises(ValueError, match="soap-frequency"):
        _train_cfg(tmp_path, optimizer="soap", soap_frequency=0)


def test_train_noise_scale_recovers_b_simple():
    # per-example gradients g_i = mu + noise, noise ~ N(0, diag(sig^2)): B_simple = sum(sig^2) / |mu|^2
    rs = np.random.default_rng(0)
    d, b_small, accum = 20, 4, 8
    mu = rs.standard_normal(d) * 0.5
    sig = rs.uniform(0.5, 3.0, d)
    truth = float((sig ** 2).sum() / (mu @ mu))
    est = T.NoiseScale(beta=0.999)
    g2_raw, tr_raw = [], []
    for _ in range(4000):
        per_example = mu + sig * rs.standard_normal((b_small * accum, d))  # (B_big, d)
        micro = per_example.reshape(accum, b_small, d).mean(1)  # (accum, d): the small-batch gradients
        g2_small = float((micro ** 2).sum(1).mean())  # mean |G_small|^2 over the micro-batches
        g2_big = float((per_example.mean(0) ** 2).sum())
        est.update(g2_small, g2_big, b_small, b_small * accum)
        g, t = T.noise_scale_terms(g2_small, g2_big, b_small, b_small * accum)
        g2_raw.append(g)
        tr_raw.append(t)
    # the two terms are unbiased: their long averages match |mu|^2 and tr(Sigma)
    assert abs(np.mean(g2_raw) / (mu @ mu) - 1) < 0.05
    assert abs(np.mean(tr_raw) / (sig ** 2).sum() - 1) < 0.05
    assert abs(est.value / truth - 1) < 0.15, (est.value, truth)
    # hand-worked: |G_small|^2 = 5 at B 1, |G_big|^2 = 2 at B 4 -> |G|^2 = (8 - 5) / 3 = 1, tr = 3 / 0.75 = 4
    assert T.noise_scale_terms(5.0, 2.0, 1, 4) == (1.0, 4.0)


def test_train_noise_scale_micro_gradients_and_logging(tmp_path, _train_data):
    # the micro-batch gradients recovered by differencing equal gradients computed one batch at a time
    lin = torch.nn.Linear(3, 2)
    xs = [torch.randn(4, 3) for _ in range(2)]
    direct = []
    for x in xs:
        lin.zero_grad()
        lin(x).pow(2).mean().backward()
        direct.append(sum(float(p.grad.pow(2).sum()) for p in lin.parameters()))
    lin.zero_grad()
    prev, got = None, []
    for x in xs:
        (lin(x).pow(2).mean() / 2).backward()
        prev, g2 = T._micro_grad_sq(lin, prev, 2)
        got.append(g2)
    np.testing.assert_allclose(got, direct, rtol=1e-5)
    cfg = _train_cfg(tmp_path, noise_scale=True, grad_accum=2, max_steps=4)
    T.train(cfg, _train_data, log=_train_quiet)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    vals = [r["noise_scale_tokens"] for r in rows if r["kind"] == "train"]
    assert len(vals) == 4 and any(math.isfinite(v) and v > 0 for v in vals)
    with pytest.raises(ValueError, match="grad-accum"):
        _train_cfg(tmp_path, noise_scale=True, grad_accum=1)


_TRAIN_TINY_SWEEP = dict(vocab_size=300, context_length=32, d_model=32, num_layers=2, num_heads=2,
                         final_eval_tokens=1024, eval_tokens=1024, device="cpu", threads=1)


def test_train_batch_size_sweep_and_steps_to_target(tmp_path, _train_data):
    # hand-worked: EMA with beta = exp(-1) ... a loss that drops to 1 at step 3 stays <= target after
    assert T.steps_to_target([3.0, 3.0, 1.0, 1.0], 1, 1.0, 1e-9) == 3
    assert T.steps_to_target([3.0, 2.0], 1, 1.0, 1e-9) is None
    logs = []
    rep = T.batch_size_sweep([4, 8], 4 * 32 * 6, tmp_path / "bs", data=_train_data, log=logs.append,
                             **_TRAIN_TINY_SWEEP)
    rows = rep["rows"]
    assert [r["batch"] for r in rows] == [4, 8] and [r["steps"] for r in rows] == [6, 3]
    assert [r["tokens_per_step"] for r in rows] == [128, 256]  # equal tokens: 6 x 128 = 3 x 256
    assert all(r["steps_to_target"] for r in rows)  # the target is the worst run's level: all reach it
    assert all(r["noise_scale_tokens"] is not None for r in rows)
    table = T.batch_size_table(rep)
    assert "| 4 | 128 | 6 |" in table and "Target" in table
    # resumable: a rerun reads every stored result instead of training
    again = T.batch_size_sweep([4, 8], 4 * 32 * 6, tmp_path / "bs", data=_train_data, log=logs.append,
                               **_TRAIN_TINY_SWEEP)
    assert again["rows"] == rows and sum("done earlier" in m for m in logs) == 2


def test_train_ablate_quick_resumable(tmp_path, _train_data):
    logs = []
    rows = T.ablate(tmp_path / "ab", 10, [1, 2], quick=True, data=_train_data, log=logs.append, **_TRAIN_TINY_SWEEP)
    names = [r["name"] for r in rows]
    assert names[0] == "baseline" and {"layernorm", "adamw", "wsd"} <= set(names)
    assert all(len(r["bpb"]) == 2 and r["bpb"][0] != r["bpb"][1] for r in rows)  # seeds differ
    # each variant really trained with its switch: the stored result records it
    res = json.loads((tmp_path / "ab" / "results" / "layernorm_seed1.json").read_text())
    assert res["model_kw"] == {"norm": "layernorm"} and res["steps"] == 10
    assert json.loads((tmp_path / "ab" / "results" / "adamw_seed2.json").read_text())["optimizer"] == "adamw"
    # an interrupted sweep: one result lost -> only that one reruns
    (tmp_path / "ab" / "results" / "gelu_seed2.json").unlink()
    logs.clear()
    again = T.ablate(tmp_path / "ab", 10, [1, 2], quick=True, data=_train_data, log=logs.append, **_TRAIN_TINY_SWEEP)
    assert sum("done earlier" in m for m in logs) == 2 * len(rows) - 1
    assert [r["bpb"] for r in again] == [r["bpb"] for r in rows]  # deterministic rerun of the lost one too
    table = T.ablation_table(again, 10, 8 * 32, 1024)
    assert table.count("\n| ") == len(rows) and "| baseline |" in table and "1,024 validation" in table
    T.plot_ablation(again, tmp_path / "ab.png")
    assert (tmp_path / "ab.png").read_bytes()[:4] == b"\x89PNG"
    names = [v[0] for v in T.ablation_variants()]
    assert {"post-norm", "moe4", "mqa", "sliding32", "tied", "qk-norm", "soap"} <= set(names)


def test_train_distillation_loss_vs_direct():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (2, 3), generator=g)
    temp, alpha = 3.0, 0.3
    # direct: probabilities by exp / sum, KL = sum p (log p - log q), CE = -log softmax(s)[y]
    p = np.exp(t.numpy() / temp)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(s.numpy() / temp)
    q /= q.sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    sm = np.exp(s.numpy())
    sm /= sm.sum(-1, keepdims=True)
    ce = -np.log(np.take_along_axis(sm, y.numpy()[..., None], -1)).mean()
    want = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = float(T.distillation_loss(s, t, y, temp, alpha))
    assert abs(got - want) < 1e-5 * abs(want)  # (the loss works in float32)
    assert abs(float(T.distillation_loss(s, s, y, temp, 1.0))) < 1e-6  # KL(p || p) = 0
    assert abs(float(T.distillation_loss(s, t, y, temp, 0.0)) - ce) < 1e-5  # alpha 0: plain cross-entropy


def test_train_distill_from_teacher_and_vocab_check(tmp_path, _train_data):
    tcfg = _train_cfg(tmp_path / "t", max_steps=6)
    T.train(tcfg, _train_data, log=_train_quiet)
    teacher_ckpt = Path(tcfg.out_dir) / "ckpt.pt"
    logs = []
    scfg = _train_cfg(tmp_path / "s", d_model=16, num_layers=1, num_heads=1, max_steps=4,
                      distill_from=str(teacher_ckpt), distill_temperature=2.0, distill_alpha=0.7)
    s = T.train(scfg, _train_data, log=logs.append)
    d = s["distill"]
    assert d["teacher_params"] > d["student_params"] and math.isfinite(d["teacher_bpb"])
    assert d["student_bpb"] == s["val"]["bpb"]
    assert any(l.startswith("distilled student: val bpb") and "fewer" in l for l in logs)
    # the teacher really drives the update: the same student without it follows another loss curve
    plain = T.train(_train_cfg(tmp_path / "s3", d_model=16, num_layers=1, num_heads=1, max_steps=4), _train_data,
                    log=_train_quiet)
    assert plain["losses"][0] == s["losses"][0] and plain["losses"][1:] != s["losses"][1:]
    # a teacher with another tokenizer: a clear error naming the fields, before any training
    ck = torch.load(teacher_ckpt, weights_only=True)
    ck["tokenizer_fingerprint"] = "0" * 16
    ck["model_config"]["vocab_size"] = 999
    bad = tmp_path / "other_vocab.pt"
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="tokenizer_fingerprint 0000000000000000 vs.*vocab_size 999 vs this run's 300"):
        T.train(_train_cfg(tmp_path / "s2", distill_from=str(bad)), _train_data, log=_train_quiet)
    with pytest.raises(ValueError, match="--distill-from .*no such checkpoint"):
        _train_cfg(tmp_path, distill_from=str(tmp_path / "missing.pt"))


def test_train_magnitude_pruning_masks_and_exact_sparsity(tmp_path, _train_data):
    pr = T.MagnitudePruner(torch.nn.Linear(2, 2), 0.8, start=0.2, end=0.7)
    assert pr.params == []  # only the blocks' matrices ("layers.*")
    cfg = _train_cfg(tmp_path)
    model = T.build_model(cfg, 300)
    pr = T.MagnitudePruner(model, 0.6, start=0.2, end=0.7)
    assert pr.target(0.1) == 0 and abs(pr.target(0.45) - 0.6 * 0.875) < 1e-12 and pr.target(0.9) == 0.6
    w0 = [p.detach().clone() for p in pr.params]
    pr.prune(0.6)
    for p, w in zip(pr.params, w0):
        k = round(0.6 * p.numel())
        assert int((p == 0).sum()) == k  # exact
        kept = w.abs()[p != 0]
        assert kept.min() >= w.abs()[p == 0].max()  # the smallest magnitudes went
    # masks hold through optimizer steps (AdamW would move every weight)
    opt = T.build_optimizer(model, cfg)
    for _ in range(3):
        x = torch.randint(0, 300, (2, 8))
        T.cross_entropy(model(x), x).backward()
        opt.step()
        opt.zero_grad()
        pr.after_step(1, 0.5)  # not an update step: masks re-applied only
    assert all(int((p == 0).sum()) == round(0.6 * p.numel()) for p in pr.params)
    # through train(): the final sparsity is exact and in the checkpoint
    logs = []
    s = T.train(_train_cfg(tmp_path / "p", prune_sparsity=0.5, prune_start=0.0, prune_end=0.5, max_steps=8),
                _train_data, log=logs.append)
    ck = torch.load(Path(tmp_path / "p" / "run" / "ckpt.pt"), weights_only=True)["model"]
    mats = [v for k, v in ck.items() if k.startswith("layers.") and v.ndim == 2]
    zeros = sum(int((v == 0).sum()) for v in mats)
    assert zeros == sum(round(0.5 * v.numel()) for v in mats)
    assert abs(s["prune"]["sparsity"] - zeros / sum(v.numel() for v in mats)) < 1e-12
    assert s["prune"]["dense_bpb"] is not None and any(l.startswith("pruned: 50.0%") for l in logs)


def test_train_loss_and_backward_and_eval_model_hooks_reproduce_the_plain_loop(tmp_path, _train_data):
    # a loss_and_backward hook doing the ordinary forward / loss / scaled backward must give the plain loop's run
    # exactly (grad accumulation included); eval_model is asked for the module before every evaluation;
    # tokens_per_step replaces batch * T * grad_accum * ranks in the counts
    kw = dict(max_steps=4, grad_accum=2, batch_size=4, eval_interval=2)
    plain = T.train(_train_cfg(tmp_path / "a", **kw), _train_data, log=_train_quiet)
    asked = []

    def loss_and_backward(run_model, x, y, scale):
        cfg = _train_cfg(tmp_path / "b", **kw)
        loss = (T.cross_entropy_fast if cfg.loss_impl == "fast" else T.cross_entropy)(run_model(x), y)
        (loss * scale).backward()
        return loss

    def eval_model(model, run_model):
        asked.append(model.training)
        return model

    hooked = T.train(_train_cfg(tmp_path / "b", **kw), _train_data, log=_train_quiet,
                     hooks=T.TrainHooks(loss_and_backward=loss_and_backward, eval_model=eval_model,
                                        tokens_per_step=123))
    assert hooked["losses"] == plain["losses"] and hooked["val"]["loss"] == plain["val"]["loss"]
    assert len(asked) == 3 and hooked["tokens"] == 4 * 123 and plain["tokens"] == 4 * 4 * 32 * 2



# ---------------------------------------------------------------------------------------------------
# bugs the tests above would miss: the MoE objective, the noise scale's units, run folders, AdamW resume,
# the synthetic validation split
# ---------------------------------------------------------------------------------------------------
def test_train_step_adds_the_moe_load_balancing_loss(tmp_path, _train_data):
    # the step's gradient must be the gradient of cross-entropy + aux_loss, computed by hand on the same batch
    # (the balancing term only reaches the routers: a step that subtracted it would push them toward collapse)
    cfg = _train_cfg(tmp_path, max_steps=1, grad_clip=0.0, model_kw={"num_experts": 4, "moe_aux_weight": 1.0})
    x = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    grads = []

    def capture(run_model):
        grads.append({n: p.grad.detach().clone() for n, p in run_model.named_parameters() if p.grad is not None})

    T.train(cfg, _train_data, log=_train_quiet,
            hooks=T.TrainHooks(sync_gradients=capture, get_batch=lambda step, micro: (x, y)))
    model = T.build_model(cfg, 300)
    loss = T.cross_entropy_fast(model(x), y)
    assert float(model.aux_loss.detach()) > 0.5  # E * sum f_i P_i: 1.0 at balanced routing, not a vanishing term
    (loss + model.aux_loss).backward()
    routers = [n for n in grads[0] if "router" in n]
    assert routers
    for n, p in model.named_parameters():
        assert torch.allclose(grads[0][n], p.grad, rtol=1e-4, atol=1e-6), n


def test_train_noise_scale_probe_counts_batch_sizes_in_tokens():
    # micro-batch gradients set by hand: g1 = (3, 0), g2 = (1, 2) (backward adds g / grad_accum into .grad);
    # B = 4 sequences of T = 8 tokens: |G_small|^2 = mean(9, 5) = 7 at 32 tokens, |G_big|^2 = |(2, 1)|^2 = 5 at
    # 64 tokens, so |G|^2 = (64 * 5 - 32 * 7) / 32 = 3, tr(Sigma) = (7 - 5) / (1/32 - 1/64) = 128, B_simple = 128/3
    # tokens (batch sizes counted in sequences would give 16/3, T times too small)
    lin = torch.nn.Linear(2, 1, bias=False)
    cfg = T.TrainConfig(batch_size=4, context_length=8, grad_accum=2, noise_scale=True)
    run = T.Run(cfg=cfg, hooks=T.TrainHooks(), model=lin, tokens_per_step=64)
    probe = T.NoiseScaleProbe()
    g1, g2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    lin.weight.grad = g1 / 2
    probe.after_backward(run)
    lin.weight.grad = (g1 + g2) / 2
    probe.after_backward(run)
    probe.before_update(run)
    assert probe.metrics(run)["noise_scale_tokens"] == pytest.approx(128 / 3)
    assert "B_noise 43 tok (batch 64)" in probe.progress(run)


@pytest.mark.parametrize("leftover", ["ckpt.pt", "metrics.jsonl", "loss_curve.png", "tokenizer/vocab.json"])
def test_train_refuses_a_folder_holding_any_part_of_an_earlier_run(tmp_path, _train_data, leftover):
    cfg = _train_cfg(tmp_path, max_steps=2)
    path = Path(cfg.out_dir) / leftover
    path.parent.mkdir(parents=True)
    path.write_bytes(b"from an earlier run")
    with pytest.raises(ValueError, match=f"already holds a run \\({leftover.split('/')[0]}\\).*--overwrite"):
        T.train(cfg, _train_data, log=_train_quiet)
    assert path.read_bytes() == b"from an earlier run"
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == [leftover.split("/")[0]]


@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_train_adamw_alone_resumes_exactly_in_weights(tmp_path, _train_data, impl):
    # --optimizer adamw: a killed run resumed from its step-4 checkpoint must continue AdamW's step counters
    # (the bias corrections 1 - beta^t), not restart them: the final weights equal the uninterrupted run's
    kw = dict(optimizer="adamw", adamw_impl=impl, lr=1e-2, max_steps=7, warmup_iters=2)
    full_cfg = _train_cfg(tmp_path / "full", **kw)
    full = T.train(full_cfg, _train_data, log=_train_quiet)

    class Killed(Exception):
        pass

    def kill_at_5(step, model, metrics):
        if step == 5:
            raise Killed

    cfg = _train_cfg(tmp_path / "killed", ckpt_interval=2, **kw)
    with pytest.raises(Killed):
        T.train(cfg, _train_data, log=_train_quiet, hooks=T.TrainHooks(on_step=kill_at_5))
    steps = [int(s["step"]) for s in T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["optimizer"]["state"].values()]
    assert steps and set(steps) == {4}
    cfg.resume = True
    resumed = T.train(cfg, _train_data, log=_train_quiet)
    assert resumed["losses"] == full["losses"][4:]
    a = T.read_checkpoint(Path(full_cfg.out_dir) / "ckpt.pt")["model"]
    b = T.read_checkpoint(Path(cfg.out_dir) / "ckpt.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_synthetic_validation_shares_no_story_with_training(_train_data):
    # validation comes from its own stream of stories, not from the training stream's first stories
    tdir = Path(_train_data.cache_dir).parent
    train = set((tdir / "train.txt").read_text().split(T.EOT))
    val = [s for s in (tdir / "val.txt").read_text().split(T.EOT) if s]
    assert len(val) > 20 and len(train) > 7 * len(val)
    assert not train & set(val)
# ===== Stage 4: kernels.py -- fused RMSNorm and FlashAttention-2 (PyTorch and Triton), model integration, CLI =====
#
# Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1). The knob is read when a
# @triton.jit function is decorated, so it must be set before kernels.py is imported; kernels.py sets it itself
# at import when no CUDA device exists (that works even if torch or an earlier section already imported triton,
# see test_kernels_interpreter_env_works_after_triton_import), and we set it here too before importing kernels.
#
# Tolerances (max |got - ref| <= tol * max(1, max |ref|), reference = float64 math on the same inputs):
#   fp32 : 2e-5   (observed ~1e-6: fp32 accumulation over <= 70 terms)
#   bf16 : 4e-2   (observed <= ~1.2e-2 of max|ref|: bf16 has 8 mantissa bits, O/dQ/dK/dV are rounded to bf16
#                  and P / dS are rounded to bf16 before the tile matmuls, exactly as on a GPU's tensor cores)
#   L (log-sum-exp) is always fp32: 2e-5 for every input dtype.
# bf16 under the interpreter: Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16 bits (a bug),
# so kernels.py upcasts dot operands to fp32 there (exact for bf16 values); all other bf16 rounding (loads,
# stores, P.to(bf16)) is emulated faithfully, so these bf16 checks are meaningful, not fp32 in disguise:
# test_kernels_flash_triton_bf16_rounding_is_real checks the bf16 error is real but bounded.
# ---------------------------------------------------------------------------------------------------------------


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_KERNELS_TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
_KERNELS_HAS_TRITON_RUNTIME = KN.HAVE_TRITON and (torch.cuda.is_available() or KN.INTERPRET)
_kernels_needs_triton = pytest.mark.skipif(not _KERNELS_HAS_TRITON_RUNTIME,
                                        reason="triton not installed (or no CUDA and no interpreter)")
_KERNELS_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_assert_close(name, got, ref, tol):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"
    return err


def _kernels_attention_case(fn, B, T, d, causal, dtype, seed=0, Tk=None):
    """Run fn(Q, K, V) -> (O, L) with autograd; compare O, L, dQ, dK, dV to float64 naive attention."""
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    q = torch.randn(B, T, d, generator=g).to(_KERNELS_DEV, dtype).requires_grad_()
    k = torch.randn(B, Tk, d, generator=g).to(_KERNELS_DEV, dtype).requires_grad_()
    v = torch.randn(B, Tk, d, generator=g).to(_KERNELS_DEV, dtype).requires_grad_()
    o, L = fn(q, k, v)
    do = torch.randn(B, T, d, generator=g).to(_KERNELS_DEV, dtype)
    o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, L_ref = KN.attention_reference(q64, k64, v64, causal)
    o_ref.backward(do.double())
    tol = _KERNELS_TOL[dtype]
    errs = {"O": _kernels_assert_close("O", o, o_ref, tol),
            "L": _kernels_assert_close("L", L, L_ref, 2e-5)}
    for name, a, b in (("dQ", q.grad, q64.grad), ("dK", k.grad, k64.grad), ("dV", v.grad, v64.grad)):
        errs[name] = _kernels_assert_close(name, a, b, tol)
    assert o.dtype == dtype and q.grad.dtype == dtype and L.dtype == torch.float32
    return errs


def _kernels_triton_fn(causal, tiles=None):
    def fn(q, k, v):
        o = KN.FlashAttention2Triton.apply(q, k, v, causal, tiles)
        return o, KN.saved_logsumexp(o)
    return fn


def _kernels_torch_fn(causal, q_tile, k_tile):
    def fn(q, k, v):
        o = KN.FlashAttention2PyTorch.apply(q, k, v, causal, q_tile, k_tile)
        return o, KN.saved_logsumexp(o)
    return fn


# ----------------------------------------------------------------------------------------------- RMSNorm

def test_kernels_rmsnorm_hand_worked():
    # x = [3, 4]: mean(x^2) = 12.5, rms = 3.5355339; y = x / rms * [1, 2] = [0.8485281, 2.2627417]
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    want = torch.tensor([[3 / 12.5 ** 0.5, 2 * 4 / 12.5 ** 0.5]])
    assert torch.allclose(KN.rmsnorm_torch(x, w, 0.0), want, atol=1e-6)
    assert torch.allclose(KN.RMSNormPyTorch.apply(x, w, 0.0), want, atol=1e-6)
    if _KERNELS_HAS_TRITON_RUNTIME:
        assert torch.allclose(KN.rmsnorm_triton(x.to(_KERNELS_DEV), w.to(_KERNELS_DEV), 0.0).cpu(), want, atol=1e-6)


def test_kernels_rmsnorm_torch_matches_model_rmsnorm():
    torch.manual_seed(0)
    norm = M.RMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(24))
    x = torch.randn(2, 5, 24)
    assert torch.allclose(KN.rmsnorm_torch(x, norm.weight, norm.eps), norm(x), atol=1e-6)


def test_kernels_rmsnorm_pytorch_backward_gradcheck():
    # The hand-derived backward (dx = r (g dy - x_hat mean(g dy x_hat)), dg = sum dy x_hat) vs finite differences.
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: KN.RMSNormPyTorch.apply(a, b, 1e-5), (x, w))


@_kernels_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 96), (7, 1000), (1, 16)])
def test_kernels_rmsnorm_triton_matches_float64(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape, generator=g)).to(_KERNELS_DEV, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(_KERNELS_DEV).requires_grad_()
    y = KN.rmsnorm_triton(x, w, 1e-5)
    dy = torch.randn(*shape, generator=g).to(_KERNELS_DEV, dtype)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = KN.rmsnorm_torch(x64, w64, 1e-5)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    tol = _KERNELS_TOL[dtype]
    _kernels_assert_close("y", y, y_ref, tol)
    _kernels_assert_close("dx", x.grad, x64.grad, tol)
    _kernels_assert_close("dweight", w.grad, w64.grad, 2e-5)      # accumulated in fp32 for every input dtype
    # Same math as the eager version at the same dtype: at most one rounding step apart.
    y_eager = KN.rmsnorm_torch(x.detach(), w.detach(), 1e-5)
    ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert ((y.detach().double() - y_eager.double()).abs() <= ulp * y_eager.double().abs() + 1e-6).all()


@_kernels_needs_triton
def test_kernels_rmsnorm_triton_noncontiguous_input_and_bf16_gain():
    torch.manual_seed(2)
    base = torch.randn(6, 40, device=_KERNELS_DEV)
    x_nc = base.t()[:, :6]                                       # (40, 6) view with strides (1, 40)
    assert not x_nc.is_contiguous()
    w = torch.randn(6, device=_KERNELS_DEV)
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


# ----------------------------------------------------------------------------------------------- attention

def test_kernels_flash_torch_gradcheck_float64():
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
def test_kernels_flash_torch_matches_float64(dtype, B, T, d, causal, q_tile, k_tile):
    _kernels_attention_case(_kernels_torch_fn(causal, q_tile, k_tile), B, T, d, causal, dtype)


@_kernels_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,causal", [
    (1, 37, 32, True),      # ragged: 37 = 32 + 5 queries, 2 + 5 key tiles, diagonal tiles masked
    (2, 20, 16, False),     # non-causal, ragged
    (1, 70, 64, True),      # several full tiles below the diagonal (the unmasked loop) + ragged end
    (1, 1, 16, True),       # a single token
    (2, 32, 16, True),      # exact tile multiple
])
def test_kernels_flash_triton_matches_float64(dtype, B, T, d, causal):
    _kernels_attention_case(_kernels_triton_fn(causal), B, T, d, causal, dtype)


@_kernels_needs_triton
def test_kernels_flash_triton_float16_and_float32_upstream_grad():
    # fp16 inputs; and an fp32 upstream gradient on bf16 activations (autocast-style) is cast, not mis-multiplied.
    _kernels_attention_case(_kernels_triton_fn(True), 1, 37, 32, True, torch.float16, seed=11)
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 21, 16, generator=g).to(_KERNELS_DEV, torch.bfloat16) for _ in range(3))
    o, L = KN.flash_attention_triton_forward(q, k, v, True)
    do32 = torch.randn(1, 21, 16, generator=g).to(_KERNELS_DEV)       # float32 while q, k, v, o are bf16
    dq, dk, dv = KN.flash_attention_triton_backward(q, k, v, o, L, do32, True)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    KN.attention_reference(q64, k64, v64, True)[0].backward(do32.double())
    for name, a, b in (("dQ", dq, q64.grad), ("dK", dk, k64.grad), ("dV", dv, v64.grad)):
        assert a.dtype == torch.bfloat16
        _kernels_assert_close(name, a, b, _KERNELS_TOL[torch.bfloat16])


@_kernels_needs_triton
@pytest.mark.parametrize("d", [80, 128])
def test_kernels_flash_triton_head_dims(d):
    # 80: not a power of two (padded to 128 on chip, masked); 128: the largest supported.
    _kernels_attention_case(_kernels_triton_fn(True), 1, 21, d, True, torch.float32, seed=3)


@_kernels_needs_triton
@pytest.mark.parametrize("tiles", [(16, 32), (64, 16)])
def test_kernels_flash_triton_other_tile_shapes(tiles):
    # BLOCK_Q < BLOCK_K and BLOCK_Q > BLOCK_K exercise the causal start/stop arithmetic in all three kernels.
    _kernels_attention_case(_kernels_triton_fn(True, tiles), 1, 50, 16, True, torch.float32, seed=4)


@_kernels_needs_triton
def test_kernels_flash_triton_autotuned_launch_path(monkeypatch):
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
    _kernels_attention_case(_kernels_triton_fn(True), 2, 45, 32, True, torch.float32, seed=13)


@_kernels_needs_triton
def test_kernels_flash_triton_rectangular_noncausal():
    _kernels_attention_case(_kernels_triton_fn(False), 2, 13, 32, False, torch.float32, seed=5, Tk=40)


@_kernels_needs_triton
def test_kernels_flash_triton_causal_ignores_future():
    # Invariant: changing keys/values at positions > i cannot change output i (the diagonal mask is right).
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 40, 16, device=_KERNELS_DEV) for _ in range(3))
    o1 = KN.FlashAttention2Triton.apply(q, k, v, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 25:] += 5.0
    v2[:, 25:] -= 3.0
    o2 = KN.FlashAttention2Triton.apply(q, k2, v2, True)
    assert torch.equal(o1[:, :25], o2[:, :25])
    assert not torch.allclose(o1[:, 25:], o2[:, 25:])
    # Query 0 sees only key 0: its output is exactly v[0].
    assert torch.allclose(o1[0, 0], v[0, 0], atol=1e-6)


@_kernels_needs_triton
def test_kernels_flash_triton_bf16_rounding_is_real():
    # The bf16 path must really round (else the bf16 tests above would be fp32 in disguise) but stay close.
    errs = _kernels_attention_case(_kernels_triton_fn(True), 1, 37, 32, True, torch.bfloat16, seed=7)
    assert errs["O"] > 1e-4


@_kernels_needs_triton
def test_kernels_flash_triton_noncontiguous_inputs():
    torch.manual_seed(8)
    q = torch.randn(20, 2, 16, device=_KERNELS_DEV).transpose(0, 1)   # (2, 20, 16), non-contiguous
    k, v = (torch.randn(2, 20, 16, device=_KERNELS_DEV) for _ in range(2))
    assert not q.is_contiguous()
    o = KN.FlashAttention2Triton.apply(q, k, v, True)
    o_ref = KN.FlashAttention2Triton.apply(q.contiguous(), k, v, True)
    assert torch.equal(o, o_ref)


# ----------------------------------------------------------------------------------------------- integration

def _kernels_tiny_model(**switches):
    torch.manual_seed(0)
    cfg = tiny_config(**{**dict(vocab_size=61, context_length=32, d_model=64, num_layers=2, d_ff=None), **switches})
    return M.TransformerLM.from_config(cfg)


def _kernels_logits_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["flash_torch", pytest.param("flash_triton", marks=_kernels_needs_triton)])
def test_kernels_model_backend_matches_sdpa(backend):
    model = _kernels_tiny_model().to(_KERNELS_DEV)
    tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(0)).to(_KERNELS_DEV)
    M.set_attention_backend(model, "sdpa")
    ref_logits, ref_grads = _kernels_logits_and_grads(model, tokens)
    M.set_attention_backend(model, backend)
    before = dict(KN._FALLBACK_COUNTS)
    logits, grads = _kernels_logits_and_grads(model, tokens)
    assert KN._FALLBACK_COUNTS == before, "the kernel path must be taken, not the sdpa fallback"
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3), name


@_kernels_needs_triton
def test_kernels_use_kernels_swaps_both_and_keeps_state_dict():
    model = _kernels_tiny_model().to(_KERNELS_DEV)
    tokens = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1)).to(_KERNELS_DEV)
    keys_before = list(model.state_dict().keys())
    ref_logits, ref_grads = _kernels_logits_and_grads(model, tokens)
    calls = {"n": 0}
    orig = KN.RMSNormTriton.apply

    def counting_apply(*a):
        calls["n"] += 1
        return orig(*a)

    KN.use_kernels(model)
    KN.RMSNormTriton.apply = counting_apply
    try:
        logits, grads = _kernels_logits_and_grads(model, tokens)
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


def _kernels_masked_attention_reference(q, k, v, window=None):
    """Independent float64 reference for model.py's backend contract: query i of Tq is absolute position
    p = Tk - Tq + i; it sees keys j <= p (causal) and, with a window W, only j > p - W."""
    q, k, v = q.double(), k.double(), v.double()                  # (B, H, Tq, dh), (B, H, Tk, dh)
    Tq, Tk = q.shape[-2], k.shape[-2]
    pos = torch.arange(Tk - Tq, Tk)[:, None]                      # (Tq, 1) absolute query positions
    j = torch.arange(Tk)[None, :]                                 # (1, Tk)
    visible = j <= pos
    if window is not None:
        visible &= j > pos - window
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_kernels_backend_falls_back_for_window_and_decoding():
    # Sliding window and causal Tq != Tk (KV-cache decoding) are not covered by the kernels: documented fallback
    # to the sdpa backend, checked against an independent masked-softmax reference (not the fallback itself).
    torch.manual_seed(9)
    q_full = torch.randn(1, 2, 12, 16)
    k, v = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    ref = lambda q, window: _kernels_masked_attention_reference(q, k, v, window).float()
    for fn in (KN.flash_torch_attention, KN.flash_triton_attention):
        before = sum(KN._FALLBACK_COUNTS.values())
        out_w = fn(q_full, k, v, causal=True, window=4)
        out_dec = fn(q_full[:, :, -3:], k, v, causal=True, window=None)
        assert sum(KN._FALLBACK_COUNTS.values()) == before + 2
        assert torch.allclose(out_w, ref(q_full, 4), atol=1e-5)
        assert torch.allclose(out_dec, ref(q_full[:, :, -3:], None), atol=1e-5)
        # the window really restricts: it differs from plain causal attention
        assert not torch.allclose(out_w, ref(q_full, None), atol=1e-3)
    # A window at least as long as the keys is plain causal attention: the kernel path, no fallback.
    before = sum(KN._FALLBACK_COUNTS.values())
    out_long = KN.flash_torch_attention(q_full, k, v, causal=True, window=12)
    assert sum(KN._FALLBACK_COUNTS.values()) == before
    assert torch.allclose(out_long, ref(q_full, None), atol=1e-5)
    # The reference itself against attention_reference: decoding the last 3 queries == last 3 rows of causal.
    full = KN.attention_reference(q_full[0].double(), k[0].double(), v[0].double(), True)[0]
    assert torch.allclose(ref(q_full[:, :, -3:], None)[0].double(), full[:, -3:], atol=1e-6)


# ----------------------------------------------------------------------------------------------- CLI, env

def test_kernels_attention_flops_known_answer():
    # Hand count for batch 3, N = 5, d = 7, non-causal: a (m x k) @ (k x n) matmul is m*n*k multiply-adds =
    # 2*m*n*k FLOPs. Forward = QK^T (5x7 @ 7x5: 350) + PV (5x5 @ 5x7: 350) = 700 per sequence, 2100 for 3.
    # Backward = 5 such matmuls (S recomputed, dV, dP, dQ, dK) = 1750 per sequence, 5250 for 3.
    assert KN.attention_flops(3, 5, 7, False, "fwd") == 2100
    assert KN.attention_flops(3, 5, 7, False, "bwd") == 5250
    assert KN.attention_flops(3, 5, 7, False, "fwd+bwd") == 7350
    # causal: the FA convention counts half of every matmul (the masked upper triangle is skipped)
    assert KN.attention_flops(3, 5, 7, True, "fwd") == 1050


@_kernels_needs_triton
def test_kernels_check_command_runs():
    assert KN.main(["check"]) == 0


def test_kernels_interpreter_env_works_after_triton_import():
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
    root = os.path.dirname(os.path.abspath(KN.__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
def test_kernels_gpu_flash_matches_sdpa_bf16():
    torch.manual_seed(10)
    q, k, v = (torch.randn(4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = KN.FlashAttention2Triton.apply(q, k, v, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (o.float() - ref).abs().max().item() < 2e-2


def test_kernels_gpu_kernels_compile_for_sm90_without_gpu(tmp_path):
    # The interpreter does not run Triton's GPU compiler; compiling for sm_90 (H100) here catches type / shape /
    # lowering errors in the real GPU path. Fresh cache dir so the compile really happens.
    import importlib.util
    if not KN.HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    ptxas = os.path.join(os.path.dirname(KN.triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton wheel ships no ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.abspath(KN.__file__))
    r = subprocess.run([sys.executable, "kernels.py", "compile", "--arch", "90",
                              "--only", "attn fwd d=64 bf16", "--only", "attn bwd dK/dV d=64 bf16",
                              "--only", "attn bwd dQ d=64 bf16", "--only", "rmsnorm bwd hidden=4096 bf16"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL COMPILED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("  ok   ") == 4


# ----------------------------------------------------------------------------------------------------------------
# int8 weight-only quantization (Part 4 of kernels.py): quantize_int8 / int8_matmul_torch against hand-worked
# answers and float64 math, the Triton kernel (interpreter on CPU) against the readable version, QuantizedLinear /
# quantize_model / the quantized file format, the refusal to train, and `python kernels.py quantize`.
# ----------------------------------------------------------------------------------------------------------------

# Triton vs the float64 math, max |err| / max(1, max |ref|): fp32 sums in another order; bf16/fp16 round x and y
_KERNELS_INT8_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _kernels_int8_reference(x, q, scale):
    """float64, written out elementwise: y[..., o] = scale[o] * sum_i x[..., i] * q[o, i]."""
    return (x.double()[..., None, :] * q.double()).sum(-1) * scale.double()


def test_kernels_int8_quantize_hand_worked():
    w = torch.tensor([[0.5, -1.27, 0.0, 1.27],       # absmax 1.27 -> s = 0.01: q = 50, -127, 0, 127
                      [0.0, 0.0, 0.0, 0.0],          # all zero -> scale 1 (no 0/0), q all 0
                      [3.0, -1.0, 0.2, 0.0]])        # s = 3/127: -1/s = -42.33 -> -42, 0.2/s = 8.47 -> 8
    q, s = KN.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3,)
    assert q.tolist() == [[50, -127, 0, 127], [0, 0, 0, 0], [127, -42, 8, 0]]
    assert torch.allclose(s, torch.tensor([0.01, 1.0, 3 / 127]))
    assert torch.equal(KN.dequantize_int8(q, s)[1], torch.zeros(4))


def test_kernels_int8_quantize_invariants():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 70, generator=g) * torch.rand(40, 1, generator=g) * 5     # rows of different scales
    q, s = KN.quantize_int8(w)
    err = (KN.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()               # at most half a step per weight
    assert (q.abs().amax(1) == 127).all() and int(q.min()) >= -127  # each row's absmax is exact; -128 unused
    q2, s2 = KN.quantize_int8(-4 * w)                               # sign and power-of-2 scaling: same grid
    assert torch.equal(q2, -q) and torch.allclose(s2, 4 * s)


def test_kernels_int8_matmul_torch_matches_float64():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(37, 53, generator=g), torch.randn(3, 5, 53, generator=g)
    q, s = KN.quantize_int8(w)
    ref = _kernels_int8_reference(x, q, s)
    _kernels_assert_close("fp32", KN.int8_matmul_torch(x, q, s), ref, 2e-5)
    _kernels_assert_close("fp64", KN.int8_matmul_torch(x.double(), q, s), ref, 1e-12)
    # and the quantization error against the float matmul obeys its hand bound |sum_i x_i e_oi| <= sum_i |x_i| s_o/2
    gap = (KN.int8_matmul_torch(x.double(), q, s) - x.double() @ w.double().t()).abs()
    assert (gap <= x.double().abs().sum(-1, keepdim=True) * s.double() / 2 + 1e-9).all()


@_kernels_needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,n_out,n_in", [((1,), 37, 53), ((2, 3), 70, 33), ((33,), 65, 100)],
                         ids=["decode-1row", "batched-3d", "ragged-tiles"])
def test_kernels_int8_matmul_triton_matches_readable(dtype, lead, n_out, n_in):
    # sizes not divisible by the interpreter's tiles (16 rows, 32 columns, 32 K): ragged edges on every side
    g = torch.Generator().manual_seed(2)
    q, s = KN.quantize_int8(torch.randn(n_out, n_in, generator=g))
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    y = KN.int8_matmul_triton(x.to(_KERNELS_DEV), q.to(_KERNELS_DEV), s.to(_KERNELS_DEV))
    readable = KN.int8_matmul_torch(x, q, s)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    ref = _kernels_int8_reference(x, q, s)
    _kernels_assert_close("triton vs float64", y, ref, _KERNELS_INT8_TOL[dtype])
    _kernels_assert_close("readable vs float64", readable, ref, _KERNELS_INT8_TOL[dtype])
    _kernels_assert_close("triton vs readable", y, readable, 2 * _KERNELS_INT8_TOL[dtype])


@_kernels_needs_triton
def test_kernels_int8_matmul_triton_noncontiguous():
    x, q, s = _kernels_int8_xqs()                                  # x (7, 24), stride (1, 7): copied first
    _kernels_assert_close("non-contiguous", KN.int8_matmul_triton(x, q, s), _kernels_int8_reference(x, q, s), 2e-5)


def test_kernels_quantize_model_replaces_linears_and_stays_close():
    model = _kernels_tiny_model()
    tokens = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    KN.quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["layers.0.attn.q_proj"] == kinds["layers.1.ffn.w2"] == "QuantizedLinear"
    assert kinds["lm_head"] == "Linear" and kinds["token_embeddings"] == "Embedding"     # the default keeps them
    assert not any(isinstance(m, M.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert not model.training and model.quantization["lm_head"] is False
    with torch.no_grad():
        got = model(tokens)
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.02 * ref.abs().max().item(), err          # rounding is real, and small
    with pytest.raises(ValueError, match="already quantized"):
        KN.quantize_model(model)
    moe = KN.quantize_model(_kernels_tiny_model(num_experts=2), lm_head=True)    # the router stays float
    assert isinstance(moe.layers[0].ffn.router, M.Linear) and isinstance(moe.lm_head, KN.QuantizedLinear)


@_kernels_needs_triton
def test_kernels_quantized_model_triton_path_matches_readable():
    model = KN.quantize_model(_kernels_tiny_model(), lm_head=True).to(_KERNELS_DEV)
    tokens = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(1)).to(_KERNELS_DEV)
    with torch.no_grad():
        readable = model(tokens)
        for m in model.modules():
            if isinstance(m, KN.QuantizedLinear):
                m.impl = "triton"
        fused = model(tokens)
    _kernels_assert_close("logits", fused, readable, 1e-4)


def test_kernels_quantize_tied_embeddings_share_one_int8_matrix(tmp_path):
    model = KN.quantize_model(_kernels_tiny_model(tie_embeddings=True), lm_head=True, embeddings=True)
    assert model.token_embeddings.weight_int8 is model.lm_head.weight_int8
    tokens = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(2))
    KN.save_quantized(model, tmp_path / "q.pt")
    loaded, _ = KN.load_quantized(tmp_path / "q.pt")
    assert loaded.token_embeddings.weight_int8.data_ptr() == loaded.lm_head.weight_int8.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert KN._model_bytes(model) < 0.4 * KN._model_bytes(_kernels_tiny_model(tie_embeddings=True))


def test_kernels_quantized_file_round_trip_and_refusals(tmp_path):
    model = KN.quantize_model(_kernels_tiny_model(bias=True), lm_head=True)
    path = tmp_path / "q.pt"
    KN.save_quantized(model, path, note="x")
    loaded, payload = KN.load_quantized(path)
    assert payload["note"] == "x" and payload["quantization"]["lm_head"] is True
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and sd["lm_head.weight_int8"].dtype == torch.int8
    assert all(torch.equal(sd[k], sd2[k]) for k in sd) and "layers.0.attn.q_proj.bias" in sd
    with pytest.raises(ValueError, match="scratchlm-int8-v1"):       # train.py / model.py refuse it by format
        M.read_checkpoint(path)
    T.save_checkpoint(_kernels_tiny_model(), None, 0, tmp_path / "float.pt")
    with pytest.raises(ValueError, match="float checkpoint"):
        KN.load_quantized(tmp_path / "float.pt")
    with pytest.raises(ValueError, match="not quantized"):
        KN.save_quantized(_kernels_tiny_model(), tmp_path / "no.pt")
    assert not (tmp_path / "no.pt").exists()


def test_kernels_quantized_model_refuses_training():
    model = KN.quantize_model(_kernels_tiny_model())
    with pytest.raises(RuntimeError, match="inference-only"):
        model.train()
    assert not any(m.training for m in model.modules())              # refused before anything flipped
    with pytest.raises(RuntimeError, match="requires_grad_"):
        model.layers[0].attn.q_proj.requires_grad_()
    # an optimizer over what is left (norms, embeddings) and a backward: refused by name, not a silent no-op
    opt = T.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randint(0, 61, (2, 8))).float().pow(2).mean()
    with pytest.raises(RuntimeError, match="backward through a QuantizedLinear"):
        loss.backward()
    opt.zero_grad()
    model.eval()                                                      # eval / inference still work
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 61, (1, 4)))).all()


@pytest.fixture(scope="module")
def _kernels_run(tmp_path_factory):
    """A tiny train.py run (checkpoint + cached data) for the quantize command."""
    tmp = tmp_path_factory.mktemp("kernels_quant")
    args = T.get_parser().parse_args([])
    cfg = T.config_from_args(args)
    for k, v in dict(data_dir=str(tmp / "data"), synthetic_bytes=60_000, synthetic_val_bytes=8_000, vocab_size=300,
                     bpe_train_bytes=None, context_length=32, d_model=32, num_layers=2, num_heads=2, batch_size=8,
                     max_steps=6, warmup_iters=2, eval_interval=1000, ckpt_interval=1000, log_interval=1000,
                     num_samples=0, plot=False, out_dir=str(tmp / "run"), final_eval_tokens=256, eval_tokens=256,
                     device="cpu").items():
        setattr(cfg, k, v)
    T.validate_config(cfg)
    T.train(cfg, log=lambda *a, **k: None)
    return tmp / "run" / "ckpt.pt"


def test_kernels_quantize_command(_kernels_run, capsys):
    ckpt = str(_kernels_run)
    out = _kernels_run.parent / "ckpt.int8.pt"
    argv = ["quantize", "--checkpoint", ckpt, "--eval-tokens", "512", "--decode-tokens", "4", "--repeats", "1"]
    assert KN.main(argv) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|  |")}
    bpb_f, bpb_q, delta = rows["val bpb"]
    assert 0 < float(bpb_f) < 10 and abs(float(bpb_q) - float(bpb_f)) < 0.05 and delta.startswith(("+", "-"))
    # bytes by hand: every non-vocab Linear weight goes from 4 bytes to 1, plus one fp32 scale per output row
    fm, _ = M.load_checkpoint_model(ckpt)
    lin = [m for n, m in fm.named_modules() if isinstance(m, M.Linear) and n != "lm_head"]
    n_w, n_rows = sum(m.weight.numel() for m in lin), sum(m.weight.shape[0] for m in lin)
    f_bytes, q_bytes = (int(c.replace(",", "")) for c in rows["model bytes (state dict)"][:2])
    assert q_bytes == f_bytes - 3 * n_w + 4 * n_rows
    model, payload = KN.load_quantized(out)
    assert payload["source_checkpoint"] == os.path.abspath(ckpt) and payload["tokenizer_fingerprint"]
    # an existing output is never replaced without --force: one-line usage error, file untouched
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        KN.main(argv)
    assert e.value.code == 2 and out.read_bytes() == before
    assert "--force" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- error paths
# Every bad argv or bad call of stage 4 and the message fragment it must give: usage errors are one line on stderr
# with exit status 2 and create nothing; bad calls raise ValueError naming the problem.

_KERNELS_USAGE_ERRORS = [
    ([], "cmd"),
    (["nope"], "nope"),
    (["bench", "nope"], "what"),
    (["bench", "--max-seconds", "-1"], "--max-seconds"),
    (["compile", "--arch", "5"], "--arch"),
    (["train", "--max-minutes", "0"], "--max-minutes"),
    (["train", "--lr", "fast"], "--lr"),
    (["quantize"], "--checkpoint"),
    (["quantize", "--checkpoint", "missing.pt"], "missing.pt"),
    (["quantize", "--checkpoint", "CKPT", "--eval-tokens", "-1"], "--eval-tokens"),
    (["quantize", "--checkpoint", "CKPT", "--decode-tokens", "0"], "--decode-tokens"),
    (["quantize", "--checkpoint", "CKPT", "--out", "CKPT", "--force"], "--out"),
    (["quantize", "--checkpoint", "CKPT", "--out", "nodir/q.pt"], "--out"),
    (["quantize", "--checkpoint", "CKPT", "--device", "tpu"], "tpu"),
]


@pytest.mark.parametrize("argv,option", _KERNELS_USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in
                                                                   _KERNELS_USAGE_ERRORS])
def test_kernels_usage_errors_are_one_line_with_status_2(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    T.save_checkpoint(_kernels_tiny_model(), None, 0, tmp_path / "c.pt")   # CKPT: a real float checkpoint
    argv = [a.replace("CKPT", "c.pt") for a in argv]
    with pytest.raises(SystemExit) as e:
        KN.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and option.replace("CKPT", "c.pt") in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]           # nothing written


def _kernels_int8_xqs():
    """x (7, 24) non-contiguous, and q, s quantized from a (20, 24) weight."""
    g = torch.Generator().manual_seed(3)
    q, s = KN.quantize_int8(torch.randn(20, 24, generator=g))
    return torch.randn(24, 7, generator=g).t(), q, s


def _kernels_int8_call(fn, edit):
    """fn(*edit(x, q, s)) on the inputs of _kernels_int8_xqs: one of them changed by `edit`."""
    return fn(*edit(*_kernels_int8_xqs()))


def _kernels_x(*shape, **kw):
    return torch.randn(*shape, device=_KERNELS_DEV, **kw)


def _kernels_ones(n, device=None):
    return torch.ones(n, device=device or _KERNELS_DEV)


_KERNELS_Q = torch.randn(1, 8, 16)
_KERNELS_FA = lambda *a: KN.FlashAttention2PyTorch.apply(*a)                    # noqa: E731
_KERNELS_FA_TRITON = lambda *a: KN.FlashAttention2Triton.apply(*a)              # noqa: E731
_KERNELS_BAD_CALLS = [   # (id, call, message fragment, needs a Triton runtime)
    ("rmsnorm weight shape", lambda: KN.rmsnorm_triton(_kernels_x(4, 8), _kernels_ones(7)), "weight shape", True),
    ("rmsnorm int dtype", lambda: KN.rmsnorm_triton(_kernels_x(4, 8).long(), _kernels_ones(8)), "dtype", True),
    ("rmsnorm hidden size", lambda: KN.rmsnorm_triton(_kernels_x(1, KN.RMSNORM_MAX_HIDDEN + 1),
                                                      _kernels_ones(KN.RMSNORM_MAX_HIDDEN + 1)), "hidden size", True),
    ("rmsnorm devices", lambda: KN.rmsnorm_triton(_kernels_x(4, 8), _kernels_ones(8, "meta")), "same device", True),
    ("flash 2-D input", lambda: _KERNELS_FA(_KERNELS_Q[0], _KERNELS_Q[0], _KERNELS_Q[0], False), "batch, seq, d",
     False),
    ("flash dtypes", lambda: _KERNELS_FA(_KERNELS_Q, _KERNELS_Q.double(), _KERNELS_Q, False), "dtypes differ", False),
    ("flash devices", lambda: _KERNELS_FA(_KERNELS_Q, _KERNELS_Q.to("meta"), _KERNELS_Q, False), "devices differ",
     False),
    ("flash K vs V", lambda: _KERNELS_FA(_KERNELS_Q, _KERNELS_Q, _KERNELS_Q[:, :5], False), "K and V shapes differ",
     False),
    ("flash causal Nq != Nk", lambda: _KERNELS_FA(_KERNELS_Q, torch.randn(1, 9, 16), torch.randn(1, 9, 16), True),
     "n_queries == n_keys", False),
    ("flash head dims", lambda: _KERNELS_FA(_KERNELS_Q, torch.randn(1, 8, 8), torch.randn(1, 8, 8), False),
     "share batch and head dim", False),
    ("flash triton d=8", lambda: _KERNELS_FA_TRITON(*[_kernels_x(1, 8, 8)] * 3, True), "head dim", True),
    ("flash triton d=256", lambda: _KERNELS_FA_TRITON(*[_kernels_x(1, 8, 256)] * 3, True), "head dim", True),
    ("flash triton fp64", lambda: _KERNELS_FA_TRITON(*[_kernels_x(1, 8, 16).double()] * 3, True), "dtype", True),
    ("flash triton tiles", lambda: _KERNELS_FA_TRITON(*[_kernels_x(1, 8, 16)] * 3, True, (24, 16)), "powers of two",
     True),
    ("use_kernels attention", lambda: KN.use_kernels(_kernels_tiny_model(), rmsnorm=False, attention="flash_cuda"),
     "attention must be", False),
    ("quantize_int8 NaN", lambda: KN.quantize_int8(torch.tensor([[1.0, float("nan")]])), "NaN or inf", False),
    ("quantize_int8 vector", lambda: KN.quantize_int8(torch.ones(3)), "float matrix", False),
    ("int8 q not int8", lambda: _kernels_int8_call(KN.int8_matmul_triton, lambda x, q, s: (x, q.float(), s)),
     "int8 matrix", True),
    ("int8 scale", lambda: _kernels_int8_call(KN.int8_matmul_triton, lambda x, q, s: (x, q, s[:-1])), "scale", True),
    ("int8 d_in", lambda: _kernels_int8_call(KN.int8_matmul_torch, lambda x, q, s: (torch.randn(3, 25), q, s)),
     "d_in = 24", False),
    ("int8 int32 x", lambda: _kernels_int8_call(KN.int8_matmul_triton,
                                                lambda x, q, s: (torch.ones(3, 24, dtype=torch.int32), q, s)),
     "dtype", True),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i, marks=[_kernels_needs_triton] if t else [])
                                          for i, c, m, t in _KERNELS_BAD_CALLS])
def test_kernels_bad_calls_raise_named_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernels_int8_matmul_compiles_for_sm90_without_gpu(tmp_path):
    # the interpreter skips Triton's GPU compiler: compile the int8 kernel's decode and prefill tiles for sm_90
    # (H100) so a GPU-only error (int8 -> bf16 conversion, tl.dot shapes) fails here, on a CPU
    import importlib.util
    if not KN.HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    if not os.path.exists(os.path.join(os.path.dirname(KN.triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton wheel ships no ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "kernels.py", "compile", "--arch", "90", "--only", "int8 matmul rows=1 bf16",
                        "--only", "int8 matmul rows=4096 bf16"], cwd=os.path.dirname(os.path.abspath(KN.__file__)),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL COMPILED" in r.stdout and r.stdout.count("  ok   ") == 2, \
        r.stdout[-2000:] + r.stderr[-2000:]


def test_kernels_quantize_command_wrong_tokenizer_is_one_line_exit_1(_kernels_run, tmp_path, capsys):
    # a checkpoint whose recorded tokenizer is not the run's: found before any evaluation, nothing written
    ckpt = torch.load(_kernels_run, weights_only=True)
    ckpt["tokenizer_fingerprint"] = "0" * 16
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    assert KN.main(["quantize", "--checkpoint", str(bad), "--decode-tokens", "2", "--repeats", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fingerprint" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_kernels_bench_int8_table_and_deadline(capsys):
    # tiny shape: the table has ms + GB/s per implementation and two ratio columns; a spent budget prints a note
    rows = KN.bench_int8(torch.device("cpu"), [(2, 40, 24)])
    assert len(rows) == 1 and rows[0][0] == "2x40x24" and rows[0][-1].endswith("x") and rows[0][-2].endswith("x")
    assert "int8 readable vs fp32" in capsys.readouterr().out
    assert KN.bench_int8(torch.device("cpu"), [(2, 40, 24)], deadline=0.0) == []

# ===== Stage 5: ddp.py -- collectives, DDP wrappers, ZeRO-1, FSDP, the distributed training command =====
# All multi-process checks run inside ONE spawn of 2 gloo processes (importing torch costs seconds per process), each
# check recorded per rank in a JSON file; the test functions read those results. Every data-parallel result is
# compared against an independent reference: one process training the same model on the whole batch. The training
# command is tested through torchrun (a killed rank, the bare demo under a time budget, usage errors) and in this
# process at world size 1.


# ---- fixtures: one spawn of 2 ranks running every check; the training-command runs ---------------------------------

@pytest.fixture(scope="module")
def _ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_checks")
    D.launch_local(_ddp_checks_worker, 2, str(out))
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


_DDP_TRAIN_ARGS = ["--synthetic-bytes", "150000", "--synthetic-val-bytes", "12000", "--vocab-size", "300",
                   "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--context-length", "16",
                   "--batch-size", "4", "--optimizer", "adamw", "--schedule", "constant", "--warmup-iters", "0",
                   "--eval-interval", "100", "--ckpt-interval", "2", "--log-interval", "1", "--num-samples", "0",
                   "--no-plot", "--eval-tokens", "2000", "--final-eval-tokens", "2000"]


def _ddp_torchrun(args, cwd, extra_env=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone"] + args,
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(cwd))


@pytest.fixture(scope="module")
def _ddp_train_runs(tmp_path_factory):
    import shutil
    tmp = tmp_path_factory.mktemp("ddp_train")
    data_dir = str(tmp / "data")
    # B: world size 1 from scratch, 7 steps, global batch 8 (also builds the data caches the others reuse)
    assert _ddp_in_process(_DDP_TRAIN_ARGS + ["--data-dir", data_dir, "--out-dir", str(tmp / "B"), "--max-steps",
                                              "7", "--batch-size", "8", "--strategy", "ddp"]) == 0
    # A: torchrun, 2 ranks, FSDP; the last rank kills itself after step 5 once; torchrun restarts the job
    proc = _ddp_torchrun(["--nproc_per_node", "2", "--max-restarts", "1", D.__file__] + _DDP_TRAIN_ARGS +
                         ["--data-dir", data_dir, "--out-dir", str(tmp / "A"), "--max-steps", "6", "--strategy",
                          "fsdp", "--timeout", "60"], tmp, extra_env={D.DIE_AT_STEP_ENV: "5"})
    # C: world size 1 resumes A's final (world size 2, FSDP) checkpoint and takes step 7 with another strategy
    shutil.copytree(tmp / "A", tmp / "C")
    code_c = _ddp_in_process(_DDP_TRAIN_ARGS + ["--data-dir", data_dir, "--out-dir", str(tmp / "C"), "--max-steps",
                                                "7", "--resume", "--strategy", "zero1"])
    return dict(A=tmp / "A", B=tmp / "B", C=tmp / "C", proc=proc, code_c=code_c, data_dir=data_dir, tmp=tmp)


def _ddp_in_process(argv):
    """Run the training command at world size 1 inside this process (no spawn: importing torch costs seconds).
    Returns its exit status."""
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        return D._train_entry(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ddp_train_losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if l.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _ddp_assert(results, name):
    for r, res in enumerate(results):
        assert name in res, f"check {name} did not run on rank {r}"
        assert res[name] == "ok", f"rank {r}: {res[name]}"


# ---- models, batches and the per-rank checks --------------------------------------------------------------------

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
    cfg = tiny_config(vocab_size=64, context_length=8, d_model=32, num_layers=2, num_heads=4, d_ff=64,
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


def _ddp_full_grads(model, run):
    """Every parameter's full gradient under its TransformerLM name (collective for both FSDPs)."""
    if isinstance(run, D.FSDP):
        shards = {id(sw.shard): sw for sw in run._sharded}
        return {n: D._fsdp_gather(shards[id(p)], p.grad) if id(p) in shards else p.grad.clone()
                for n, p in run._param_of_name.items()}
    return {n: p.grad.full_tensor() if D._is_dtensor(p.grad) else p.grad.clone() for n, p in model.named_parameters()}


def _ddp_check_torch_fsdp(rank, world):
    """--strategy torch-fsdp (FSDP2) == our FSDP == one process, float32: the loss and every gradient at each of 3
    AdamW steps; then each one's consolidated checkpoint resumes in the other and step 4 equals one process's."""
    import model as M
    import train as T
    cfg = tiny_config(vocab_size=64, context_length=8, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    torch.manual_seed(0)
    ref = M.TransformerLM.from_config(cfg)
    models = {s: copy.deepcopy(ref) for s in ("fsdp", "torch-fsdp")}
    runs = {s: D.wrap_model(m, s) for s, m in models.items()}
    opts = {s: T.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
            for s, r in runs.items()}
    ref_opt = T.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g))
               for _ in range(4)]
    for step, (x, y) in enumerate(batches[:3]):
        ref_loss = F.cross_entropy(ref(x).reshape(-1, 64), y.reshape(-1))
        ref_loss.backward()
        for s, run in runs.items():
            loss = F.cross_entropy(run(x[rank * 2:(rank + 1) * 2]).reshape(-1, 64), y[rank * 2:(rank + 1) * 2]
                                   .reshape(-1))
            loss.backward()
            loss = loss.detach()
            dist.all_reduce(loss)
            assert abs(float(loss) / world - ref_loss.item()) < 1e-6, (s, step, float(loss) / world, ref_loss.item())
            run.finish_gradient_synchronization()
            grads = _ddp_full_grads(models[s], run)
            for n, p in ref.named_parameters():
                assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-5), \
                    f"{s} step {step}: grad {n} off by {(grads[n] - p.grad).abs().max():.3g}"
            opts[s].step()
            opts[s].zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    # each strategy's checkpoint (through the training command's hooks) continued by the other for one step
    x, y = batches[3]
    F.cross_entropy(ref(x).reshape(-1, 64), y.reshape(-1)).backward()
    ref_opt.step()
    for src, dst in (("fsdp", "torch-fsdp"), ("torch-fsdp", "fsdp")):
        hooks = D._checkpoint_hooks(strategy=src, G=4, world=world, device="cpu", out=Path("unused"), budget=None)
        ckpt = hooks["checkpoint_state"](models[src], runs[src], opts[src])
        model = M.TransformerLM.from_config(cfg)
        model.load_state_dict(ckpt["model"])
        run = D.wrap_model(model, dst)
        opt = T.AdamW([p for p in run.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        D._checkpoint_hooks(strategy=dst, G=4, world=world, device="cpu", out=Path("unused"),
                            budget=None)["load_optimizer_state"](opt, run, ckpt)
        F.cross_entropy(run(x[rank * 2:(rank + 1) * 2]).reshape(-1, 64), y[rank * 2:(rank + 1) * 2].reshape(-1)
                        ).backward()
        run.finish_gradient_synchronization()
        opt.step()
        full = D.full_model_state(model, run)
        for n, q in ref.state_dict().items():
            assert torch.allclose(full[n], q, atol=1e-5), f"{src} -> {dst}: {n} off by {(full[n] - q).abs().max():.3g}"


_DDP_CHECKS["torch_fsdp"] = lambda r, w: _ddp_check_torch_fsdp(r, w)


def _ddp_check_fsdp_clipping(rank, world):
    """FSDP's shard-aware clipping == one process clipping the whole gradient. max_norm is far below the gradient
    norm, so clipping fires every step; without the all-reduce of the shards' squared norms each rank would clip by
    its own partial norm (a different norm and different scales per shard)."""
    import train as T
    torch.manual_seed(0)
    ref = _ddp_TiedNet()
    ref.use_branch = False
    model = copy.deepcopy(ref)
    fsdp = D.FSDP(model)
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=0.5)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        x, y = _ddp_batch("tied", step)
        half = x.shape[0] // world
        opt.zero_grad()
        _ddp_loss("tied", fsdp(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
        fsdp.finish_gradient_synchronization()
        norm = D.clip_gradients(fsdp, opt, 0.05)
        ref_opt.zero_grad()
        _ddp_loss("tied", ref(x), y).backward()
        ref_norm = T.gradient_clipping([p for p in ref.parameters() if p.requires_grad], 0.05)
        assert ref_norm > 0.5, f"clipping must fire (norm {ref_norm:.3g} vs max 0.05)"
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"step {step}: FSDP norm {norm} vs one process {ref_norm}"
        opt.step()
        ref_opt.step()
        full = fsdp.gather_full_params()
        for n, q in ref.state_dict().items():
            err = (full[n] - q).abs().max().item()
            assert err <= 1e-5, f"step {step}: {n} differs from single-process clipped training by {err:.3g}"


def _ddp_check_accumulation_equals_big_batch(rank, world, strategy):
    """One optimizer step at grad_accum 2 with micro-batches of B == one step at grad_accum 1 with a batch of 2B,
    through the same accumulation context the training command uses (no_sync on the first micro-batch). Plain SGD,
    so a gradient off by the factor grad_accum would show (AdamW would hide it)."""
    import model as M
    cfg = tiny_config(vocab_size=64, context_length=8, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                      tie_embeddings=True)
    torch.manual_seed(0)
    base = M.TransformerLM.from_config(cfg)
    g = torch.Generator().manual_seed(11)
    x, y = (torch.randint(0, 64, (4 * world, 8), generator=g) for _ in range(2))
    xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]        # this rank's 2B = 4 sequences
    states = []
    for accum in (1, 2):
        model = copy.deepcopy(base)
        run = D.wrap_model(model, strategy)
        opt = torch.optim.SGD([p for p in run.parameters() if p.requires_grad], lr=0.5)
        per = 4 // accum
        for micro in range(accum):
            with D.accumulation_context(run, micro == accum - 1):
                logits = run(xs[micro * per:(micro + 1) * per])
                loss = F.cross_entropy(logits.reshape(-1, 64), ys[micro * per:(micro + 1) * per].reshape(-1))
                (loss / accum).backward()
        run.finish_gradient_synchronization()
        opt.step()
        states.append(D.full_model_state(model, run))
    moved = max((states[0][k] - base.state_dict()[k]).abs().max().item() for k in states[0])
    assert moved > 1e-3, "the step did not move the weights"
    for k in states[0]:
        err = (states[0][k] - states[1][k]).abs().max().item()
        assert err <= 2e-6, f"{strategy}: {k}: accum 2 x B differs from accum 1 x 2B by {err:.3g}"


_DDP_CHECKS["fsdp_clipping"] = _ddp_check_fsdp_clipping
for _s in ("naive", "ddp", "bucketed", "torch-ddp", "zero1", "fsdp"):
    _DDP_CHECKS[f"accumulation_{_s}"] = (lambda s: lambda r, w: _ddp_check_accumulation_equals_big_batch(r, w, s))(_s)


def _ddp_checks_worker(out_dir):
    rank, world, _ = D.init_distributed(backend="gloo", timeout_s=60)
    results = {}
    try:
        import train as T
        _DDP_CHECKS["sharded_train_adamw"] = lambda r, w: _ddp_check_sharded_optimizer(
            r, w, T.AdamW, lr=0.01, weight_decay=0.1)
    except (ImportError, AttributeError) as e:  # train.py broken: recorded as a failure of that check
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


# ---- tests: the building blocks against one process ------------------------------------------------------------

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


@pytest.mark.parametrize("strategy", ["naive", "ddp", "bucketed", "torch-ddp", "zero1", "fsdp"])
def test_ddp_grad_accum_2_equals_one_double_batch(_ddp_results, strategy):
    _ddp_assert(_ddp_results, f"accumulation_{strategy}")


@pytest.mark.parametrize("opt", ["sharded_torch_adamw", "sharded_train_adamw"])
def test_ddp_sharded_optimizer_matches_unsharded(_ddp_results, opt):
    _ddp_assert(_ddp_results, opt)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_ddp_fsdp_matches_single_process(_ddp_results, precision):
    _ddp_assert(_ddp_results, f"fsdp_{precision}")


def test_ddp_fsdp_clipping_uses_the_global_norm(_ddp_results):
    _ddp_assert(_ddp_results, "fsdp_clipping")


def test_ddp_ring_all_reduce_matches_library(_ddp_results):
    _ddp_assert(_ddp_results, "collectives")


def test_ddp_config_mismatch_names_fields(_ddp_results):
    _ddp_assert(_ddp_results, "mismatch")


def test_ddp_rank_without_data_fails_on_every_rank(_ddp_results):
    _ddp_assert(_ddp_results, "rank_without_data")


@pytest.mark.parametrize("strategy", ["bucketed", "fsdp"])
def test_ddp_transformer_matches_single_process(_ddp_results, strategy):
    _ddp_assert(_ddp_results, f"transformer_{strategy}")


def test_ddp_torch_fsdp_equals_our_fsdp_and_one_process_and_their_checkpoints_cross(_ddp_results):
    _ddp_assert(_ddp_results, "torch_fsdp")


def test_ddp_global_batch_is_the_same_at_every_world_size():
    # The ranks' slices of a (seed, step, micro) global batch, stacked, are the same G windows at N = 1, 2 and 4:
    # what makes a checkpoint resume at another world size with the same losses. Windows are real corpus windows
    # (y is x shifted by one token) and differ between steps and micro-steps.
    import numpy as np
    tokens = (np.arange(5000) * 7919) % 1009
    full = D.global_batch_shard(tokens, 8, 16, 1337, 3, 0, 0, 1, "cpu")
    for world in (2, 4):
        parts = [D.global_batch_shard(tokens, 8, 16, 1337, 3, 0, r, world, "cpu") for r in range(world)]
        assert all(p[0].shape == (8 // world, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), full[1])
    x, y = full
    # the corpus repeats with period 1009 and holds each value once per period: a window's first token locates it
    starts = [int(np.flatnonzero(tokens == int(row[0]))[0]) for row in x]
    for row_x, row_y, s0 in zip(x, y, starts):
        assert row_x.tolist() == tokens[s0:s0 + 16].tolist() and row_y.tolist() == tokens[s0 + 1:s0 + 17].tolist()
    assert not torch.equal(D.global_batch_shard(tokens, 8, 16, 1337, 4, 0, 0, 1, "cpu")[0], x)
    assert not torch.equal(D.global_batch_shard(tokens, 8, 16, 1337, 3, 1, 0, 1, "cpu")[0], x)


def test_ddp_assign_shards_balanced():
    owner = D.assign_shards([100, 60, 50, 10, 1], 2)
    # 100->r0, 60->r1, 50->r1 (60<100), 10->r0 (100<110), 1->r0 (tie 110=110: lowest rank)
    assert owner == [0, 1, 1, 0, 0]
    loads = [sum(s for s, o in zip([100, 60, 50, 10, 1], owner) if o == r) for r in range(2)]
    assert loads == [111, 110]


# ---- tests: the training command --------------------------------------------------------------------------------

def test_ddp_killed_rank_restarts_and_resumes_without_losing_steps(_ddp_train_runs):
    proc = _ddp_train_runs["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "killing myself" in out and "resumed from" in out and "at step 4" in out, out[-3000:]
    # the surviving rank reports the dead peer in one line, not a traceback
    assert "communication with the other ranks failed" in out and "[rank0]: Traceback" not in out, out[-3000:]
    a, b = _ddp_train_losses(_ddp_train_runs["A"]), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(a) == [1, 2, 3, 4, 5, 6]           # every step once: none lost, none repeated in the log
    for s in range(1, 7):                              # and each equal to the uninterrupted 1-process run
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    assert a[6] < a[1]


def test_ddp_checkpoint_world_size_2_resumes_at_world_size_1(_ddp_train_runs):
    assert _ddp_train_runs["code_c"] == 0
    c, b = _ddp_train_losses(_ddp_train_runs["C"]), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(c) == list(range(1, 8))
    assert abs(c[7] - b[7]) < 1e-4, (c[7], b[7])
    import train as T
    ckpt = T.read_checkpoint(os.path.join(_ddp_train_runs["C"], "ckpt.pt"))   # a plain train.py checkpoint
    assert ckpt["iteration"] == 7 and ckpt["ddp"]["world_size"] == 1
    assert "lm_head.weight" in ckpt["model"] and ckpt["model"]["lm_head.weight"].shape == (300, 32)


def test_ddp_bare_command_runs_the_demo_under_a_shared_time_budget(_ddp_train_runs):
    # `torchrun ddp.py` with no --max-steps: the preset's wall-clock budget (here shortened, on the test corpus)
    # decided by rank 0 and shared each step; the run lands in runs/ddp-demo (never train.py's runs/demo), and
    # every rank stops at the same step (ddp.py verifies that collectively and fails the run otherwise).
    tmp = _ddp_train_runs["tmp"] / "bare"
    tmp.mkdir()
    i = _DDP_TRAIN_ARGS.index("--ckpt-interval")
    args = _DDP_TRAIN_ARGS[:i] + _DDP_TRAIN_ARGS[i + 2:]          # checkpoints only at the end
    proc = _ddp_torchrun(["--nproc_per_node", "2", D.__file__] + args +
                         ["--data-dir", _ddp_train_runs["data_dir"], "--max-minutes", "0.25", "--log-interval", "50"],
                         tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0's clock decides" in out and "needs --max-steps" not in out
    assert (tmp / "runs" / "ddp-demo" / "ckpt.pt").exists() and not (tmp / "runs" / "demo").exists()
    import train as T
    ckpt = T.read_checkpoint(tmp / "runs" / "ddp-demo" / "ckpt.pt")
    losses = _ddp_train_losses(tmp / "runs" / "ddp-demo")
    assert ckpt["iteration"] == max(losses) >= 10 and sorted(losses) == list(range(1, max(losses) + 1))
    assert f"every rank stopped at step {ckpt['iteration']}" in out, out[-2000:]
    # --resume of a run its budget ended (here at world size 1): it stays finished, no step is added
    assert _ddp_in_process(args + ["--data-dir", _ddp_train_runs["data_dir"], "--max-minutes", "0.25", "--resume",
                                   "--out-dir", str(tmp / "runs" / "ddp-demo")]) == 0
    assert max(_ddp_train_losses(tmp / "runs" / "ddp-demo")) == ckpt["iteration"]
    assert T.read_checkpoint(tmp / "runs" / "ddp-demo" / "ckpt.pt")["iteration"] == ckpt["iteration"]


def test_ddp_without_torchrun_spawns_the_ranks_itself(_ddp_train_runs):
    # `python ddp.py` (no torchrun): one line saying what it does, then a real 2-process run
    out_dir = _ddp_train_runs["tmp"] / "spawned"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, D.__file__] + _DDP_TRAIN_ARGS +
                          ["--data-dir", _ddp_train_runs["data_dir"], "--out-dir", str(out_dir), "--max-steps", "3"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=str(_ddp_train_runs["tmp"]))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.splitlines()[0].startswith("ddp.py: not started by torchrun; spawning 2 local processes")
    assert "on 2 rank(s)" in proc.stdout and "every rank stopped at step 3" in proc.stdout
    assert sorted(_ddp_train_losses(out_dir)) == [1, 2, 3]


def test_ddp_torch_fsdp_command_equals_one_process_and_resumes_as_our_fsdp(_ddp_train_runs):
    # --strategy torch-fsdp through train.py's hooks on 2 spawned ranks: the same losses as the 1-process run B;
    # its consolidated checkpoint then continues in this process with our fsdp, step 4 again equal to B's
    out_dir = _ddp_train_runs["tmp"] / "torch_fsdp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    args = _DDP_TRAIN_ARGS + ["--data-dir", _ddp_train_runs["data_dir"], "--out-dir", str(out_dir)]
    proc = subprocess.run([sys.executable, D.__file__] + args + ["--max-steps", "3", "--strategy", "torch-fsdp"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=str(_ddp_train_runs["tmp"]))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "torch-fsdp on 2 rank(s)" in proc.stdout
    assert _ddp_in_process(args + ["--max-steps", "4", "--strategy", "fsdp", "--resume"]) == 0
    got, b = _ddp_train_losses(out_dir), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert abs(got[s] - b[s]) < 1e-4, (s, got[s], b[s])


def test_ddp_two_node_rendezvous_on_localhost(_ddp_train_runs):
    # the README's multi-node command, both "nodes" on this machine: two torchrun launches with --nnodes=2, one
    # process each, meeting at --rdzv-endpoint; 2 steps of the 2-rank run equal the 1-process run B
    out_dir = _ddp_train_runs["tmp"] / "two_nodes"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    endpoint = f"127.0.0.1:{D.free_port()}"
    args = _DDP_TRAIN_ARGS + ["--data-dir", _ddp_train_runs["data_dir"], "--out-dir", str(out_dir), "--max-steps",
                              "2", "--strategy", "ddp"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                               "--nproc_per_node=1", f"--rdzv-endpoint={endpoint}", D.__file__] + args,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=str(_ddp_train_runs["tmp"])) for k in (0, 1)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "ddp on 2 rank(s)" in outs[0] and "every rank stopped at step 2" in outs[0], outs[0][-2000:]
    got, b = _ddp_train_losses(out_dir), _ddp_train_losses(_ddp_train_runs["B"])
    assert sorted(got) == [1, 2] and all(abs(got[s] - b[s]) < 1e-4 for s in got), (got, b)


def test_ddp_refuses_to_overwrite_an_earlier_run(_ddp_train_runs, capsys):
    run = _ddp_train_runs["B"]
    before = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl")}
    argv = _DDP_TRAIN_ARGS + ["--data-dir", _ddp_train_runs["data_dir"], "--out-dir", str(run), "--max-steps", "2"]
    assert D.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert {f: (run / f).read_bytes() for f in before} == before        # nothing touched
    # --overwrite replaces it: a fresh 2-step run
    copy_dir = _ddp_train_runs["tmp"] / "B_overwritten"
    import shutil
    shutil.copytree(run, copy_dir)
    argv = argv[:argv.index("--out-dir") + 1] + [str(copy_dir)] + argv[argv.index("--out-dir") + 2:]
    assert _ddp_in_process(argv + ["--overwrite"]) == 0
    assert sorted(_ddp_train_losses(copy_dir)) == [1, 2]


@pytest.mark.parametrize("left", ["metrics.jsonl", "loss_curve.png", "tokenizer"])
def test_ddp_refuses_a_folder_holding_any_run_file(left, tmp_path, capsys):
    # an earlier run is more than its checkpoint: a folder holding only its metrics log, its loss plot or its
    # tokenizer is refused the same way, and left untouched
    run = tmp_path / "run"
    run.mkdir()
    if left == "tokenizer":
        (run / left).mkdir()
    else:
        (run / left).write_text("from an earlier run\n")
    argv = _DDP_TRAIN_ARGS + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(run), "--max-steps", "2"]
    assert D.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and left in err[0] and "--resume" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == [left] and not (tmp_path / "data").exists()


def test_ddp_failed_start_leaves_no_empty_run_folder(_ddp_train_runs, tmp_path, monkeypatch, capsys):
    # a budget already used up before training (a runtime error, after the folder was created): one line, exit 1,
    # and the folder this command created is gone again
    monkeypatch.chdir(tmp_path)
    argv = _DDP_TRAIN_ARGS + ["--data-dir", _ddp_train_runs["data_dir"], "--max-minutes", "0.01"]
    assert _ddp_in_process(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-minutes" in err[0] and "used up" in err[0], err
    assert not (tmp_path / "runs").exists()


_DDP_USAGE_ERRORS = [
    (["--strategy", "nope"], "--strategy"),
    (["--bucket-mb", "0"], "--bucket-mb"),
    (["--timeout", "-1"], "--timeout"),
    (["--global-batch-size", "0"], "--global-batch-size"),
    (["--global-batch-size", "3", "--nproc", "2"], "--global-batch-size"),
    (["--nproc", "0"], "--nproc"),
    (["--strategy", "fsdp", "--optimizer", "muon"], "--optimizer"),
    (["--strategy", "fsdp", "--optimizer", "soap"], "--optimizer"),
    (["--compute-dtype", "bf16"], "--compute-dtype"),
    (["--max-minutes", "0"], "--max-minutes"),
    (["--compile"], "--compile"),
    (["--backend", "nccl"], "--backend"),
    (["--out-dir", "afile.txt"], "--out-dir"),
    (["bench", "--rounds", "0"], "--rounds"),
    (["bench", "--strategies", "local,nope"], "--strategies"),
    (["bench-comm", "--ops", "all_reduce,nope"], "--ops"),
    (["bench-comm", "--min-mb", "0"], "--min-mb"),
    (["tour", "--nproc", "0"], "--nproc"),
    (["plan", "--tp", "5"], "num_heads divisible by 5"),
    (["plan", "--sp"], "--sp"),
    (["plan", "--pp", "13"], "at least as many layers"),
    (["bench", "--parallel", "--nproc", "3"], "2 or 4 ranks"),
    (["--tp", "2", "--pp", "2", "--tp-impl", "dtensor", "--nproc", "4"], "--tp-impl dtensor"),
    (["--tp-impl", "torch"], "--tp-impl"),
]


@pytest.mark.parametrize("argv,option", _DDP_USAGE_ERRORS, ids=[" ".join(a) for a, _ in _DDP_USAGE_ERRORS])
def test_ddp_usage_errors_are_one_line_with_status_2(argv, option, tmp_path, monkeypatch, capsys):
    if option == "--backend" and torch.cuda.is_available():
        pytest.skip("nccl is valid with CUDA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a folder")
    assert D.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddp.py: error:") and option in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]      # nothing created


def test_ddp_usage_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    proc = _ddp_torchrun(["--nproc_per_node", "2", D.__file__, "--strategy", "fsdp", "--optimizer", "muon"],
                         tmp_path, timeout=120)
    assert proc.returncode != 0
    ours = [l for l in (proc.stdout + proc.stderr).splitlines() if "ddp.py" in l and "error" in l]
    assert len(ours) == 1 and "--optimizer" in ours[0], proc.stderr[-2000:]
    assert "[rank" not in proc.stderr and "ValueError" not in proc.stderr
    assert not (tmp_path / "runs").exists()


class _DdpCfg:
    optimizer = "muon"


def _ddp_train_check(extra):
    """check_train_args on the test corpus' options plus `extra`, at world size 2."""
    return D.check_train_args(D.build_train_parser().parse_args(_DDP_TRAIN_ARGS + ["--max-steps", "3"] + extra), 2)


# Bad calls: (what is called, the exception, a fragment of its message). Each is refused before any work: a bad
# option at parse time, a mesh or a model that does not split before any group or model exists.
_DDP_BAD_CALLS = [
    ("parse --strategy nope", lambda: D.build_train_parser().parse_args(["--strategy", "nope"]), D.UsageError,
     "--strategy"),
    ("fsdp optimizer muon", lambda: D.build_strategy_optimizer(None, None, "fsdp", _DdpCfg()), ValueError, "(?i)muon"),
    ("bucket_size_mb 0", lambda: D.DDPBucketed.__init__(object.__new__(D.DDPBucketed), nn.Linear(2, 2),
                                                      bucket_size_mb=0), ValueError, "bucket_size_mb"),
    ("fsdp int8", lambda: D.FSDP(nn.Linear(2, 2), compute_dtype=torch.int8), ValueError, "compute_dtype"),
    ("tp heads 3", lambda: D.check_tp_config(tiny_config(**dict(_PAR_CFG, num_heads=3, num_kv_heads=3, d_model=24)),
                                             2), ValueError, "num_heads"),
    ("tp kv heads 1", lambda: D.check_tp_config(tiny_config(**dict(_PAR_CFG, num_kv_heads=1)), 2), ValueError,
     "num_kv_heads"),
    ("tp vocab 63", lambda: D.check_tp_config(tiny_config(**dict(_PAR_CFG, vocab_size=63)), 2), ValueError,
     "vocab_size"),
    ("tp d_ff 49", lambda: D.check_tp_config(tiny_config(**dict(_PAR_CFG, d_ff=49)), 2), ValueError, "d_ff"),
    ("tp qk_norm", lambda: D.check_tp_config(tiny_config(**dict(_PAR_CFG, qk_norm=True)), 2), ValueError,
     "unsupported"),
    ("mesh 3 of 4", lambda: D.check_mesh(3, 1, 1, 4), ValueError,
     "dp=3 x tp=1 x pp=1 = 3 ranks, but the world has 4"),
    ("mesh tp 0", lambda: D.check_mesh(2, 0, 2, 4), ValueError, "tp must be a positive integer"),
    ("--tp 3", lambda: _ddp_train_check(["--tp", "3"]), D.UsageError, "does not divide the world size 2"),
    ("--tp 2 --pp 2", lambda: _ddp_train_check(["--tp", "2", "--pp", "2"]), D.UsageError, "world size 2"),
    ("--sp", lambda: _ddp_train_check(["--sp"]), D.UsageError, r"\-\-sp"),
    ("--tp 2 heads 1", lambda: _ddp_train_check(["--tp", "2", "--num-heads", "1"]), D.UsageError, "num_heads"),
    ("--pp 2 layers 1", lambda: _ddp_train_check(["--pp", "2", "--num-layers", "1"]), D.UsageError,
     r"\-\-num\-layers 1"),
    ("--tp 2 extras", lambda: _ddp_train_check(["--tp", "2", "--noise-scale", "--grad-accum", "2"]), D.UsageError,
     r"\-\-noise\-scale, \-\-prune\-sparsity and \-\-distill\-from"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in _DDP_BAD_CALLS], ids=[c[0] for c in _DDP_BAD_CALLS])
def test_ddp_bad_calls_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


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


def test_ddp_default_run_folder_is_not_train_py_s():
    p = D.build_train_parser()
    assert D.config_for_strategy(p.parse_args([])).out_dir == os.path.join("runs", "ddp-demo")
    assert D.config_for_strategy(p.parse_args(["tinystories"])).out_dir == os.path.join("runs", "ddp-tinystories")
    assert D.config_for_strategy(p.parse_args(["--out-dir", "x"])).out_dir == "x"


# ===== Stage 5 (continued): tensor and pipeline parallelism -- ddp.py sections 6-7 =====
# One spawn of 2 gloo processes runs every TP / PP check in float64 and records, per rank, the largest difference
# from an independent reference: the full TransformerLM on the whole batch in this same process (same seed, so
# every rank builds the same model), with torch's F.cross_entropy as the loss.

_PAR_CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=48)


def _par_model():
    import model as M
    torch.manual_seed(0)
    return M.TransformerLM(**_PAR_CFG, dtype=torch.float64)


def _par_batch(n=8, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, _PAR_CFG["vocab_size"], (n, T), generator=g),
            torch.randint(0, _PAR_CFG["vocab_size"], (n, T), generator=g))


def _par_reference(model, x, y):
    """The single-process loss and gradients (by TransformerLM name) on the whole batch."""
    model.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _par_max_diff(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _par_check_tp(rank, world):
    model = _par_model()
    x, y = _par_batch()
    ref_loss, ref_grads = _par_reference(model, x, y)
    tp = D.TPTransformerLM(model.config, model.state_dict())
    local_shapes = {n: tuple(p.shape) for n, p in tp.named_parameters()}
    loss = tp(x, y)
    loss.backward()
    grads = tp.full_state_dict(grads=True)
    weights = tp.full_state_dict()
    full_sd = {k: v for k, v in model.state_dict().items()}
    return dict(loss_diff=abs(float(loss) - ref_loss), grad_diff=_par_max_diff(grads, ref_grads),
                weights_diff=_par_max_diff(weights, full_sd), grad_scale=max(float(g.abs().max()) for g in
                                                                                  ref_grads.values()),
                q_shape=local_shapes["layers.0.attn.q_proj.weight"],
                k_shape=local_shapes["layers.0.attn.k_proj.weight"],
                o_shape=local_shapes["layers.0.attn.output_proj.weight"],
                w2_shape=local_shapes["layers.0.ffn.w2.weight"],
                emb_shape=local_shapes["token_embeddings.weight"], head_shape=local_shapes["lm_head.weight"])


def _par_check_vocab_ce(rank, world):
    # the vocabulary-parallel cross-entropy alone, with large logits (the max subtraction matters): value and
    # gradient equal torch's on the full logits
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(10, 64, generator=g, dtype=torch.float64) * 30).requires_grad_(True)
    y = torch.randint(0, 64, (10,), generator=g)
    ref = F.cross_entropy(z, y)
    ref.backward()
    z_local = z.detach()[:, rank * 32:(rank + 1) * 32].clone().requires_grad_(True)
    loss = D.vocab_parallel_cross_entropy(z_local, y, rank * 32, dist.group.WORLD)
    loss.backward()
    out = dict(loss_diff=abs(float(loss) - float(ref)),
               grad_diff=float((z_local.grad - z.grad[:, rank * 32:(rank + 1) * 32]).abs().max()))
    # logits of magnitude ~100 in low precision: a row maximum summed over the ranks instead of maxed would push
    # exp(z - m) out of range (rows 0-4: both halves peak near +115, so exp(-115) underflows; rows 5-9: one half
    # sits near -120, so exp(+115) overflows), where the true maximum keeps every exponent <= 0
    z = torch.randn(10, 64, generator=g) * 20
    z[:5, 7], z[:5, 40] = 120.0, 110.0
    z[5:, :32] = -120.0 + torch.randn(5, 32, generator=g)
    z[5:, 50] = 100.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        zd = z.to(dtype)
        ref_z = zd.float().clone().requires_grad_(True)    # the same rounded logits, torch's loss in float32
        ref = F.cross_entropy(ref_z, y)
        ref.backward()
        z_local = zd[:, rank * 32:(rank + 1) * 32].clone().requires_grad_(True)
        loss = D.vocab_parallel_cross_entropy(z_local, y, rank * 32, dist.group.WORLD)
        loss.backward()
        out[str(dtype)] = dict(rel_loss=abs(float(loss) - float(ref)) / float(ref),
                               grad_diff=float((z_local.grad.float() - ref_z.grad[:, rank * 32:(rank + 1) * 32])
                                               .abs().max()))
    return out


def _par_check_pp(rank, world):
    model = _par_model()
    x, y = _par_batch()
    ref_loss, ref_grads = _par_reference(model, x, y)
    xs, ys = list(x.chunk(4)), list(y.chunk(4))
    out = {}
    grads = {}
    for sched in ("gpipe", "1f1b"):
        stage = D.PipelineStage(_par_model(), rank, world)
        loss = D.run_pipeline(stage, list(range(world)), xs, ys, schedule=sched)
        grads[sched] = {n: p.grad.clone() for n, p in stage.named_parameters()}
        out[sched] = dict(loss_diff=None if loss is None else abs(loss - ref_loss),
                          grad_diff=_par_max_diff(grads[sched], {n: ref_grads[n] for n in grads[sched]}),
                          names=sorted(grads[sched]))
    out["gpipe_vs_1f1b"] = _par_max_diff(grads["gpipe"], grads["1f1b"])
    return out


def _par_check_sp(rank, world):
    # Megatron-SP on top of TP: same loss and gradients as one process (T = 12 splits over 2 ranks)
    model = _par_model()
    x, y = _par_batch()
    ref_loss, ref_grads = _par_reference(model, x, y)
    tp = D.TPTransformerLM(model.config, model.state_dict(), sequence_parallel=True)
    loss = tp(x, y)
    loss.backward()
    partial_norm_grad = tp.layers["0"].ln1.weight.grad.clone()
    tp.finish_gradient_synchronization()
    grads = tp.full_state_dict(grads=True)
    odd = None
    try:
        tp(x[:, :11], y[:, :11])
    except ValueError as e:
        odd = str(e)
    return dict(loss_diff=abs(float(loss) - ref_loss), grad_diff=_par_max_diff(grads, ref_grads),
                partial_norm_diff=float((partial_norm_grad - ref_grads["layers.0.ln1.weight"]).abs().max()),
                odd_length_error=odd)


def _par_check_ring(rank, world):
    # ring attention vs full causal attention, at lengths that do and do not split into 2p = 4 chunks
    out = {}
    for T in (16, 13, 3):
        g = torch.Generator().manual_seed(T)
        q, k, v, dout = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(4))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref.backward(dout)
        pos = D.ring_layout(T, world, rank)
        real = pos < T
        ql, kl, vl = (D.ring_shard(t.detach(), world, rank).requires_grad_(True) for t in (q, k, v))
        o = D.ring_attention(ql, kl, vl, T)
        o.backward(D.ring_shard(dout, world, rank))
        diffs = [float((o[..., real, :] - ref.detach()[..., pos[real], :]).abs().max())]
        for local, full in ((ql, q), (kl, k), (vl, v)):
            diffs.append(float((local.grad[..., real, :] - full.grad[..., pos[real], :]).abs().max()))
        out[str(T)] = dict(out_diff=diffs[0], grad_diff=max(diffs[1:]), rows=int(real.sum()))
    return out


def _par_check_cp(rank, world):
    # a whole model under context parallelism (ring attention in every layer), T = 13: not divisible by 2p = 4
    model = _par_model()
    x, y = _par_batch(T=13)
    ref_loss, ref_grads = _par_reference(model, x, y)
    cp = D.ContextParallelLM(_par_model())
    share = cp(x, y)
    share.backward()
    cp.finish_gradient_synchronization()
    total = share.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad for n, p in cp.model.named_parameters()}
    return dict(loss_diff=abs(float(total) - ref_loss), grad_diff=_par_max_diff(grads, ref_grads),
                share=float(share), loss=ref_loss)


def _par_check_plan(rank, world):
    # `ddp.py plan`'s formulas against a measured step, at every 2-rank layout
    cfg = _par_model().config
    out = {}
    for name, kw, sp in (("tp", dict(tp=2), False), ("tp_sp", dict(tp=2), True), ("pp", dict(pp=2), False),
                         ("dp", dict(dp=2), False)):
        mesh = D.DeviceMesh(**kw)
        got = D.measure_plan_step(cfg, mesh, sp=sp, batch=4, micro_batches=2)
        want = D.parallel_plan(cfg, **kw, sp=sp, batch=4, micro_batches=2)[mesh.pp_rank]
        out[name] = dict(got=got, want=want)
    return out


def _par_dtensor_run(make, batches, sd, full_opt=None):
    """AdamW steps with clipping on one implementation: (losses, norms, first step's full gradients, full state)."""
    import train as T
    mm = make(sd)
    opt = T.AdamW(mm.parameters(), lr=1e-2, weight_decay=0.1)
    if full_opt is not None:
        mm.load_optimizer_state(opt, full_opt)
    losses, norms, grads = [], [], None
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        losses.append(mm.forward_backward(x, y))
        if grads is None:   # (ours: MeshModel._full gathers TP slices; DTensor: full_tensor)
            named = {n: p.grad for n, p in mm.inner.named_parameters()}
            grads = mm._full(named) if isinstance(mm, D.MeshModel) else {n: D._full_tensor(g) for n, g in named.items()}
        norms.append(mm.clip_gradients(0.5))
        opt.step()
    return losses, norms, grads, mm.full_state(opt)


def _par_check_dtensor(rank, world):
    # --tp-impl dtensor vs ours vs one process, float32: 3 AdamW steps clipped at 0.5 (every step clips), without
    # and with SP; then each one's consolidated state (weights and AdamW by name) resumed by the other for step 4
    import model as M
    import train as T
    torch.manual_seed(0)
    ref = M.TransformerLM(**_PAR_CFG)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    batches = [_par_batch(seed=20 + s) for s in range(4)]
    opt = T.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses, ref_norms, ref_grads = [], [], None
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        logits = ref(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        ref_grads = ref_grads or {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_norms.append(T.gradient_clipping(ref.parameters(), 0.5))
        opt.step()
        ref_losses.append(loss.item())
    out = {}
    for sp in (False, True):
        mesh = D.DeviceMesh(tp=world)
        impls = {"ours": lambda sd: D.MeshModel(ref.config, sd, mesh, sp),
                 "dtensor": lambda sd: D.DTensorTPModel(ref.config, sd, mesh, sp)}
        runs = {k: _par_dtensor_run(make, batches[:3], start) for k, make in impls.items()}
        # step 4: dtensor from ours' state, ours from dtensor's
        cross = {k: _par_dtensor_run(impls[k], batches[3:], runs[o][3][0], runs[o][3][1])
                 for k, o in (("dtensor", "ours"), ("ours", "dtensor"))}
        for k in impls:
            losses, norms = runs[k][0] + cross[k][0], runs[k][1] + cross[k][1]
            out[f"{k}{'_sp' if sp else ''}"] = dict(
                loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                norm_diff=max(abs(a - b) / b for a, b in zip(norms, ref_norms)),
                grad_diff=_par_max_diff(runs[k][2], ref_grads),
                weights_diff=_par_max_diff(cross[k][3][0], ref.state_dict()),
                ours_vs_dtensor=_par_max_diff(runs[k][3][0], runs["ours"][3][0]))
    out["norms"] = ref_norms
    return out


def _par_check_bf16(rank, world):
    # --dtype bfloat16 on the mesh: one forward/backward of every 2-rank layout (ours tp, tp+sp, pp; DTensor tp,
    # tp+sp) under the bf16 autocast train.py uses, against one process under the same autocast (float32 weights)
    import model as M
    torch.manual_seed(0)
    ref = M.TransformerLM(**_PAR_CFG)
    x, y = _par_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ref(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    with torch.no_grad():               # how far bf16 moves the loss: what the layouts must agree far better than
        logits32 = ref(x)
    gap = abs(F.cross_entropy(logits32.reshape(-1, logits32.shape[-1]), y.reshape(-1)).item() - loss.item())
    out = dict(loss=loss.item(), gap=gap, grad_scale=max(float(g.abs().max()) for g in ref_grads.values()))
    for name, impl, kw in (("tp", D.MeshModel, dict(tp=2)), ("tp_sp", D.MeshModel, dict(tp=2)),
                           ("pp", D.MeshModel, dict(pp=2)), ("dtensor", D.DTensorTPModel, dict(tp=2)),
                           ("dtensor_sp", D.DTensorTPModel, dict(tp=2))):
        mm = impl(ref.config, ref.state_dict(), D.DeviceMesh(**kw), name.endswith("sp"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = float(mm.local_forward_backward(x, y))
        mm.synchronize_gradients()
        named = {n: p.grad for n, p in mm.inner.named_parameters()}
        grads = mm._full(named) if impl is D.MeshModel else {n: D._full_tensor(g) for n, g in named.items()}
        out[name] = dict(loss_diff=abs(got - loss.item()), dtypes=sorted({str(g.dtype) for g in grads.values()}),
                         grad_diff=max(float((g - ref_grads[n]).abs().max()) for n, g in grads.items()),
                         names=len(grads))
    return out


def _par_checks_worker(out_dir):
    rank, world, _ = D.init_distributed()
    torch.set_num_threads(1)
    results = {}
    try:
        for name, fn in (("tp", _par_check_tp), ("vocab_ce", _par_check_vocab_ce), ("pp", _par_check_pp),
                         ("sp", _par_check_sp), ("ring", _par_check_ring), ("plan", _par_check_plan),
                         ("cp", _par_check_cp), ("dtensor", _par_check_dtensor),
                         ("bf16", _par_check_bf16)):
            try:
                results[name] = fn(rank, world)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        D.cleanup_distributed()


@pytest.fixture(scope="module")
def _par_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("par_checks")
    D.launch_local(_par_checks_worker, 2, str(out))
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def _par_get(results, name):
    for r in results:
        assert "error" not in r[name], r[name].get("error")
    return [r[name] for r in results]


def test_ddp_tp_loss_and_every_gradient_equal_single_process(_par_results):
    for r in _par_get(_par_results, "tp"):
        assert r["loss_diff"] < 1e-12
        assert r["grad_diff"] < 1e-12 * max(1.0, r["grad_scale"]) and r["grad_scale"] > 1e-3
        assert r["weights_diff"] == 0.0     # sharding then gathering gives back the full state dict exactly


def test_ddp_dtensor_tp_equals_our_tp_and_one_process_and_their_checkpoints_cross(_par_results):
    # --tp-impl dtensor vs ours vs one process, float32, 2 ranks, without and with SP: 3 AdamW steps clipped at 0.5,
    # then step 4 in the other implementation from the first's consolidated state (see _par_check_dtensor)
    for r in _par_get(_par_results, "dtensor"):
        assert min(r["norms"]) > 0.5                   # every step really clipped
        for k in ("ours", "dtensor", "ours_sp", "dtensor_sp"):
            v = r[k]
            assert v["loss_diff"] < 5e-6 and v["norm_diff"] < 1e-5 and v["grad_diff"] < 1e-6, (k, v)
            assert v["weights_diff"] < 1e-4 and v["ours_vs_dtensor"] < 5e-5, (k, v)   # (an lr-1e-2 step: ~1e-2)

def test_ddp_mesh_layouts_train_under_bf16_autocast(_par_results):
    # every 2-rank layout (ours tp, tp+sp, pp; DTensor tp, tp+sp) under bf16 autocast: the loss within bf16's noise
    # of one process under the same autocast, float32 gradients (fp32 master weights) within 5% of their scale
    for r in _par_get(_par_results, "bf16"):
        assert r["gap"] > 0                            # bf16 really changed the reference's loss
        for k in ("tp", "tp_sp", "pp", "dtensor", "dtensor_sp"):
            v = r[k]
            assert v["loss_diff"] < 2e-3 and v["grad_diff"] < 0.05 * r["grad_scale"], (k, v)
            assert v["dtypes"] == ["torch.float32"] and v["names"] == len(_par_model().state_dict())


def test_ddp_mesh_step_runs_under_the_dtype_autocast():
    # the --tp/--pp hooks run the mesh's forward and backward under train.py's autocast for --dtype, as train.py's
    # own step does: bfloat16 turns it on, float32 leaves it off
    import types
    import train as T
    seen = []

    class Recorder:
        def local_forward_backward(self, x, y, scale):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return torch.zeros(1)

    data = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=256))
    mesh = types.SimpleNamespace(dp=1, tp=1, pp=1)
    ids = torch.zeros(2, 4, dtype=torch.long)
    for dtype in ("bfloat16", "float32"):
        cfg = T.TrainConfig(dtype=dtype, optimizer="adamw")
        hooks = D._mesh_hooks(cfg, mesh, False, "1f1b", 4, "ours", 8, data, None,
                              dict(get_batch=None, on_step=None, all_reduce=None))
        hooks.loss_and_backward(Recorder(), ids, ids, 1.0)
    assert seen == [torch.bfloat16, None]

def test_ddp_tp_shards_heads_kv_heads_hidden_units_and_vocabulary(_par_results):
    # 4 query heads, 2 KV heads (GQA), head_dim 8, d_ff 48, vocab 64, split over 2 ranks
    for r in _par_get(_par_results, "tp"):
        assert tuple(r["q_shape"]) == (16, 32) and tuple(r["k_shape"]) == (8, 32)
        assert tuple(r["o_shape"]) == (32, 16) and tuple(r["w2_shape"]) == (32, 24)
        assert tuple(r["emb_shape"]) == (32, 32) and tuple(r["head_shape"]) == (32, 32)


def test_ddp_vocab_parallel_cross_entropy_matches_torch(_par_results):
    for r in _par_get(_par_results, "vocab_ce"):
        assert r["loss_diff"] < 1e-12 and r["grad_diff"] < 1e-14


@pytest.mark.parametrize("dtype,tol", [("torch.float32", 1e-6), ("torch.float16", 1e-3), ("torch.bfloat16", 5e-3)])
def test_ddp_vocab_parallel_cross_entropy_large_logits_low_precision(_par_results, dtype, tol):
    # logits ~100: the row maximum must be all-reduced with MAX (a SUM gives inf / nan here)
    for r in _par_get(_par_results, "vocab_ce"):
        got = r[dtype]
        assert math.isfinite(got["rel_loss"]) and got["rel_loss"] < tol, got
        assert math.isfinite(got["grad_diff"]) and got["grad_diff"] < 10 * tol, got


def test_ddp_pipeline_gpipe_and_1f1b_equal_single_process(_par_results):
    rs = _par_get(_par_results, "pp")
    for sched in ("gpipe", "1f1b"):
        # the loss lives on the last stage
        assert rs[0][sched]["loss_diff"] is None and rs[1][sched]["loss_diff"] < 1e-12
        for r in rs:
            assert r[sched]["grad_diff"] < 1e-12
    # the stages together hold every parameter exactly once: 3 layers split 2 + 1, embedding first, head last
    names0, names1 = rs[0]["gpipe"]["names"], rs[1]["gpipe"]["names"]
    assert not set(names0) & set(names1)
    assert "token_embeddings.weight" in names0 and "lm_head.weight" in names1 and "ln_final.weight" in names1
    assert any(n.startswith("layers.1.") for n in names0) and all(not n.startswith("layers.2.") for n in names0)
    for r in rs:
        assert r["gpipe_vs_1f1b"] < 1e-13


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 1)])
def test_ddp_pipeline_bubble_equals_formula_for_both_schedules(p, m):
    # equal-cost stages (backward twice a forward): the paper-and-pencil bubble is exactly (p-1)/(m+p-1)
    for sched in (D.gpipe_schedule, D.one_f_one_b_schedule):
        events, makespan, bubble = D.simulate_pipeline(sched, p, m)
        assert abs(bubble - (p - 1) / (m + p - 1)) < 1e-12
        assert makespan == 3 * (m + p - 1)
        assert len(events) == 2 * p * m


def test_ddp_one_f_one_b_bounds_micro_batches_in_flight():
    # GPipe holds all m micro-batches' activations on stage 0; 1F1B at most p - s
    p, m = 4, 8
    for s in range(p):
        for sched, bound in ((D.gpipe_schedule, m), (D.one_f_one_b_schedule, p - s)):
            live = peak = 0
            for kind, _ in sched(p, m, s):
                live += 1 if kind == "F" else -1
                peak = max(peak, live)
            assert peak == bound
    assert D.one_f_one_b_schedule(2, 3, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]


def test_ddp_pipeline_timeline_prints_the_bubble():
    events, makespan, _ = D.simulate_pipeline(D.gpipe_schedule, 2, 2, t_forward=1, t_backward=1)
    text = D.format_timeline(events, 2, makespan)
    assert text.splitlines() == ["stage 0 | F0 F1 .. .. B0 B1", "stage 1 | .. F0 F1 B0 B1 .."]


def test_ddp_sequence_parallel_equals_single_process(_par_results):
    for r in _par_get(_par_results, "sp"):
        assert r["loss_diff"] < 1e-12 and r["grad_diff"] < 1e-12
        # before the TP all-reduce a norm weight's gradient covers only this rank's half of the sequence
        assert r["partial_norm_diff"] > 1e-6
        assert "divisible by 2" in r["odd_length_error"]


def test_ddp_ring_attention_matches_full_causal_attention(_par_results):
    rs = _par_get(_par_results, "ring")
    for T in ("16", "13", "3"):
        assert sum(r[T]["rows"] for r in rs) == int(T)      # every real position on exactly one rank
        for r in rs:
            assert r[T]["out_diff"] < 1e-12 and r[T]["grad_diff"] < 1e-12


def test_ddp_ring_layout_balances_causal_work():
    # 2 ranks, T = 8 -> chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert D.ring_layout(8, 2, 0).tolist() == [0, 1, 6, 7] and D.ring_layout(8, 2, 1).tolist() == [2, 3, 4, 5]
    # unmasked (query, key) pairs per rank are equal: sum of (pos + 1) over each rank's positions
    for p, T in ((2, 16), (4, 64)):
        work = [int((D.ring_layout(T, p, r) + 1).sum()) for r in range(p)]
        assert len(set(work)) == 1


# ---- composition: a (dp, tp, pp) mesh on 4 gloo processes, against one process training on the whole batch ----

def _par_mesh_run(mesh_kw, steps, x, y, full_sd, full_opt=None, impl=D.MeshModel, **model_kw):
    import train as T
    mesh = D.DeviceMesh(**mesh_kw)
    mm = impl(_par_model().config, full_sd, mesh, **model_kw)
    opt = T.AdamW(mm.parameters(), lr=1e-2, weight_decay=0.1)
    if full_opt is not None:
        mm.load_optimizer_state(opt, full_opt)
    rows = x[0].shape[0] // mesh.dp
    mine = slice(mesh.dp_rank * rows, (mesh.dp_rank + 1) * rows)    # this dp rank's share of every batch
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(mm.forward_backward(x[step][mine], y[step][mine]))
        opt.step()
    return losses, mm.full_state(opt), mesh


def _par_mesh_worker(out_dir):
    import train as T
    rank, world, _ = D.init_distributed()
    torch.set_num_threads(1)
    result = {}
    try:
        batches = [_par_batch(seed=10 + s) for s in range(6)]
        x, y = [b[0] for b in batches], [b[1] for b in batches]
        ref = _par_model()
        ref_opt = T.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        ref_losses, ref_states = [], []
        for s in range(6):
            ref_opt.zero_grad(set_to_none=True)
            logits = ref(x[s])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[s].reshape(-1))
            loss.backward()
            ref_opt.step()
            ref_losses.append(loss.item())
            ref_states.append({k: v.clone() for k, v in ref.state_dict().items()})
        start = _par_model().state_dict()
        # 3 steps at (dp=2, tp=2) with sequence parallelism, consolidated; then 2 more at (dp=2, pp=2) from it
        l1, (sd1, opt1), mesh = _par_mesh_run(dict(dp=2, tp=2), 3, x, y, start, sequence_parallel=True)
        l2, (sd2, opt2), _ = _par_mesh_run(dict(dp=2, pp=2), 2, x[3:], y[3:], sd1, opt1, micro_batches=2)
        # --tp-impl dtensor at dp=2 x tp=2 (FSDP2 on the dp dimension): 3 steps with SP from the start, then step 4
        # without SP from ours' 3-step state, and ours (dp=2 x pp=2) for step 4 from the DTensor run's state
        dt = dict(impl=D.DTensorTPModel)
        ld1, (sdd1, optd1), _ = _par_mesh_run(dict(dp=2, tp=2), 3, x, y, start, sequence_parallel=True, **dt)
        ld2, (sdd2, _), _ = _par_mesh_run(dict(dp=2, tp=2), 1, x[3:], y[3:], sd1, opt1, **dt)
        lo2, (sdo2, _), _ = _par_mesh_run(dict(dp=2, pp=2), 1, x[3:], y[3:], sdd1, optd1, micro_batches=2)
        # and a sixth at (tp=2, pp=2) with SP: TP-split pipeline stages
        l3, (sd3, _), mesh3 = _par_mesh_run(dict(tp=2, pp=2), 1, x[5:], y[5:], sd2, opt2, sequence_parallel=True,
                                            micro_batches=2)
        got = D.measure_plan_step(ref.config, mesh3, sp=True, batch=4, micro_batches=2)
        want = D.parallel_plan(ref.config, tp=2, pp=2, sp=True, batch=4, micro_batches=2)[mesh3.pp_rank]
        result = dict(coords=[mesh.dp_rank, mesh.pp_rank, mesh.tp_rank],
                      coords3=[mesh3.dp_rank, mesh3.pp_rank, mesh3.tp_rank],
                      weights6_diff=_par_max_diff(sd3, ref_states[5]),
                      plan_equal=all(got[k] == want[k] for k in ("params", "grads", "adamw", "comm")),
                      plan=[got["comm"], want["comm"]],
                      loss_diff=max(abs(a - b) for a, b in zip(l1 + l2 + l3, ref_losses)),
                      weights3_diff=_par_max_diff(sd1, ref_states[2]), weights5_diff=_par_max_diff(sd2, ref_states[4]),
                      moved=_par_max_diff(sd2, start), opt_names=len(opt1),
                      dtensor_loss_diff=max(abs(a - b) for a, b in zip(ld1 + ld2, ref_losses)),
                      dtensor_weights3_diff=_par_max_diff(sdd1, ref_states[2]),
                      dtensor_weights4_diff=_par_max_diff(sdd2, ref_states[3]),
                      ours_after_dtensor_diff=max(_par_max_diff(sdo2, ref_states[3]),
                                                  max(abs(a - b) for a, b in zip(lo2, ref_losses[3:]))),
                      dtensor_opt_names=len(optd1))
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        D.cleanup_distributed()


def test_ddp_mesh_dp2_tp2_then_dp2_pp2_then_tp2_pp2_and_dtensor_dp2_tp2_match_single_process_training(tmp_path):
    D.launch_local(_par_mesh_worker, 4, str(tmp_path))
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["loss_diff"] < 1e-10 and r["weights3_diff"] < 1e-10 and r["weights5_diff"] < 1e-10
        assert r["moved"] > 1e-3 and r["opt_names"] == len(_par_model().state_dict())
        assert r["weights6_diff"] < 1e-10 and r["plan_equal"], r["plan"]
        assert r["dtensor_loss_diff"] < 1e-10 and r["dtensor_weights3_diff"] < 1e-10
        assert r["dtensor_weights4_diff"] < 1e-10 and r["ours_after_dtensor_diff"] < 1e-10
        assert r["dtensor_opt_names"] == len(_par_model().state_dict())
    # rank = (d * pp + s) * tp + t: tp innermost
    assert [r["coords"] for r in results] == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]
    assert [r["coords3"] for r in results] == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_ddp_training_command_resumes_a_data_parallel_run_at_tp2_sp(tmp_path):
    # the command line: 1 plain step in this process (world size 1), then its checkpoint continued at --tp 2 --sp on
    # 2 spawned ranks for 2 more steps; the result is again a consolidated checkpoint of the full model
    import model as M
    base = _DDP_TRAIN_ARGS + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")]
    assert _ddp_in_process(base + ["--max-steps", "1", "--strategy", "ddp"]) == 0
    first = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    b = subprocess.run([sys.executable, D.__file__] + base + ["--nproc", "2", "--max-steps", "3", "--tp", "2", "--sp",
                                                              "--resume"],
                       capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert b.returncode == 0, b.stderr[-2000:]
    assert "mesh dp=1 x tp=2 x pp=1 +sp on 2 ranks" in b.stdout
    assert "resuming" in b.stdout and "at step 1" in b.stdout
    assert "step      3/3" in b.stdout and "step      1/" not in b.stdout
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["mesh"] == dict(dp=1, tp=2, pp=1, sp=True)
    plain = M.TransformerLM.from_config(ckpt["model_config"])
    plain.load_state_dict(ckpt["model"])                       # consolidated: the full model under its own names
    assert set(ckpt["optimizer_by_name"]) == set(ckpt["model"])
    assert ckpt["optimizer_by_name"]["layers.0.attn.q_proj.weight"]["step"] == 3   # DP's AdamW moments carried on
    assert max(float((ckpt["model"][k] - first["model"][k]).abs().max()) for k in ckpt["model"]) > 0


def test_ddp_plan_formulas_equal_a_measured_step(_par_results):
    for r in _par_get(_par_results, "plan"):
        for name, v in r.items():
            got, want = v["got"], v["want"]
            for k in ("params", "grads", "adamw"):
                assert got[k] == want[k], (name, k, got[k], want[k])
            assert got["comm"] == want["comm"], (name, got["comm"], want["comm"])
            assert got["activation_bytes"] > 0
            # the rank's tensors: weights, gradients, AdamW's two moments (float32), + AdamW's per-tensor step counters
            assert 16 * want["params"] <= got["state_bytes"] <= 16 * want["params"] + 1024, (name, got["state_bytes"])
            assert got["peak_rss"] > got["state_bytes"]
    # TP halves every split matrix: params per rank at tp=2 < dp's full copy; SP moves the same payload as TP
    r0 = _par_results[0]["plan"]
    assert r0["tp"]["got"]["params"] < r0["dp"]["got"]["params"]
    assert r0["tp"]["got"]["state_bytes"] <= 0.55 * r0["dp"]["got"]["state_bytes"]
    assert r0["tp_sp"]["got"]["activation_bytes"] < r0["tp"]["got"]["activation_bytes"]


def test_ddp_plan_command_prints_formulas(capsys):
    assert D.main(["plan", "--tp", "2", "--sp"]) == 0
    out = capsys.readouterr().out
    # GPT-2-small shape, 8 x 1024 tokens, 12 layers: (4 L + 2) B T d numbers each way = 50 x 8 x 1024 x 768 x 4 B
    assert "tp all-gather per step" in out and f"{50 * 8 * 1024 * 768 * 4 / 2**20:10.3f}" in out


def test_ddp_context_parallel_model_equals_single_process(_par_results):
    rs = _par_get(_par_results, "cp")
    for r in rs:
        assert r["loss_diff"] < 1e-12 and r["grad_diff"] < 1e-12
    assert all(0 < r["share"] < r["loss"] for r in rs)      # each rank's share is a part of the loss, not all of it


# ---- the --tp/--pp command runs train.train: evaluation, metrics.jsonl, checkpoints, grad accumulation, budget ----
def _mesh_cmd(base, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, D.__file__] + base + extra, capture_output=True, text=True, env=env,
                          timeout=240)


def _metrics(run_dir):
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl") if l.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "val"]


def test_ddp_mesh_command_trains_through_train_py(tmp_path):
    base = _DDP_TRAIN_ARGS + ["--data-dir", str(tmp_path / "data"), "--eval-interval", "2"]
    # one process, plain data parallelism, the same global batches: the reference losses
    assert _ddp_in_process(base + ["--out-dir", str(tmp_path / "dp"), "--max-steps", "6", "--strategy", "ddp"]) == 0
    ref, _ = _metrics(tmp_path / "dp")
    r = _mesh_cmd(base, ["--out-dir", str(tmp_path / "tp"), "--nproc", "2", "--tp", "2", "--max-steps", "4"])
    assert r.returncode == 0, r.stderr[-2000:]
    train_rows, val_rows = _metrics(tmp_path / "tp")
    losses = [row["loss"] for row in train_rows]
    # the same as the earlier compact --tp loop logged on this corpus (5.8324 5.8253 5.7088 5.7653), and as one process
    assert [round(l, 4) for l in losses] == [5.8324, 5.8253, 5.7088, 5.7653]
    assert max(abs(a - b["loss"]) for a, b in zip(losses, ref)) < 2e-5
    assert [v["step"] for v in val_rows] == [2, 4, 4] and val_rows[-1].get("final")   # periodic + final evaluation
    ckpt = torch.load(tmp_path / "tp" / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["mesh"] == dict(dp=1, tp=2, pp=1, sp=False)
    assert set(ckpt["optimizer_by_name"]) == set(ckpt["model"])
    # the same checkpoint continued by torch's DTensor TP with SP (--tp-impl dtensor --sp): steps 5 and 6 (with an
    # evaluation) equal the uninterrupted run's; step 6's loss follows step 5's update, which needs AdamW's moments
    shutil.copytree(tmp_path / "tp", tmp_path / "tpd")
    r = _mesh_cmd(base, ["--out-dir", str(tmp_path / "tpd"), "--nproc", "2", "--tp", "2", "--sp", "--tp-impl",
                         "dtensor", "--max-steps", "6", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tp=2 x pp=1 +sp on 2 ranks (DTensor)" in r.stdout
    dt_train, dt_val = _metrics(tmp_path / "tpd")
    assert [row["step"] for row in dt_train[-2:]] == [5, 6] and dt_val[-1]["step"] == 6 and dt_val[-1].get("final")
    assert max(abs(row["loss"] - ref[row["step"] - 1]["loss"]) for row in dt_train[-2:]) < 2e-5, (dt_train, ref)
    # the --tp 2 checkpoint continued by one process with plain data parallelism keeps AdamW's moments (re-keyed
    # by parameter name): steps 5 and 6 equal the uninterrupted run's (restarted moments would change both)
    assert _ddp_in_process(base + ["--out-dir", str(tmp_path / "tp"), "--max-steps", "6", "--strategy", "ddp",
                                   "--resume"]) == 0
    resumed = {row["step"]: row["loss"] for row in _metrics(tmp_path / "tp")[0]}
    assert max(abs(resumed[s] - ref[s - 1]["loss"]) for s in (5, 6)) < 2e-5, (resumed, ref)
    state = torch.load(tmp_path / "tp" / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    assert {int(st["step"]) for st in state.values()} == {6}


def test_ddp_mesh_command_pp_grad_accum_and_shared_budget(tmp_path):
    base = _DDP_TRAIN_ARGS + ["--data-dir", str(tmp_path / "data"), "--eval-interval", "2", "--grad-accum", "2"]
    assert _ddp_in_process(base + ["--out-dir", str(tmp_path / "dp"), "--max-steps", "3", "--strategy", "ddp"]) == 0
    ref, _ = _metrics(tmp_path / "dp")
    # --pp 2 (1F1B) under a wall-clock budget and no --max-steps: rank 0's clock decides, both ranks stop together
    r = _mesh_cmd(base, ["--out-dir", str(tmp_path / "pp"), "--nproc", "2", "--pp", "2", "--max-minutes", "0.25"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(time budget)" in r.stdout and "every rank stopped at step" in r.stdout
    train_rows, val_rows = _metrics(tmp_path / "pp")
    steps = int(r.stdout.split("every rank stopped at step ")[1].split()[0])
    assert steps >= 1 and train_rows[-1]["step"] == steps   # a slow machine may fit only one step in the budget
    # constant learning rate: the budgeted pipeline's first steps (up to 3) equal one process with grad accumulation
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(train_rows[:3], ref[:steps])) < 2e-5
    assert val_rows and val_rows[-1]["step"] == steps and val_rows[-1].get("final")
    ckpt = torch.load(tmp_path / "pp" / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == steps and ckpt["mesh"]["pp"] == 2 and ckpt["ddp"]["budget_spent"]


def test_ddp_plan_activation_formula_matches_the_measured_step(_par_results):
    # the saved-activation count (per layer per token: 6d + 2 + (4d + 5f + H)/tp, SP: 2d + (8d + 5f + H + 2)/tp, plus
    # the logits, final norm, RoPE tables and saved weights) against the bytes autograd really kept in the measured
    # step (float32: 4 bytes per number), GQA model: within 1% at tp, tp+sp and dp; the pipeline layout has no formula
    for r in _par_get(_par_results, "plan"):
        for name in ("tp", "tp_sp", "dp"):
            got, want = r[name]["got"]["activation_bytes"], r[name]["want"]["activations"] * 4
            assert abs(want / got - 1) < 0.01, (name, want, got)
        assert r["pp"]["want"]["activations"] is None
        assert r["tp_sp"]["want"]["activations"] < r["tp"]["want"]["activations"] < r["dp"]["want"]["activations"]



# ---- memory that is really split: what each mesh rank of the training command holds, counted from its tensors ----
_MEM_LAYOUTS = (("dp", 1, 1, "ours"), ("tp", 2, 1, "ours"), ("pp", 1, 2, "ours"), ("tp_dtensor", 2, 1, "dtensor"))


def _mem_split_worker(out_dir):
    rank, result = int(os.environ["RANK"]), {}
    try:
        for name, tp, pp, impl in _MEM_LAYOUTS:
            args = D.build_train_parser().parse_args(_DDP_TRAIN_ARGS + [
                "--data-dir", os.path.join(out_dir, "data"), "--out-dir", os.path.join(out_dir, name),
                "--max-steps", "3", "--eval-interval", "2"])
            s = D.train_mesh(D.config_for_strategy(args), tp=tp, pp=pp, tp_impl=impl, global_batch_size=8,
                             log=lambda *a, **k: None)
            result[name] = dict(state=s["state_bytes"], rss=s["peak_rss_bytes"], losses=s["losses"],
                                val=s["val"]["loss"], params=M.num_params(M.TransformerLM.from_config(
                                    torch.load(os.path.join(out_dir, name, "ckpt.pt"))["model_config"])))
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        D.cleanup_distributed()


def test_ddp_mesh_ranks_hold_only_their_shard_of_the_training_state(tmp_path):
    # the training command at dp=2, tp=2, pp=2 (and DTensor tp=2) on 2 ranks, with evaluations (which gather the
    # weights) between the steps: the largest training state any rank held at a step, counted from its tensors
    D.launch_local(_mem_split_worker, 2, str(tmp_path))
    r = json.load(open(tmp_path / "rank0.json"))
    assert "error" not in r, r.get("error")
    print("largest rank's training state, bytes (x dp's); peak RSS, MB:", {k: (v["state"], round(v["state"] / r["dp"][
        "state"], 3), round(v["rss"] / 2**20)) for k, v in r.items()})     # (-s shows the figures the README records)
    dp = r["dp"]["state"]
    # data parallelism holds weights, gradients and AdamW's two moments of every parameter: 16 bytes each at least
    assert dp >= 16 * r["dp"]["params"]
    for name in ("tp", "pp", "tp_dtensor"):
        assert r[name]["state"] <= 0.55 * dp, (name, r[name]["state"], dp)
        assert r[name]["rss"] > r[name]["state"] > 0
        # the same training: the shards are the full model's slices, the losses and the evaluation the same
        assert max(abs(a - b) for a, b in zip(r[name]["losses"], r["dp"]["losses"])) < 2e-5
        assert abs(r[name]["val"] - r["dp"]["val"]) < 2e-5
# ===== Stage 6: scaling.py =====
# IsoFLOPs and parametric fits against known laws, closed-form optimum, sweeps that
# resume, shard and branch (WSD) exactly, muP (train.py's switch), bad inputs. The isoflops_curves.json test needs
# the workspace data (SCRATCHLM_WORKSPACE; skips without it).


_SC_TRUE = (1.69, 406.4, 410.7, 0.34, 0.28)  # Hoffmann et al.'s published fit: E, A, B, alpha, beta


@pytest.fixture(scope="module")
def _sc_data(tmp_path_factory):
    """A tiny synthetic corpus through train.py's pipeline (shared by every sweep test)."""
    cfg = T.TrainConfig(data="synthetic", data_dir=str(tmp_path_factory.mktemp("sc_data")), synthetic_bytes=120_000,
                            synthetic_val_bytes=12_000, vocab_size=280, bpe_train_bytes=60_000)
    return T.prepare_data(cfg, log=lambda *a, **k: None)


def _sc_spec(**kw):
    """Two budgets x 3 sizes of tiny models (8-wide per depth), 16-token windows: each run is 10-100 steps."""
    base = dict(budgets=[1e8, 2e8], depths=[1, 2, 3], runs_per_budget=3, width_per_depth=8, head_dim=8,
                context_length=16, batch_size=4, warmup_iters=2, min_steps=8, synthetic_bytes=120_000,
                vocab_size=280, eval_tokens=256, tokens_per_param=5)
    base.update(kw)
    return SC.SweepSpec(**base)


def _sc_losses(folder):
    return {p.stem: json.loads(p.read_text())["final_loss"] for p in sorted((Path(folder) / "runs").glob("*.json"))}


# ---------------------------------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------------------------------
def test_scaling_parametric_fit_recovers_known_law():
    N, D, L = SC.synthetic_law_data(100, noise=0.003, seed=1)
    fit = SC.fit_parametric_law(N, D, L, n_bootstrap=8)
    E, A, B, al, be = _SC_TRUE
    assert abs(fit.alpha - al) < 0.03 and abs(fit.beta - be) < 0.03 and abs(fit.E - E) < 0.05
    # predictions, not just parameters: the fitted law reproduces the true one within 0.5% over the data
    true = E + A / N ** al + B / D ** be
    assert np.max(np.abs(fit.predict_loss(N, D) / true - 1)) < 0.005
    assert set(fit.se) == {"E", "A", "B", "alpha", "beta"} and all(v > 0 for v in fit.se.values())
    n_opt, _ = fit.optimal_allocation(1e22)
    n_true, _ = SC.compute_optimal_allocation(A, B, al, be, 1e22)
    assert abs(math.log(n_opt / n_true)) < 0.5  # within a factor 1.65 after 4 decades of extrapolation


def test_scaling_parametric_fit_with_known_E():
    # the synthetic corpus' entropy makes E a fact: held fixed, it stays exact and the rest is recovered
    N, D, L = SC.synthetic_law_data(60, noise=0.003, seed=4)
    fit = SC.fit_parametric_law(N, D, L, n_bootstrap=4, E=1.69)
    assert fit.E == pytest.approx(1.69, rel=1e-12) and fit.se["E"] < 1e-9
    assert abs(fit.alpha - 0.34) < 0.03 and abs(fit.beta - 0.28) < 0.03
    with pytest.raises(ValueError, match="fixed E"):
        SC.fit_parametric_law(N, D, L, E=-1.0)


def test_scaling_objective_gradient_matches_autograd():
    N, D, L = SC.synthetic_law_data(40, seed=2)
    data = tuple(torch.from_numpy(np.log(v)) for v in (N, D, L))
    theta = SC.init_grid()[::300].clone().requires_grad_(True)
    f = SC._objective(theta, *data, 1e-3)
    f.sum().backward()
    f2, g2 = SC._objective_and_grad(theta.detach(), *data, 1e-3)
    assert torch.allclose(f, f2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(theta.grad, g2, rtol=1e-9, atol=1e-9)


def test_scaling_huber_is_on_log_loss():
    # the objective by hand: Huber_delta(ln L_hat - ln L) summed over runs, for two parameter vectors
    N, D, L = SC.synthetic_law_data(30, noise=0.004, seed=5)
    data = tuple(torch.from_numpy(np.log(v)) for v in (N, D, L))
    theta = torch.tensor([[6.0, 6.0, 0.5, 0.34, 0.28], [5.0, 7.0, 0.4, 0.3, 0.3]], dtype=torch.float64)
    a, b, e, al, be = (theta[:, i].numpy()[:, None] for i in range(5))
    r = np.log(np.exp(e) + np.exp(a) / N ** al + np.exp(b) / D ** be) - np.log(L)
    hand = np.where(np.abs(r) < 1e-3, 0.5 * r * r, 1e-3 * (np.abs(r) - 0.5e-3)).sum(1)
    assert np.allclose(SC._objective(theta, *data, 1e-3).numpy(), hand, rtol=1e-12)
    assert np.allclose(SC._objective_and_grad(theta, *data, 1e-3)[0].numpy(), hand, rtol=1e-12)
    # a fit on log-losses is invariant to the units of the loss: 100 L gives the same residuals, so the same
    # alpha, beta and objective and 100x E (a fit on losses would see residuals 100x larger: another Huber fit)
    grid = SC.init_grid()[::4]
    f1, f2 = (SC.fit_parametric_law(N, D, s * L, n_bootstrap=0, grid=grid) for s in (1, 100))
    assert f2.objective == pytest.approx(f1.objective, rel=1e-6)
    assert f2.E / f1.E == pytest.approx(100, rel=2e-5) and f2.A / f1.A == pytest.approx(100, rel=1e-3)
    assert abs(f2.alpha - f1.alpha) < 2e-5 and abs(f2.beta - f1.beta) < 2e-5


def test_scaling_closed_form_allocation_matches_numerical_minimum():
    rng = np.random.default_rng(0)
    for _ in range(5):
        E, A, B = 1.5, 10 ** rng.uniform(2, 3), 10 ** rng.uniform(2, 3)
        al, be = rng.uniform(0.2, 0.5, 2)
        C = 10 ** rng.uniform(18, 24)
        # numerically: L(N, C / 6N) over a fine grid of ln N, refined around the best point
        x = np.linspace(math.log(1e3), math.log(C / 6 / 1e3), 200_001)
        loss = E + A * np.exp(-al * x) + B * (C / 6 / np.exp(x)) ** -be
        n_num = math.exp(x[np.argmin(loss)])
        n_cf, d_cf = SC.compute_optimal_allocation(A, B, al, be, C)
        assert abs(math.log(n_cf / n_num)) < 2e-3
        assert abs(6 * n_cf * d_cf / C - 1) < 1e-12


def test_scaling_isoflops_hand_table_argmin_and_parabola():
    # loss = 2 + (ln N - ln N*)^2 on each budget, with N* = 0.1 C^0.5 exactly (a grid containing N*)
    runs = []
    for C in (1e18, 1e20, 1e22):
        n_star = 0.1 * C ** 0.5
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            n = n_star * f
            runs.append(SC.make_run(f"C{C:g}-{f}", n, 2 + math.log(f) ** 2, budget=C))
    for method in ("argmin", "parabola"):
        fit = SC.fit_isoflops(runs, method, n_bootstrap=20)
        assert abs(fit.a - 0.5) < 1e-9 and abs(fit.k / 0.1 - 1) < 1e-6, method
        n, d = fit.predict(1e24)
        assert abs(n / (0.1 * 1e12) - 1) < 1e-6 and abs(d - 1e24 / (6 * n)) < 1e-3 * d
    # parabola interpolates between sizes: shift the table so N* falls between the trained sizes
    shifted = [SC.make_run(r.name, r.parameters, 2 + (math.log(r.parameters / (0.1 * r.budget ** 0.5)) - 0.3) ** 2,
                           budget=r.budget) for r in runs]
    par, arg = SC.fit_isoflops(shifted, "parabola", n_bootstrap=5), SC.fit_isoflops(shifted, "argmin", n_bootstrap=5)
    assert abs(par.k / (0.1 * math.exp(0.3)) - 1) < 1e-6          # exact vertex
    assert abs(arg.k / (0.1 * math.exp(0.3)) - 1) > 0.1            # quantized to a trained size


def test_scaling_isoflops_recovers_exponent_from_noisy_law():
    E, A, B, al, be = _SC_TRUE
    rng = np.random.default_rng(3)
    runs = []
    for C in (1e19, 3e19, 1e20, 3e20, 1e21):
        n_opt, _ = SC.compute_optimal_allocation(A, B, al, be, C)
        for f in np.exp(np.linspace(-1.5, 1.5, 9)):
            n = n_opt * f
            d = C / (6 * n)
            runs.append(SC.make_run("r", n, (E + A / n ** al + B / d ** be) * math.exp(0.002 * rng.standard_normal()),
                                    budget=C))
    fit = SC.fit_isoflops(runs, "parabola", n_bootstrap=50)
    assert abs(fit.a - be / (al + be)) < 0.03
    (lo, hi), _ = fit.interval(1e23)
    n_true = SC.compute_optimal_allocation(A, B, al, be, 1e23)[0]
    assert lo < hi and lo / 2 < n_true < hi * 2
    # resampling each budget's runs WITH replacement: the refits' exponents spread (~0.02 here); drawn without
    # replacement every replicate is the data itself and the interval collapses to a point
    assert 0.005 < np.std(fit.boot[:, 1]) < 0.1


def test_scaling_isoflops_three_runs_per_budget_says_why_no_interval(capsys):
    # with 3 runs per budget the only resamples keeping 3 sizes are permutations: no interval, and the reason
    runs = [SC.make_run(f"C{C:g}-{f}", 0.1 * C ** 0.5 * f, 2 + math.log(f * 1.1) ** 2, budget=C)
            for C in (1e18, 1e19, 1e20) for f in (0.5, 1.0, 2.0)]
    fit = SC.fit_isoflops(runs, "parabola", n_bootstrap=20)
    assert np.ptp(fit.boot[:, 1]) < 1e-9
    SC.print_fits(runs, {"parabola": fit}, None, predict_at=[1e22])
    out = capsys.readouterr().out
    assert "no interval: a budget has only 3 runs" in out and ">= 4 sizes" in out and "[" not in out


def test_scaling_isoflops_curves_file_needs_workspace():
    """Needs the workspace's data/isoflops_curves.json (CS336's 72 runs); skipped without it."""
    path = workspace("data", "isoflops_curves.json")
    if path is None:
        pytest.skip("data/isoflops_curves.json not in the workspace (SCRATCHLM_WORKSPACE)")
    runs = SC.load_runs(path)
    assert len(runs) == 72
    for m in ("argmin", "parabola"):
        fit = SC.fit_isoflops(runs, m, n_bootstrap=50)
        n, d = fit.predict(1e23)
        (lo, hi), _ = fit.interval(1e23)
        assert 0.4 < fit.a < 0.65 and lo <= n <= hi and 1e10 < n < 1e12
    par = SC.fit_parametric_law([r.parameters for r in runs], [r.tokens for r in runs], [r.loss for r in runs],
                                n_bootstrap=3)
    # these losses lie on one law of this family: the fit reproduces every run
    pred = par.predict_loss([r.parameters for r in runs], [r.tokens for r in runs])
    assert np.max(np.abs(pred / np.array([r.loss for r in runs]) - 1)) < 1e-4


# ---------------------------------------------------------------------------------------------------
# accounting and the depth dial
# ---------------------------------------------------------------------------------------------------
def test_scaling_depth_dial_and_accounting():
    import model as _sc_M
    for depth in (1, 4, 8):
        cfg = SC.model_config_for_depth(depth, 512, 64)
        assert cfg.num_layers == depth and cfg.d_model == 16 * depth and cfg.d_model // cfg.num_heads == 16
        m = _sc_M.TransformerLM.from_config(cfg)
        acc = SC.compute_accounting(cfg)
        assert acc["parameters"] == sum(p.numel() for p in m.parameters())
        assert acc["flops_6n"] == 6 * acc["parameters"]
    # tiny models: the free embedding lookup makes the exact count well below 6N; large ones approach it
    assert SC.compute_accounting(SC.model_config_for_depth(1, 512, 64))["exact_over_6n"] < 0.7
    assert abs(SC.compute_accounting(SC.model_config_for_depth(12, 512, 64))["exact_over_6n"] - 1) < 0.02


def test_scaling_plan_small_budget_keeps_the_sizes_it_can_serve():
    # 7.5e10 FLOPs at 1,024 tokens/step: depth 3 (N = 132,432) gets 7.5e10 / (6 N) / 1024 = 92.2 -> 90 steps, depth 4
    # (N = 266,816) only 45.7 < min_steps 50, so that budget keeps depths 1-3; 1.2e12 keeps 5 sizes, centred on
    # sqrt(C / (6 x 10)) = 141K in ln N (depth 1, 20K, is further from it than depth 6, 763K)
    spec = SC.SweepSpec(budgets=[7.5e10, 1.2e12], depths=list(range(1, 8)), runs_per_budget=5, tokens_per_param=10)
    plan = SC.plan_sweep(spec, 512)
    by = {c: [p.depth for p in plan if p.budget == c] for c in spec.budgets}
    assert by == {7.5e10: [1, 2, 3], 1.2e12: [2, 3, 4, 5, 6]}
    assert [p.steps for p in plan if p.budget == 7.5e10] == [620, 215, 90]
    for p in plan:  # every run spends its budget (to whole decay steps) and has a whole number of decay steps
        assert p.steps >= spec.min_steps and (p.steps * 0.2).is_integer()
        assert 6 * p.parameters * p.steps * 1024 == pytest.approx(p.budget, rel=0.03)
    # two servable sizes are not a parabola: the budget is refused, naming it
    with pytest.raises(ValueError, match="budget 3.75e\\+10 FLOPs is too small: only 2 of"):
        SC.plan_sweep(SC.dataclasses.replace(spec, budgets=[3.75e10, 1.2e12], depths=[1, 2, 4, 5, 6, 7]), 512)


# ---------------------------------------------------------------------------------------------------
# sweeps: resume after a kill, corrupt results, shards, branched WSD == separate runs
# ---------------------------------------------------------------------------------------------------
def test_scaling_sweep_killed_resumes_shards_merge_and_branches_match(_sc_data, tmp_path):
    spec = _sc_spec()
    full = tmp_path / "full"

    class _Kill(Exception):
        pass

    def kill(key):
        raise _Kill(key)

    with pytest.raises(_Kill):  # "killed" right after the first run's result was written
        SC.run_sweep(spec, full, _sc_data, after_run=kill, log=lambda *a, **k: None)
    first = sorted((full / "runs").glob("*.json"))
    assert len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    # a half-written result file (e.g. a copy cut short) is detected and rerun, never read as a result
    plan = SC.plan_sweep(spec, _sc_data.tokenizer.vocab_size)
    (full / "runs" / f"{plan[1].key}.json").write_text('{"spec": "x", "final_loss": 1.2')
    msgs = []
    st = SC.run_sweep(spec, full, _sc_data, log=msgs.append)
    assert st["skipped"] == [first[0].stem] and len(st["ran"]) == len(plan) - 1
    assert first[0].stat().st_mtime_ns == mtime
    assert any("incomplete or corrupt" in m and plan[1].key in m for m in msgs)
    # shards 0/2 and 1/2 (0-based, as data.py) in separate folders merge to the same runs as the single sweep
    for k in (0, 1):
        SC.run_sweep(spec, tmp_path / f"shard{k}", _sc_data, shard=(k, 2), log=lambda *a, **k: None)
    assert sorted(p.stem for p in (tmp_path / "shard0" / "runs").glob("*.json")) == [p.key for p in plan[::2]]
    merged = {r.name.split("/")[-1]: r.loss for r in SC.collect_results([tmp_path / "shard0", tmp_path / "shard1"])}
    assert merged == _sc_losses(full)
    assert SC.fit_isoflops(SC.collect_results([tmp_path / "shard0", tmp_path / "shard1"]), "argmin").k == \
        SC.fit_isoflops(SC.collect_results([full]), "argmin").k
    # branched mode, killed after its first branch and resumed: the finished branch is kept (not retrained), the
    # rest run, and every decay branched off one trunk per size IS the separate run (same batches, same lr)
    br = tmp_path / "branched"
    with pytest.raises(_Kill):
        SC.run_sweep(spec, br, _sc_data, mode="branched", after_run=kill, log=lambda *a, **k: None)
    (done,) = (br / "runs").glob("*.json")
    mtime = done.stat().st_mtime_ns
    st = SC.run_sweep(spec, br, _sc_data, mode="branched", log=lambda *a, **k: None)
    assert st["skipped"] == [done.stem] and len(st["ran"]) == len(plan) - 1 and done.stat().st_mtime_ns == mtime
    assert _sc_losses(br) == pytest.approx(_sc_losses(full), rel=1e-6)
    assert st["steps_trained"] < st["steps_separate"]
    again = SC.run_sweep(spec, br, _sc_data, mode="branched", log=lambda *a, **k: None)
    assert again["ran"] == [] and again["steps_trained"] == 0
    # a different spec in the same folder is refused (its results would mix)
    with pytest.raises(ValueError, match="different sweep"):
        SC.run_sweep(_sc_spec(seed=7), full, _sc_data, log=lambda *a, **k: None)


def test_scaling_verify_predicts_first_writes_verify_json_and_resumes(_sc_data, tmp_path, monkeypatch):
    spec, out = _sc_spec(), tmp_path / "v"
    SC.run_sweep(spec, out, _sc_data, log=lambda *a, **k: None)
    runs = SC.collect_results([out])
    N, D, L = ([getattr(r, k) for r in runs] for k in ("parameters", "tokens", "loss"))
    iso = SC.fit_isoflops(runs, "argmin", n_bootstrap=20)  # (the tiny sweep's curves need not be convex)
    free = SC.fit_parametric_law(N, D, L, n_bootstrap=4, grid=SC.init_grid()[::4])
    fixed = SC.fit_parametric_law(N, D, L, n_bootstrap=4, grid=SC.init_grid()[::4], E=0.8 * min(L))
    kw = dict(iso=iso, par=free, par_known=fixed)

    class _Kill(Exception):
        pass

    def killed(*a, **k):
        raise _Kill

    # killed during the verification run: the prediction was already printed and written, `actual` still null
    msgs = []
    with monkeypatch.context() as m:
        m.setattr(SC.T, "train", killed)
        with pytest.raises(_Kill):
            SC.verify_prediction(spec, out, _sc_data, runs, 2.0, log=msgs.append, **kw)
    v = json.loads((out / "verify.json").read_text())
    assert v["actual"] is None and v["fixed"]["E"] == pytest.approx(0.8 * min(L))
    assert v["free"]["predicted"] == pytest.approx(float(free.predict_loss(v["parameters"], v["tokens"])))
    assert any("predicted loss with E free" in x for x in msgs) and any("with E fixed" in x for x in msgs)
    # rerun: predicted again, then trained; both laws checked against the one actual loss
    msgs = []
    res = SC.verify_prediction(spec, out, _sc_data, runs, 2.0, log=msgs.append, **kw)
    first = lambda text: next(i for i, x in enumerate(msgs) if text in x)
    assert first("predicted loss with E free") < first("training") < first("actual")
    v = json.loads((out / "verify.json").read_text())
    assert v["complete"] and v["actual"] == res["actual"] and math.isfinite(v["actual"]) and v["actual"] > 0
    for name in ("free", "fixed"):
        (lo, hi), p = v[name]["interval"], v[name]["predicted"]
        assert lo <= hi and v[name]["rel_error"] == pytest.approx((p - v["actual"]) / v["actual"])
        assert v[name]["inside"] == (lo <= v["actual"] <= hi)
    # a third call trains nothing: the actual loss is read back
    monkeypatch.setattr(SC.T, "train", killed)
    assert SC.verify_prediction(spec, out, _sc_data, runs, 2.0, log=msgs.append, **kw)["actual"] == res["actual"]


def test_scaling_sweep_lock_refuses_a_second_process(_sc_data, tmp_path):
    out = tmp_path / "locked"
    code = f"import sys, time, scaling\nwith scaling.sweep_lock({str(out)!r}):\n    print('held', flush=True)\n" \
           "    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(SC.__file__).resolve().parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by another sweep \\(pid {holder.pid}\\)"):
            SC.run_sweep(_sc_spec(), out, _sc_data, log=lambda *a, **k: None)
        assert not (out / "runs").exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    # its owner killed (-9: no cleanup), the lock is free again; re-entrant within one process, and released
    with SC.sweep_lock(out):
        assert (out / ".lock").read_text() == str(os.getpid())
        with SC.sweep_lock(out):
            pass
        assert out.resolve() in SC._HELD
    assert not SC._HELD
    with SC.sweep_lock(out):
        pass


def test_scaling_fit_reports_bad_runs_and_fits_the_rest(tmp_path, capsys):
    rows = [dict(parameters=0.1 * C ** 0.5 * f, compute_budget=C, final_loss=2 + math.log(f * 1.1) ** 2)
            for C in (1e18, 1e19) for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    rows[3]["parameters"], rows[7]["final_loss"] = -5, True
    (tmp_path / "r.json").write_text(json.dumps(rows))
    assert SC.main(["fit", str(tmp_path / "r.json"), "--no-parametric", "--bootstrap", "10",
                    "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "skipped: r.json run 3: parameters = -5 must be a finite positive number" in out
    assert "skipped: r.json run 7: final_loss = True is a boolean" in out and "2 runs skipped, 8 fitted" in out
    assert "8 runs at 2 budgets" in out and (tmp_path / "p.png").exists()
    # the same in a sweep folder: the bad result file is named and left out of the fit
    (tmp_path / "sw" / "runs").mkdir(parents=True)
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"key": "k"}))
    for i, r in enumerate(rows[:2]):
        res = dict(spec="k", key=f"r{i}", tokens=r["compute_budget"] / (6 * r["parameters"]), complete=True, **r)
        (tmp_path / "sw" / "runs" / f"r{i}.json").write_text(json.dumps(dict(res, parameters=-1.0) if i else res))
    msgs = []
    assert len(SC.collect_results([tmp_path / "sw"], warn=msgs.append)) == 1
    assert len(msgs) == 1 and "r1.json" in msgs[0] and "parameters = -1.0" in msgs[0] and "left out" in msgs[0]


def test_scaling_fit_warns_on_one_budget_and_few_runs():
    msgs = []
    SC._warn_design([SC.make_run(f"r{i}", 10 ** (6 + i / 2), 3.0 - i / 10, budget=1e18) for i in range(6)], msgs.append)
    assert len(msgs) == 2 and "same compute budget (1e+18 FLOPs)" in msgs[0] and "6 runs for the" in msgs[1]
    msgs = []
    SC._warn_design([SC.make_run(f"r{i}", 10 ** (6 + i % 5), 3.0, budget=10 ** (18 + i // 5)) for i in range(10)],
                    msgs.append)
    assert msgs == []


def test_scaling_bare_command_runs_sweep_verify(monkeypatch, capsys):
    # `python scaling.py` is what the README's quick start says: the default sweep, fit, predict, verify
    seen = {}
    monkeypatch.setattr(SC, "sweep_main", lambda args: seen.update(vars(args)))
    assert SC.main([]) == 0
    assert seen["cmd"] == "sweep" and seen["verify"] and seen["out"] == "runs/scaling" and seen["shard"] is None
    assert SC._spec_from_args(SC.argparse.Namespace(**seen)) == SC.SweepSpec()
    assert "runs/scaling" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# muP
# ---------------------------------------------------------------------------------------------------
def test_scaling_mup_scales_head_init_and_per_layer_lr():
    # muP lives in train.py (mup_base_width); lr-transfer sets it. Same checks as when it was scaling's hooks.
    cfg = T.TrainConfig(d_model=64, num_layers=2, num_heads=4, context_length=16, optimizer="adamw", lr=1e-2,
                            mup_base_width=16)
    sp = T.build_model(cfg, 300)
    mup_model = T.build_model(cfg, 300)  # same seed: same weights before the muP init
    T.mup_init_(mup_model, cfg)
    assert torch.allclose(mup_model.lm_head.weight, sp.lm_head.weight / 4)
    assert torch.equal(mup_model.layers[0].attn.q_proj.weight, sp.layers[0].attn.q_proj.weight)
    opt = T.build_optimizer(mup_model, cfg)
    lr_of = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(mup_model.layers[0].ffn.w1.weight)] == pytest.approx(1e-2 / 4)
    assert lr_of[id(mup_model.lm_head.weight)] == pytest.approx(1e-2 / 4)
    assert lr_of[id(mup_model.token_embeddings.weight)] == pytest.approx(1e-2)
    assert len(lr_of) == len(list(mup_model.parameters()))
    # at the base width muP is the standard parametrization; with muP off the weights are left alone
    same = T.build_model(cfg, 300)
    T.mup_init_(same, T.TrainConfig(d_model=64, optimizer="adamw", mup_base_width=64))
    T.mup_init_(sp, T.TrainConfig(d_model=64, optimizer="adamw"))
    assert torch.equal(same.lm_head.weight, sp.lm_head.weight)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
_SC_OK = {"parameters": 1e6, "compute_budget": 1e18, "final_loss": 3.0}
_SC_CSV = dict(n_col="n", c_col="c", loss_col="loss")
_SC_FILES = {"neg.json": json.dumps([_SC_OK, dict(_SC_OK, parameters=-5)]),
             "nan.json": json.dumps([dict(_SC_OK, final_loss=float("nan"))]),
             "notobj.json": json.dumps([_SC_OK, "x"]), "cut.json": '[{"parameters": 1e6, "compute_bu',
             "short.csv": "n,c,loss\n1e6,1e18,3.0\n2e6,1e18\n", "abc.csv": "n,c,loss\n1e6,1e18,abc\n"}


def _sc_three_sizes():
    return [SC.make_run(f"r{i}", 10 ** (6 + i), 3.0, budget=1e18) for i in range(3)]


# (a call on the folder of _SC_FILES -> (exception, pattern)) or (argv -> a fragment of the one stderr line)
_SC_ERROR_CASES = [
    (lambda d: SC.load_runs(d / "neg.json"), (ValueError, "run 1: parameters")),
    (lambda d: SC.load_runs(d / "nan.json"), (ValueError, "run 0: final_loss")),
    (lambda d: SC.load_runs(d / "notobj.json"), (ValueError, "run 1 is not an object")),
    (lambda d: SC.load_runs(d / "cut.json"), (ValueError, "not valid JSON")),
    (lambda d: SC.load_runs(d / "short.csv", **_SC_CSV), (ValueError, "short.csv:3")),
    (lambda d: SC.load_runs(d / "short.csv", **dict(_SC_CSV, n_col="params")), (ValueError, "columns")),
    (lambda d: SC.load_runs(d / "abc.csv", **_SC_CSV), (ValueError, "abc.csv:2: final_loss")),
    (lambda d: SC.load_runs(d / "missing.json"), (FileNotFoundError, "does not exist")),
    (lambda d: SC.fit_isoflops(_sc_three_sizes()), (ValueError, ">= 2 compute budgets")),
    (lambda d: SC.fit_isoflops(_sc_three_sizes() + [SC.make_run("lonely", 1e6, 3.0, budget=1e19),
                                                    SC.make_run("lonely2", 2e6, 2.9, budget=1e19)]),
     (ValueError, "budget 1e\\+19 has runs at 2 model sizes.*lonely")),
    (lambda d: SC.fit_parametric_law([1e6, 2e6, 3e6], [1e9] * 3, [3.0] * 3), (ValueError, "only 3 runs")),
    (lambda d: SC.plan_sweep(_sc_spec(budgets=[1e6, 2e8]), 280), (ValueError, "too small")),
    (lambda d: SC.SweepSpec(budgets=[1e11]), (ValueError, ">= 2 budgets")),
    (lambda d: SC.SweepSpec(runs_per_budget=2), (ValueError, "runs_per_budget must be >= 3")),
    (lambda d: SC.SweepSpec(budgets=[1e11, float("inf")]), (ValueError, "finite positive")),
    (lambda d: SC.SweepSpec(flops="7nd"), (ValueError, "flops must be")),
    (lambda d: SC.SweepSpec(optimizer="soap"), (ValueError, "optimizer must be")),
    (lambda d: SC.make_run("r", 1e6, True, budget=1e18), (ValueError, "final_loss = True is a boolean")),
    (lambda d: SC.shard_filter([1, 2], (2, 2)), (ValueError, "0 <= K < N")),
    (["sweep", "--shard", "3/2"], "0 <= K < N (shards count from 0)"),
    (["sweep", "--shard", "2/2"], "0 <= K < N"),
    (["sweep", "--shard=-1/2"], "0 <= K < N"),
    (["sweep", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["sweep", "--verify-factor", "0"], "--verify-factor must be a finite number > 0"),
    (["sweep", "--decay-fraction", "1.5"], "decay_fraction must be in [0, 1), got 1.5"),
    (["sweep", "--lr", "-1"], "lr must be a finite number > 0, got -1"),
    (["sweep", "--eval-tokens", "0"], "eval_tokens must be at least one window"),
    (["sweep", "--head-dim", "24"], "multiple of head_dim"),
    (["sweep", "--vocab-size", "100"], "vocab_size must be >= 257"),
    (["fit", "x.json", "--bootstrap", "0"], "--bootstrap must be >= 2, got 0"),
    (["fit", "x.json", "--predict=-1"], "--predict must be finite positive FLOP budgets"),
    (["lr-transfer", "--widths", "20"], "--widths must be multiples of 16"),
    (["lr-transfer", "--steps", "0"], "--steps must be >= 1"),
    (["sweep", "--budgets", "1e11,x"], "comma-separated"),
    (["sweep", "--optimizer", "soap"], "optimizer must be"),
    (["fit", "missing.json"], "does not exist"),
]


@pytest.fixture(scope="module")
def sc_error_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sc_errors")
    for name, text in _SC_FILES.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("case, expected", _SC_ERROR_CASES,
                         ids=[f"call{i}" if callable(c) else " ".join(c) for i, (c, _) in enumerate(_SC_ERROR_CASES)])
def test_scaling_error_paths(sc_error_dir, case, expected, monkeypatch, capsys):
    if callable(case):
        exc, pattern = expected
        with pytest.raises(exc, match=pattern):
            case(sc_error_dir)
        return
    # usage errors and bad input both end as one line on stderr, exit status 2, before any data is prepared
    # (in-process: an unexpected exception would fail the test with its traceback)
    monkeypatch.chdir(sc_error_dir)
    with pytest.raises(SystemExit) as e:
        SC.main(case)
    err = capsys.readouterr().err
    assert e.value.code == 2, (case, err)
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (sc_error_dir / "data_cache").exists() and not (sc_error_dir / "runs").exists()


def test_scaling_cli_sweep_flags_are_sweepspec_fields():
    # every SweepSpec field is a sweep flag with the field's default; the spec a command line builds is the one
    # its --help shows
    p = SC.get_parser()
    assert SC._spec_from_args(p.parse_args(["sweep"])) == SC.SweepSpec()
    args = p.parse_args(["sweep", "--budgets", "1e11,2e11", "--runs-per-budget", "4", "--muon-lr", "0.01"])
    assert SC._spec_from_args(args) == SC.SweepSpec(budgets=[1e11, 2e11], runs_per_budget=4, muon_lr=0.01)
    assert p.parse_args(["bench"]).runs is None and p.parse_args(["bench", "--runs", "f.json"]).runs == "f.json"
# ===== Stage 7: data.py =====
# extraction, language ID, PII masks, harmful/quality filters, Gopher rules, exact-line
# and MinHash dedup (vs datasketch), corrupt input, killed-and-resumed and sharded pipeline runs, downloads.


_DATA_ROOT = Path(DA.__file__).resolve().parent


@pytest.fixture(scope="module")
def data_crawl(tmp_path_factory):
    """A tiny synthetic crawl (4 WARC files, bad records included) and its single-job pipeline result."""
    base = tmp_path_factory.mktemp("data_crawl")
    truth = DA.write_synthetic_crawl(str(base / "crawl"), pages=80, files=4, seed=5)
    cfg = DA.PipelineConfig()
    report = DA.run_pipeline(truth["files"], str(base / "single"), cfg, workers=1, vocab_size=300, progress=False)
    return dict(base=base, truth=truth, report=report, cfg=cfg)


def _data_docs(out):
    return (Path(out) / "documents.jsonl").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# extraction and language ID
# ---------------------------------------------------------------------------------------------------
def test_data_extract_hand_made_html():
    page = (b"<html><head><title>T</title><script>var secret = 1;</script><style>p {color: red}</style></head>"
            b"<body><h1>Hello &amp; welcome</h1><p>First <b>bold</b> paragraph.</p><ul><li>one</li><li>two</li>"
            b"</ul></body></html>")
    text = DA.extract_text_from_html_bytes(page)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    assert "Hello & welcome" in lines and "First bold paragraph." in lines
    assert "secret" not in text and "color" not in text
    assert any(l.endswith("one") for l in lines) and any(l.endswith("two") for l in lines)
    # Not UTF-8: the declared (or detected) charset decodes it.
    latin = "<p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e</p>".encode("cp1252")
    assert DA.extract_text_from_html_bytes(latin, "windows-1252").strip() == "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"
    assert "Caf\u00e9" in DA.extract_text_from_html_bytes(latin)


def test_data_language_id_short_samples():
    samples = {"en": "The weather is lovely today and we are going to the park.",
               "fr": "Il fait beau aujourd'hui et nous allons au parc.",
               "de": "Das Wetter ist heute sch\u00f6n und wir gehen in den Park.",
               "es": "Hace buen tiempo hoy y vamos al parque.",
               "zh": "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u3002",
               "ru": "\u0421\u0435\u0433\u043e\u0434\u043d\u044f \u0445\u043e\u0440\u043e\u0448\u0430\u044f "
                     "\u043f\u043e\u0433\u043e\u0434\u0430, \u0438 \u043c\u044b \u0438\u0434\u0451\u043c "
                     "\u0432 \u043f\u0430\u0440\u043a.",
               "ja": "\u4eca\u65e5\u306f\u5929\u6c17\u304c\u826f\u3044\u306e\u3067\u516c\u5712\u306b\u884c\u304d"
                     "\u307e\u3059\u3002"}
    for lang, text in samples.items():
        got, score = DA.identify_language(text + "\n" + text)  # newlines must not cut the input
        assert got == lang, (lang, got, score)
        assert 0.5 < score <= 1.0


# ---------------------------------------------------------------------------------------------------
# PII masking: a table of positives (with the number masked) and negatives
# ---------------------------------------------------------------------------------------------------
_DATA_PII = [
    (DA.mask_emails, "mail jane.doe@example.com today", "mail |||EMAIL_ADDRESS||| today", 1),
    (DA.mask_emails, "a+b_c@mail.uni.edu, x@y.org.", "|||EMAIL_ADDRESS|||, |||EMAIL_ADDRESS|||.", 2),
    (DA.mask_emails, "user at example dot com", "user at example dot com", 0),  # known miss, by design
    (DA.mask_emails, "twitter @handle and a@b", "twitter @handle and a@b", 0),
    (DA.mask_phone_numbers, "call 555-123-4567 now", "call |||PHONE_NUMBER||| now", 1),
    (DA.mask_phone_numbers, "(283) 182-3829", "|||PHONE_NUMBER|||", 1),
    (DA.mask_phone_numbers, "(283)-182-3829", "|||PHONE_NUMBER|||", 1),
    (DA.mask_phone_numbers, "283.182.3829 or 2831823829", "|||PHONE_NUMBER||| or |||PHONE_NUMBER|||", 2),
    (DA.mask_phone_numbers, "+1 283 182 3829", "|||PHONE_NUMBER|||", 1),
    (DA.mask_phone_numbers, "call 1-555-123-4567.", "call |||PHONE_NUMBER|||.", 1),  # the leading 1 goes too
    (DA.mask_phone_numbers, "1 (555) 123-4567 or +1 (555) 123-4567", "|||PHONE_NUMBER||| or |||PHONE_NUMBER|||", 2),
    (DA.mask_phone_numbers, "in 2024 we sold 12345 units", "in 2024 we sold 12345 units", 0),
    (DA.mask_phone_numbers, "id 28318238291234", "id 28318238291234", 0),  # too many digits
    (DA.mask_ips, "server 192.168.0.1 is up", "server |||IP_ADDRESS||| is up", 1),
    (DA.mask_ips, "0.0.0.0 and 255.255.255.255.", "|||IP_ADDRESS||| and |||IP_ADDRESS|||.", 2),
    (DA.mask_ips, "256.1.1.1 and 1.2.3 and 1.2.3.4.5", "256.1.1.1 and 1.2.3 and 1.2.3.4.5", 0),
]


@pytest.mark.parametrize("fn,text,want,count", _DATA_PII)
def test_data_pii_masking_table(fn, text, want, count):
    assert fn(text) == (want, count)


# ---------------------------------------------------------------------------------------------------
# Gopher rules at each boundary
# ---------------------------------------------------------------------------------------------------
def test_data_gopher_rules_at_boundaries():
    ok = lambda words: " ".join(words)
    assert DA.gopher_quality_filter(ok(["word"] * 50)) and not DA.gopher_quality_filter(ok(["word"] * 49))
    assert DA.gopher_quality_filter(ok(["word"] * 100_000)) and not DA.gopher_quality_filter(ok(["word"] * 100_001))
    assert DA.gopher_quality_filter(ok(["abc"] * 60))  # mean length exactly 3
    assert not DA.gopher_quality_filter(ok(["ab"] * 30 + ["abc"] * 30))  # 2.5
    assert DA.gopher_quality_filter(ok(["a" * 10] * 60)) and not DA.gopher_quality_filter(ok(["a" * 11] * 60))
    # ellipsis lines: 3 of 10 (30%) passes, 4 of 10 fails
    lines = lambda k: "\n".join(("word " * 9 + ("more..." if i < k else "end")) for i in range(10))
    assert DA.gopher_quality_filter(lines(3)) and not DA.gopher_quality_filter(lines(4))
    # only an ellipsis at a line's END counts ("..." or the one character U+2026); one inside a line does not
    inside = "\n".join("word " * 4 + "wait... then " + "word " * 4 + "end" for _ in range(10))
    assert DA.gopher_quality_filter(inside)
    unicode_end = lambda k: "\n".join(("word " * 9 + ("more\u2026" if i < k else "end")) for i in range(10))
    assert DA.gopher_quality_filter(unicode_end(3)) and not DA.gopher_quality_filter(unicode_end(4))
    # alphabetic words: 80% passes, 79% fails
    assert DA.gopher_quality_filter(ok(["word"] * 80 + ["1234"] * 20))
    assert not DA.gopher_quality_filter(ok(["word"] * 79 + ["1234"] * 21))
    # repetition switch: the same line over and over passes the basic rules, fails the repetition rules
    rep = "\n".join(["the quick brown foxes jumped over seven lazy dogs"] * 10)
    assert DA.gopher_quality_filter(rep) and not DA.gopher_quality_filter(rep, repetition=True)
    prose = " ".join(f"w{i}ord" for i in range(200))
    assert DA.gopher_quality_filter(prose, repetition=True)


# ---------------------------------------------------------------------------------------------------
# classifiers
# ---------------------------------------------------------------------------------------------------
def test_data_harmful_classifiers_on_labelled_examples():
    toxic = ["You are a stupid idiot and everyone hates you.", "Shut up, you worthless moron."]
    clean = ["The museum opens at nine and closes at five.", "Thank you for the lovely dinner last night."]
    for t in toxic:
        label, score = DA.classify_toxic_speech(t)
        assert label == "toxic" and 0.5 <= score <= 1
    for t in clean:
        label, score = DA.classify_toxic_speech(t)
        assert label == "non-toxic" and 0.5 <= score <= 1
        assert DA.classify_nsfw(t)[0] == "non-nsfw"
    assert DA.classify_nsfw(" ".join(DA.NSFW_LINES))[0] == "nsfw"
    medical = "Breast cancer screening is recommended for women over forty. " * 5 + "Sex differences matter."
    assert DA.classify_nsfw(medical)[0] == "non-nsfw"  # one word in a long text is not porn


# Obfuscated forms and the word each hides: masks, leetspeak, spelled out, stretched, and mixed with edges.
_DATA_OBFUSCATED = [
    ("f*ck off", "fuck off"), ("sh*t happens", "shit happens"), ("f**k", "fuck"), ("f*** you", "fuck you"),
    ("kiss my a**", "kiss my ass"), ("sh#t", "shit"), ("f--k", "fuck"), ("(F*CK!)", "(fuck!)"),  # masks
    ("b!tch", "bitch"), ("@ss", "ass"), ("a$$hole", "asshole"), ("$hit", "shit"), ("sh1t", "shit"),  # leetspeak
    ("p0rn", "porn"), ("s3x", "sex"), ("c0ck", "cock"), ("id!ot", "idiot"), ("m0r0n", "moron"),
    ("f u c k", "fuck"), ("f.u.c.k", "fuck"), ("s-h-i-t", "shit"), ("f*u*c*k", "fuck"),  # spelled out
    ("you are a f u c k i n g idiot", "you are a fucking idiot"), ("p o r n", "porn"),
    ("fuuuuck", "fuck"), ("shiiiiit", "shit"), ("sexxxy", "sexy"), ("p0000rn", "porn"),  # stretched
]
# Innocent text with asterisks, at-signs, digits and symbols: it must come back exactly as written.
_DATA_INNOCENT = [
    "See the footnote*", "Sex* differences are listed in Table 2.", "**bold** and *italic* and ***both***",
    "**Note:** read the notes", "mail jane@example.com or @jane", "costs $19.99, or $5 on sale", "C3PO and R2D2",
    "l33t = True  # a code variable", "x = a*b + c*d", "def __init__(self): a_s = snake_case", "Galaxy A55",
    "B52, 4x4, MP3, H2O, 1337, h4x0r", "Sooo good, hmmm", "U.S.A., e.g., i.e.", "#hashtag", "50% off",
    "C# and F# and C++", "Essex", "a cocktail at Dickens' house", "assess the class", "a t-shirt, so-called",
    "I said--see-- no", "1 2 3 4", "a b c", "!important", "Answer: **a** or *b*", "volumes A-S and T-Z",
]


@pytest.mark.parametrize("text,plain", _DATA_OBFUSCATED)
def test_data_undo_obfuscation_recovers_the_hidden_word(text, plain):
    assert DA.undo_obfuscation(text) == plain


@pytest.mark.parametrize("text", _DATA_INNOCENT)
def test_data_undo_obfuscation_leaves_innocent_symbols_alone(text):
    assert DA.undo_obfuscation(text) == text


def test_data_harmful_classifiers_see_through_obfuscation():
    # Each text is caught with the normalization and missed without it (the miss the normalization exists for);
    # innocent text full of symbols stays clean with it.
    nsfw = "Free p0rn and xxx s3x cams, h0rny n@ked girls, b00bs and p*ssy"
    assert DA.classify_nsfw(nsfw, deobfuscate=False)[0] == "non-nsfw"
    assert DA.classify_nsfw(nsfw)[0] == "nsfw"
    toxic = "Sh1t, you are a f u c k i n g m0r0n"  # the SVM reads "f*ck" as is, but not leetspeak or spacing
    assert DA.classify_toxic_speech(toxic, deobfuscate=False)[0] == "non-toxic"
    assert DA.classify_toxic_speech(toxic)[0] == "toxic"
    p = DA.profanity_probs([toxic, toxic], deobfuscate=False)
    assert DA.profanity_probs([toxic])[0] > 0.5 > p.max()  # the batch path normalizes too
    for text in _DATA_INNOCENT:
        assert DA.classify_nsfw(text)[0] == "non-nsfw" and DA.classify_toxic_speech(text)[0] == "non-toxic", text


def test_data_pipeline_drops_obfuscated_pages():
    # filter_documents normalizes once and hands the plain text to both classifiers: these two pages are only
    # caught that way (each is missed by its classifier without the normalization).
    story = ("The village market opens every Saturday morning, and the farmers bring fresh bread, apples and "
             "cheese from the hills. ")
    texts = [story * 3, story * 2 + "Free p0rn, s3x cams, h0rny n@ked girls, b00bs and p*ssy videos all day long.",
             story * 2 + "Sh1t, you are a f u c k i n g m0r0n and a l0ser, g0 away."]
    assert DA.classify_nsfw(texts[1], deobfuscate=False)[0] == "non-nsfw"
    assert DA.classify_toxic_speech(texts[2], deobfuscate=False)[0] == "non-toxic"
    assert [reason for _, reason, _ in DA.filter_documents(texts, DA.PipelineConfig())] == ["", "nsfw", "toxic"]


def test_data_heldout_harmful_set_is_labelled_and_scored():
    rows = DA.harmful_heldout()
    assert len(rows) >= 100 and {g for g, _, _, _ in rows} == set(DA.HARMFUL_GROUPS)
    assert all(t in (0, 1) and n in (0, 1) and text for _, t, n, text in rows)
    res = DA.bench_harmful_heldout()
    for name in ("toxic", "nsfw"):
        for when in ("before", "after"):
            r = res[name][when]
            assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["truth"] >= 10
    assert res["toxic"]["after"]["truth"] == res["toxic"]["before"]["truth"]  # one labelled set, two runs


def test_data_quality_classifier_separates_and_round_trips(tmp_path):
    pos = [" ".join(f"the river {w} flows past the old mill and town" for w in ("calm", "wide", "slow")) + f" {i}"
           for i in range(30)]
    neg = [" ".join(["buy cheap pills casino bonus click here"] * 3) + f" {i}" for i in range(30)]
    m = DA.train_quality_model(pos, neg, epochs=5)
    assert DA.classify_quality("the old mill by the calm river", m)[0] == "wiki"
    assert DA.classify_quality("casino bonus click here buy pills", m)[0] == "cc"
    m.save(tmp_path / "q.npz")
    m2 = DA.QualityModel.load(tmp_path / "q.npz")
    assert m2.prob_wiki("the calm river") == pytest.approx(m.prob_wiki("the calm river"))


# ---------------------------------------------------------------------------------------------------
# exact-line dedup
# ---------------------------------------------------------------------------------------------------
def test_data_exact_line_dedup_known_shared_lines(tmp_path):
    files = {"a.txt": "shared header\nonly in a\ncommon footer\n",
             "b.txt": "shared header\nonly in b\nb twice\nb twice\n",
             "c.txt": "common footer\nonly in c\n"}
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    DA.exact_line_deduplication(paths, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "out" / "a.txt").read_text() == "only in a\n"
    assert (tmp_path / "out" / "b.txt").read_text() == "only in b\n"
    assert (tmp_path / "out" / "c.txt").read_text() == "only in c\n"
    stats = DA.bloom_line_deduplication(paths, tmp_path / "bloom", expected_lines=100, fp_rate=1e-4)
    for name in files:  # at this size the Bloom filter's false-positive rate is ~0: same answer
        assert (tmp_path / "bloom" / name).read_text() == (tmp_path / "out" / name).read_text()
    assert stats["bits"] > 0
    with pytest.raises(FileNotFoundError):
        DA.exact_line_deduplication([tmp_path / "missing.txt"], tmp_path / "out2")
    # unusual line ends (form feed, Windows CRLF) are lines too, and a unique one is kept with its ending
    (tmp_path / "d.txt").write_bytes(b"page one\x0cunique d\r\nshared header\n")
    DA.exact_line_deduplication(paths + [tmp_path / "d.txt"], tmp_path / "out3")
    assert (tmp_path / "out3" / "d.txt").read_bytes() == b"page one\x0cunique d\r\n"


# ---------------------------------------------------------------------------------------------------
# MinHash
# ---------------------------------------------------------------------------------------------------
def test_data_minhash_equals_datasketch_and_readable_path():
    from datasketch import MinHash
    texts = ["The quick brown fox jumps over the lazy dog again and again.",
             "Caf\u00e9 cr\u00e8me, s'il vous pla\u00eet!",
             "short", ""]
    sets = [DA.shingles(t, 3) for t in texts]
    for k, seed in ((64, 3), (128, 1)):
        a, b = DA.minhash_permutations(k, seed)
        fast = DA.minhash_signatures(sets, a, b, chunk=4)  # tiny chunks exercise the grouping
        for s, sig in zip(sets, fast):
            m = MinHash(num_perm=k, seed=seed)
            m.update_batch([x.encode("utf-8") for x in s])
            assert np.array_equal(sig, m.hashvalues)
            assert np.array_equal(sig, DA.minhash_signature(s, a, b))
    assert DA.normalize_text("  Caf\u00c9,  CR\u00c8ME!\n") == "cafe creme"


def test_data_minhash_fast_path_equals_readable_path_with_its_hash(data_crawl):
    texts = ["The quick brown fox jumps over the lazy dog; the quick brown fox!",
             "Caf\u00e9 cr\u00e8me, s'il vous pla\u00eet",
             "short", "", "a b c d e", "snake_case and 42 digits, twice: snake_case and 42 digits",
             # every ASCII character class the fast path's byte table sorts: case, digits, "_", controls, symbols
             "UPPER lower MiXeD\x1cCTRL\x7fdel\tTabs\r\nLines_with_9x9 x-ray !@#$%^&*()[]{};:'\",.<>/?\\|`~ end",
             # non-ASCII: accents after a space or a dot, no-break space, curly quote, CJK, Arabic digits, ß, titlecase
             "D\u00e9j\u00e0 vu\u00a0\u2014 \u0301x a.\u0301b a\u2019\u0301b \u65e5\u672c\u8a9e "
             "\u0663\u0664 stra\u00dfe \u01c5emal x\u2028y \u00c9T\u00c9 \u2026 end"]
    for t in texts:  # the fast path's words are normalize_text's, as the bytes it hashes
        assert DA._page_bytes(t).split() == DA.normalize_text(t).encode().split()
    pages = [DA._page_bytes(t) for t in texts]  # word hashes from prefix sums == word_hash word by word
    for group in (DA._WORD_GROUP, 64):  # 64 bytes: many groups, and one page longer than a group
        DA._WORD_GROUP, old = group, DA._WORD_GROUP
        try:
            hashes, counts = DA._word_hashes(pages * 3)
        finally:
            DA._WORD_GROUP = old
        assert hashes.tolist() == [DA.word_hash(w) for p in pages * 3 for w in p.split()]
        assert counts.tolist() == [len(p.split()) for p in pages * 3]
    assert DA.word_hash(b"a") != DA.word_hash(b"\x00a") and DA.word_hash(b"") == 1
    for n, (k, seed) in ((1, (64, 3)), (3, (128, 1)), (5, (128, 1))):
        a, b = DA.minhash_permutations(k, seed)
        fast = DA.minhash_signatures_fast(texts * 2, n, a, b, chunk=4)  # tiny chunks exercise the grouping
        slow = [DA.minhash_signature(DA.shingles(t, n), a, b, DA.word_shingle_hash) for t in texts * 2]
        assert np.array_equal(fast, np.array(slow))
    assert DA.word_shingle_hash("a b") != DA.word_shingle_hash("b a")  # order matters inside a shingle
    # the dedup result is the same with either hash on the synthetic crawl's pages
    cfg, pages = data_crawl["cfg"], data_crawl["truth"]["pages"]
    texts = [DA.extract_text_from_html_bytes(p["html"].encode()) or "" for p in pages]
    sets = [DA.shingles(t, cfg.ngrams) for t in texts]
    a, b = DA.minhash_permutations(cfg.num_hashes, cfg.seed)
    clusters = [sorted(map(sorted, DA.near_duplicate_clusters(sets.__getitem__, sig, cfg.num_bands, 0.8)))
                for sig in (DA.minhash_signatures(sets, a, b), DA.minhash_signatures_fast(texts, cfg.ngrams, a, b))]
    assert clusters[0] == clusters[1] and len(clusters[0]) >= 5
    a, b = DA.minhash_permutations(128, 1)  # page-length texts with the default chunk: groups of several pages
    slow = [DA.minhash_signature(sets[i], a, b, DA.word_shingle_hash) for i in range(12)]
    assert np.array_equal(DA.minhash_signatures_fast(texts[:12], cfg.ngrams, a, b), np.array(slow))


def test_data_minhash_dedup_known_jaccard(tmp_path):
    import random
    rng = random.Random(0)
    words = [f"w{rng.randrange(10 ** 6)}" for _ in range(400)]
    a = " ".join(words)
    b_words = list(words)
    b_words[200] = "changed"  # one word changed: 5 of 396 5-grams differ -> J = 391 / 401
    b = " ".join(b_words)
    c = " ".join(f"z{rng.randrange(10 ** 6)}" for _ in range(400))
    assert DA.jaccard(DA.shingles(a, 5), DA.shingles(b, 5)) == pytest.approx(391 / 401)
    for name, text in (("a.txt", a), ("b.txt", b), ("c.txt", c)):
        (tmp_path / name).write_text(text)
    DA.minhash_deduplication([tmp_path / n for n in ("a.txt", "b.txt", "c.txt")], 128, 16, 5, 0.8, tmp_path / "out")
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "c.txt" in kept and len(kept) == 2 and kept != ["a.txt", "b.txt"]
    # below the threshold: a copy with every 10th word changed (J ~ 0.3) is not a duplicate
    d_words = [w if i % 10 else "x" for i, w in enumerate(words)]
    (tmp_path / "d.txt").write_text(" ".join(d_words))
    DA.minhash_deduplication([tmp_path / "a.txt", tmp_path / "d.txt"], 128, 16, 5, 0.8, tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a.txt", "d.txt"]


def test_data_union_find_joins_roots_of_a_chain():
    # 0~1 and 0~2 pass the threshold (J = 10/12), 1~2 does not (J = 10/14): still one cluster {0, 1, 2}.
    # Identical signatures make all three pairs LSH candidates; only the exact Jaccard decides.
    sets = [set(range(10)), set(range(10)) | {10, 11}, set(range(10)) | {20, 21}]
    assert DA.jaccard(sets[1], sets[2]) < 0.8 <= min(DA.jaccard(sets[0], sets[1]), DA.jaccard(sets[0], sets[2]))
    sigs = np.zeros((4, 8), dtype=np.uint32)
    sigs[3] = 1  # a fourth document in no candidate pair
    clusters = DA.near_duplicate_clusters((sets + [{99}]).__getitem__, sigs, 2, 0.8)
    assert sorted(map(sorted, clusters)) == [[0, 1, 2]]
    parent = [0, 0, 1, 2, 3]  # find() follows a chain to its root and halves the path
    assert DA.find(parent, 4) == 0 and parent[4] != 3


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_data_corrupt_records_are_counted_and_the_rest_kept(tmp_path):
    truth = DA.write_synthetic_crawl(str(tmp_path), pages=12, files=1, seed=2)
    path = truth["files"][0]
    stats = Counter()
    recs = list(DA.iter_records(path, stats))
    assert len(recs) == 12  # every good page survives the PNG, the empty record and the corrupt member
    assert stats == Counter(non_html=1, empty_record=1, corrupt_record=1)
    assert len({r.doc_id for r in recs}) == 12
    raw = Path(path).read_bytes()
    (tmp_path / "trunc.warc.gz").write_bytes(raw[: len(raw) - 200])  # the last record is cut short
    st2 = Counter()
    cut = [r.url for r in DA.iter_records(tmp_path / "trunc.warc.gz", st2)]
    assert cut[:11] == [r.url for r in recs[:11]]  # every record before the cut survives
    (tmp_path / "garbage.warc.gz").write_bytes(b"\x1f\x8b\x08" + b"\x00garbage" * 50)
    st3 = Counter()
    assert list(DA.iter_records(tmp_path / "garbage.warc.gz", st3)) == [] and st3["corrupt_record"] == 1
    with pytest.raises(FileNotFoundError, match="not found"):
        DA.run_pipeline([str(tmp_path / "nope.warc.gz")], str(tmp_path / "out"), DA.PipelineConfig())
    assert not (tmp_path / "out").exists()  # nothing written before the error


def _data_warc(path, n, damaged=(), requests=False, words=50):
    """n response records (page k at http://x.example/k), each after a request record if `requests`, with one
    flipped byte in the middle of the gzip member of each page in `damaged`; returns {k: offset of page k}."""
    rng, blobs, offsets, pos = random.Random(0), [], {}, 0
    for k in range(n):
        if requests:
            req = f"GET /{k} HTTP/1.1\r\nHost: x.example\r\n\r\n".encode()
            blobs.append(gzip.compress(f"WARC/1.0\r\nWARC-Type: request\r\nWARC-Record-ID: <urn:uuid:r{k}>\r\n"
                                       f"Content-Type: application/http; msgtype=request\r\nContent-Length: "
                                       f"{len(req)}\r\n\r\n".encode() + req + b"\r\n\r\n", mtime=0))
            pos += len(blobs[-1])
        body = f"<p>page {k} {' '.join(f'w{rng.randrange(10 ** 6)}' for _ in range(words))}</p>".encode()
        blob = bytearray(DA._warc_record(f"http://x.example/{k}", body, "text/html", k))
        if k in damaged:
            blob[len(blob) // 2] ^= 0xFF
        offsets[k], pos = pos, pos + len(blob)
        blobs.append(bytes(blob))
    Path(path).write_bytes(b"".join(blobs))
    return offsets


@pytest.mark.parametrize("n,damaged,requests,words", [
    (20, {5, 12}, False, 50), (20, {0, 19}, False, 50), (20, {5, 6, 7}, False, 50), (20, {3, 9, 15}, True, 50),
    (6, {1, 4}, True, 30_000)])  # pages of ~200 KB: the damage is met while reading a payload, not a header
def test_data_each_corrupt_member_loses_exactly_its_record(tmp_path, n, damaged, requests, words):
    path = tmp_path / "seg.warc.gz"
    offsets = _data_warc(path, n, damaged, requests, words)
    stats = Counter()
    recs = list(DA.iter_records(path, stats))
    # every good page survives, under the id of its true byte offset, and the report counts the real losses
    assert [r.url for r in recs] == [f"http://x.example/{k}" for k in range(n) if k not in damaged]
    assert [r.doc_id for r in recs] == [f"seg.warc.gz:{offsets[k]}" for k in range(n) if k not in damaged]
    assert stats == Counter(corrupt_record=len(damaged))


# Usage errors: (argv, a fragment of the one-line message). "{tmp}" is the test's temporary folder. Each exits 2
# with one line before any work, and the run's --out folder is never created.
_DATA_USAGE_ERRORS = [
    (["run", "--input", "{tmp}/none-*.warc.gz", "--out", "{tmp}/o"], "matches no file"),
    (["run", "--input", "x", "--out", "{tmp}/o", "--shard", "3/2"], "expected K/N with 0 <= K < N"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--num-hashes", "100"], "must be divisible by --num-bands"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--max-nsfw", "2"], "--max-nsfw must be between 0 and 1"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--workers", "0"], "--workers must be >= 1 (got 0)"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--vocab-size", "10"], "--vocab-size 10 is too small"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--tokenizer", "{tmp}/tok"], "tokenizer directory not found"),
    (["run", "--input", DA.__file__, "--out", DA.__file__ + "/o"], "is not a writable folder"),
    (["run", "--input", DA.__file__, "--out", "{tmp}/o", "--languages", "en,xx,qq"], "unknown code(s) qq, xx"),
    (["download", "--crawl", "CC-2024"], "expected a crawl id like CC-MAIN-2024-18"),
    (["bench", "--pages", "0"], "--pages must be >= 1 (got 0)"),
    (["demo", "--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["inspect", "--out", "{tmp}/o"], "has no pipeline results"),
    (["train-quality", "--positive", "{tmp}/none.txt", "--negative", "x"], "matches no file"),
]


@pytest.mark.parametrize("argv,message", _DATA_USAGE_ERRORS)
def test_data_cli_usage_errors_are_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        DA.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_data_read_only_out_is_refused_before_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the unwritable-folder case needs an ordinary user")
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit):
        DA.main(["run", "--input", DA.__file__, "--out", str(tmp_path / "ro" / "o")])
    assert "is not a writable folder" in capsys.readouterr().err


def test_data_run_options_are_pipeline_config_fields():
    from dataclasses import asdict
    args = DA.get_parser().parse_args(["run", "--input", "x", "--out", "o"])
    assert {k: getattr(args, k) for k in asdict(DA.PipelineConfig())} == asdict(DA.PipelineConfig())
    args = DA.get_parser().parse_args(["run", "--input", "x", "--out", "o", "--languages", "en,de", "--no-line-dedup",
                                       "--num-bands", "32", "--quality-model", "q.npz"])
    assert (args.languages, args.line_dedup, args.num_bands, args.quality_model) == (("en", "de"), False, 32, "q.npz")


def test_data_cli_unknown_command_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, str(_DATA_ROOT / "data.py"), "frobnicate"], capture_output=True,
                       text=True, cwd=tmp_path)  # the real process: exit 2, one line, no traceback
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "invalid choice: 'frobnicate'" in r.stderr


# ---------------------------------------------------------------------------------------------------
# the pipeline: report, special tokens, kill + resume, shards merge to the single-job result
# ---------------------------------------------------------------------------------------------------
def test_data_pipeline_report_and_tokens(data_crawl):
    rep, out = data_crawl["report"], data_crawl["base"] / "single"
    assert rep["records"] == 80 and rep["skipped"] == {"non_html": 4, "empty_record": 4, "corrupt_record": 4}
    assert rep["filters"]["language"]["dropped"] > 0 and rep["dedup"]["near_duplicates"] > 0
    assert set(os.listdir(out)) >= {"documents.jsonl", "text.txt", "tokens.bin", "report.json", "tokenizer"}
    import tokenizer as _tk
    tok = _tk.Tokenizer.load(str(out / "tokenizer"))
    ids = np.fromfile(out / "tokens.bin", dtype=rep["tokens"]["dtype"])
    docs = [json.loads(l)["text"] for l in _data_docs(out).splitlines()]
    assert int((ids == tok.eot_id).sum()) == len(docs) == rep["final_documents"]
    assert any("\n\n" in d for d in docs)  # line dedup keeps paragraph breaks (blank lines) in the pipeline
    assert rep["dedup"]["lines_removed"] > 0  # the shared boilerplate lines are gone...
    assert not any(b in d for d in docs for b in DA.BOILERPLATE_LINES)
    assert tok.decode(ids.tolist()) == "".join(d + DA.EOT for d in docs)
    # a page that quotes the special token's string is ordinary text, not a document boundary
    enc = DA.encode_documents(["see <|endoftext|> here", "two"], tok)
    assert int((enc == tok.eot_id).sum()) == 2
    assert tok.decode(enc.tolist()) == "see <|endoftext|> here" + DA.EOT + "two" + DA.EOT


def test_data_pipeline_killed_and_resumed(data_crawl, tmp_path):
    files = data_crawl["truth"]["files"]
    out = tmp_path / "resumed"
    code = ("import sys, data; data.run_pipeline(sys.argv[2:], sys.argv[1], data.PipelineConfig(), workers=1, "
            "vocab_size=300, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), *files], cwd=_DATA_ROOT)
    work = out / "work"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # kill it as soon as one file is finished
        if work.exists() and list(work.glob("*.report.json")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("*.report.json")))
    assert not (out / "report.json").exists() and 1 <= done_before < 4
    rep = DA.run_pipeline(files, str(out), data_crawl["cfg"], workers=1, vocab_size=300, progress=False)
    assert rep["resumed_files"] == done_before
    assert _data_docs(out) == _data_docs(data_crawl["base"] / "single")


def test_data_resume_redoes_an_input_whose_content_changed(tmp_path, capsys):
    files = DA.write_synthetic_crawl(str(tmp_path / "a"), pages=12, files=2, seed=5)["files"]
    other = DA.write_synthetic_crawl(str(tmp_path / "b"), pages=12, files=2, seed=6)["files"]
    out, run = tmp_path / "out", lambda: DA.run_pipeline(files, str(out), DA.PipelineConfig(), vocab_size=300,
                                                         progress=False)
    first = run()
    os.utime(files[1])  # touched, same content: reused (the hash decides)
    assert run()["resumed_files"] == 2 and "filtering it again" not in capsys.readouterr().err
    Path(files[0]).write_bytes(Path(other[0]).read_bytes())  # a re-downloaded segment under the same name
    rep = run()
    assert rep["resumed_files"] == 1 and rep != first
    assert f"{files[0]}: its size changed" in capsys.readouterr().err
    urls = {json.loads(l)["url"] for l in _data_docs(out).splitlines()}
    assert any("/6/" in u for u in urls) and not any("/5/" in u and int(u.rsplit("/", 1)[1]) % 2 == 0 for u in urls)
    # same size, new content: the hash tells
    p = tmp_path / "f.bin"
    p.write_bytes(b"abcd")
    src = DA._fingerprint(p)
    assert DA._input_changed(p, src) == ""
    p.write_bytes(b"abce")
    os.utime(p, ns=(src["mtime_ns"] + 10 ** 9, src["mtime_ns"] + 10 ** 9))
    assert DA._input_changed(p, src) == "its content changed (same size, other SHA-256)"
    assert DA._input_changed(p, None) == "no record of its content"


@pytest.mark.parametrize("extra,named", [(["--vocab-size", "512"], "vocab_size"),
                                         (["--languages", "en,de"], "languages"),
                                         (["--tokenizer", "{out}/tokenizer"], "tokenizer"),
                                         (["--ngrams", "4"], "ngrams")])
def test_data_rerun_with_other_output_settings_is_refused(data_crawl, capsys, extra, named):
    out = data_crawl["base"] / "single"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as e:
        DA.main(["run", "--input", *data_crawl["truth"]["files"], "--out", str(out), "--vocab-size", "300"] +
                [a.replace("{out}", str(out)) for a in extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing replaced


def test_data_quality_model_content_is_a_setting(tmp_path):
    texts = [["the calm river flows past the mill " * 8], ["buy cheap pills casino bonus " * 8]]
    DA.train_quality_model(*texts, epochs=1).save(tmp_path / "q.npz")
    cfg = DA.PipelineConfig(quality_model=str(tmp_path / "q.npz"))
    DA.atomic_write_json(tmp_path / "config.json", DA._run_settings(cfg))
    DA._check_settings(str(tmp_path), cfg)  # the same file: accepted
    DA.train_quality_model(*texts, epochs=2).save(tmp_path / "q.npz")  # retrained at the same path
    with pytest.raises(ValueError, match="quality_model_sha256"):
        DA._check_settings(str(tmp_path), cfg)


def test_data_funnel_counts_add_up(data_crawl):
    rep = data_crawl["report"]
    steps = list(rep["filters"].values())
    assert steps[0]["reached"] == rep["records"] == 80  # the skipped records are not among the 80 read
    for a, b in zip(steps, steps[1:]):
        assert b["reached"] == a["reached"] - a["dropped"]
    assert steps[-1]["reached"] - steps[-1]["dropped"] == rep["final_documents"]


def test_data_shards_merge_to_single_job_result(data_crawl):
    files, out = data_crawl["truth"]["files"], data_crawl["base"] / "sharded"
    for k in range(3):  # 3 "array jobs" over 4 files, then the merge job
        r = DA.run_pipeline(files, str(out), data_crawl["cfg"], shard=(k, 3), vocab_size=300, progress=False)
        assert r["shard"] == f"{k}/3"
    assert not (out / "documents.jsonl").exists()
    rep = DA.run_pipeline(files, str(out), data_crawl["cfg"], vocab_size=300, progress=False)
    assert rep["resumed_files"] == 4
    assert _data_docs(out) == _data_docs(data_crawl["base"] / "single")
    assert rep["filters"] == data_crawl["report"]["filters"]


# ---------------------------------------------------------------------------------------------------
# Common Crawl download against a local server (never the network)
# ---------------------------------------------------------------------------------------------------
def test_data_download_from_local_server_with_resume(tmp_path):
    root = tmp_path / "server"
    crawl = "CC-MAIN-2024-18"
    seg = root / "crawl-data" / crawl / "segments" / "1" / "warc"
    seg.mkdir(parents=True)
    blobs = {f"CC-{i}.warc.gz": os.urandom(5000 + i) for i in range(3)}
    for name, b in blobs.items():
        (seg / name).write_bytes(b)
    listing = "".join(f"crawl-data/{crawl}/segments/1/warc/{n}\n" for n in blobs)
    (root / "crawl-data" / crawl / "warc.paths.gz").write_bytes(gzip.compress(listing.encode()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading_ = threading.Thread(target=server.serve_forever, daemon=True)
    threading_.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        dest = tmp_path / "dl"
        dest.mkdir()
        (dest / "CC-0.warc.gz.part").write_bytes(blobs["CC-0.warc.gz"][:1000])  # an interrupted download
        got = DA.download_crawl(crawl, 2, str(dest), base_url=url, progress=False)
        assert [Path(p).name for p in got] == ["CC-0.warc.gz", "CC-1.warc.gz"]
        for p in got:
            assert Path(p).read_bytes() == blobs[Path(p).name]
        assert not (dest / "CC-2.warc.gz").exists()
    finally:
        server.shutdown()


def test_data_wet_records_are_read_as_text(tmp_path):
    body = "Hello WET world. This is Common Crawl's own extracted text.\nSecond line.".encode()
    head = (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: http://x.example/\r\nWARC-Record-ID: <urn:uuid:1>"
            f"\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    path = tmp_path / "seg.warc.wet.gz"
    path.write_bytes(gzip.compress(head + body + b"\r\n\r\n"))
    stats = Counter()
    (rec,) = list(DA.iter_records(path, stats))
    assert rec.content_type == "text/plain" and rec.payload == body and rec.url == "http://x.example/" and not stats
    assert DA.read_training_texts([str(path)]) == [body.decode()]


def test_data_demo_pieces_score_filters_and_train_both_models(data_crawl, tmp_path):
    scores = DA.score_filters(data_crawl["truth"]["pages"], data_crawl["cfg"])
    assert scores["pii"]["recall"] == 1.0 and scores["near_dup"]["recall"] >= 0.9
    assert scores["language"]["recall"] == 1.0 and scores["nsfw"]["truth"] >= 1
    assert scores["nsfw"]["recall"] == scores["nsfw"]["precision"] == scores["toxic"]["recall"] == 1.0
    import train as _train
    stories = [t for t, _ in _train.SyntheticCorpus(seed=3).stories(120)]
    clean = DA.EOT.join(stories)
    raw = DA.EOT.join(stories[:40] + ["buy cheap watches casino bonus click here " * 20] * 40)
    res = DA.train_raw_vs_filtered(raw, DA.EOT.join(stories[:40]), clean, str(tmp_path), steps=2, log=lambda *a: None)
    assert set(res) == {"raw", "filtered"}
    assert res["raw"]["train_tokens"] == res["filtered"]["train_tokens"] > 0  # equal token budgets
    assert all(0 < r["bpb"] < 20 for r in res.values())
    # a rerun reuses both models; new filtered text retrains that model only
    lines = []
    again = DA.train_raw_vs_filtered(raw, DA.EOT.join(stories[:40]), clean, str(tmp_path), steps=2, log=lines.append)
    assert again == res and sum("(reused)" in l for l in lines) == 2
    lines = []
    other = DA.train_raw_vs_filtered(raw, DA.EOT.join(stories[:30]), clean, str(tmp_path), steps=2, log=lines.append)
    assert other["raw"] == res["raw"] and other["filtered"]["corpus_tokens"] < res["filtered"]["corpus_tokens"]
    assert ["(reused)" in l for l in lines] == [True, False]



def test_data_demo_runs_twice_reusing_what_is_valid(tmp_path):
    out, lines = str(tmp_path / "demo"), []
    first = DA.demo(out, pages=40, steps=1, workers=1, log=lambda *a: None)
    again = DA.demo(out, pages=40, steps=1, workers=1, log=lines.append)  # `python data.py` twice
    assert again["pipeline"]["resumed_files"] == 4 and again["models"] == first["models"]
    assert sum("(reused)" in l for l in lines) == 2 and f"results: {out}/demo.json" in lines[-1]
    f = again["pipeline"]["filters"]["line_dedup"]
    assert f["reached"] - f["dropped"] == again["pipeline"]["final_documents"]
# ===== Stage 8: align.py =====
# SFT / GRPO / DPO building blocks against hand-worked values, rewards, the task,
# rollouts, short real training runs, resume, loaders, the command line.


def _align_byte_tokenizer():
    """256 byte tokens + <|endoftext|> (id 256), no merges: token boundaries are exactly bytes."""
    return tk.Tokenizer({i: bytes([i]) for i in range(256)}, [], [tk.EOT])


def _align_tiny_model(seed=0, vocab=257, ctx=192, d=32, layers=1):
    torch.manual_seed(seed)
    return M.TransformerLM(vocab, ctx, d, layers, 2)


def _align_write_init(folder, seed=0, vocab=257, ctx=192):
    """A checkpoint in train.py's format (model, model_config, tokenizer folder next to it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _align_byte_tokenizer()
    tok.save(str(folder / "tokenizer"))
    m = _align_tiny_model(seed, vocab=vocab, ctx=ctx)
    T.write_checkpoint(folder / "ckpt.pt", 0, model=m.state_dict(), model_config=m.config.to_dict())
    return str(folder / "ckpt.pt")


# ---------------------------------------------------------------------------------------------------
# tokenization, log-probs, entropy, masking
# ---------------------------------------------------------------------------------------------------
def test_align_tokenize_prompt_and_output_hand_example():
    tok = _align_byte_tokenizer()
    out = A.tokenize_prompt_and_output(["ab", "c"], ["X", "YZ"], tok)
    # rows: a b X | c Y Z  -> padded to 3 with eot (256); inputs drop the last, labels the first
    assert out["input_ids"].tolist() == [[97, 98], [99, 89]]
    assert out["labels"].tolist() == [[98, 88], [89, 90]]
    assert out["response_mask"].tolist() == [[False, True], [True, True]]
    # a literal <|endoftext|> in untrusted text stays text (13 bytes), never the control id
    out = A.tokenize_prompt_and_output(["p"], ["<|endoftext|>"], tok)
    assert 256 not in out["labels"].tolist()[0] and out["response_mask"].sum() == 13


def test_align_compute_entropy_matches_torch_categorical_and_is_stable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(A.compute_entropy(logits), ref, atol=1e-5)
    huge = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    h = A.compute_entropy(huge)
    assert torch.isfinite(h).all() and abs(float(h[0])) < 1e-6 and abs(float(h[1]) - math.log(3)) < 1e-6


def test_align_get_response_log_probs_matches_direct_log_softmax():
    m = _align_tiny_model()
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    r = A.get_response_log_probs(m, x, y, return_token_entropy=True)
    logits = m(x).double()
    direct = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    assert r["log_probs"].shape == (2, 8) and torch.allclose(r["log_probs"].double(), direct, atol=1e-5)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(r["token_entropy"].double(), ent, atol=1e-5)
    assert "token_entropy" not in A.get_response_log_probs(m, x, y)


def test_align_masked_mean_and_normalize_hand_values():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert float(A.masked_mean(t, mask)) == pytest.approx((1 + 3 + 6) / 3)
    assert A.masked_mean(t, mask, dim=1).tolist() == pytest.approx([2.0, 6.0])
    by_column = A.masked_mean(t, mask, dim=0).tolist()
    assert by_column[0] == pytest.approx(1.0) and by_column[2] == pytest.approx(4.5)
    assert math.isnan(by_column[1])  # mean of nothing is NaN, not 0
    assert float(A.masked_normalize(t, mask, normalize_constant=2.0)) == pytest.approx(5.0)
    assert A.masked_normalize(t, mask, dim=1, normalize_constant=4.0).tolist() == pytest.approx([1.0, 1.5])
    assert A.masked_normalize(t, mask, dim=0).tolist() == pytest.approx([1.0, 0.0, 9.0])


def test_align_sft_microbatch_train_step_loss_and_gradient():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True], [True, True, False]])
    loss, meta = A.sft_microbatch_train_step(lp, mask, gradient_accumulation_steps=2, normalize_constant=5.0)
    # per example: -(sum of masked lp) / 5 = [1.0, 0.2]; mean 0.6; / 2 accumulation steps = 0.3
    assert float(loss) == pytest.approx(0.3)
    # d loss / d lp = -mask / 5 / B / gas = -mask / 20
    assert torch.allclose(lp.grad, -mask.float() / 20)
    assert float(meta["nll_per_token"]) == pytest.approx((2 + 3 + 0.5 + 0.5) / 4)


# ---------------------------------------------------------------------------------------------------
# policy gradients
# ---------------------------------------------------------------------------------------------------
def test_align_group_normalized_rewards_with_and_without_std():
    rewards = {"a": 1.0, "b": 0.0, "c": 0.5}
    fn = lambda resp, gt: {"reward": rewards[resp], "format_reward": 1.0, "answer_reward": rewards[resp]}  # noqa
    resp = ["a", "b", "b", "c", "c", "c"]
    adv, raw, meta = A.compute_group_normalized_rewards(fn, resp, ["x"] * 6, 3, 1e-6, normalize_by_std=False)
    assert raw.tolist() == [1.0, 0.0, 0.0, 0.5, 0.5, 0.5]
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0], abs=1e-6)
    adv, _, meta = A.compute_group_normalized_rewards(fn, resp, ["x"] * 6, 3, 1e-6, normalize_by_std=True)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std of (1, 0, 0)
    assert adv[:3].tolist() == pytest.approx([2 / 3 / std, -1 / 3 / std, -1 / 3 / std], rel=1e-4)
    assert adv[3:].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)  # all-equal group: no signal, no NaN
    assert meta["reward_mean"] == pytest.approx(2.5 / 6) and meta["frac_groups_all_equal"] == pytest.approx(0.5)


def test_align_naive_policy_gradient_loss():
    adv = torch.tensor([[2.0], [-1.0]])
    lp = torch.tensor([[-1.0, -0.5], [-2.0, -3.0]])
    assert A.compute_naive_policy_gradient_loss(adv, lp).tolist() == [[2.0, 1.0], [-2.0, -3.0]]


def test_align_grpo_clip_loss_clips_at_both_ends_of_the_ratio():
    eps = 0.2
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    new = ratios.log().clone().requires_grad_(True)
    adv = torch.tensor([[1.0]])
    loss, meta = A.compute_grpo_clip_loss(adv, new, old, eps)
    # A > 0: min(r, clip(r)) -> 1.2 when r = 1.5 (clipped, no gradient); 0.5 when r = 0.5 (unclipped)
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.5, -1.2, -0.5])
    assert meta["clipped"].tolist() == [[True, False, True, False]]
    loss.sum().backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0, -0.5])  # d(-r)/d log r = -r where unclipped
    new2 = ratios.log().clone().requires_grad_(True)
    loss, meta = A.compute_grpo_clip_loss(-adv, new2, old, eps)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5 when r = 1.5 (unclipped), 0.8 when r = 0.5 (clipped)
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8, 1.5, 0.8])
    assert meta["clipped"].tolist() == [[False, True, False, True]]
    assert float(meta["clip_fraction"]) == pytest.approx(0.5)
    loss.sum().backward()
    assert new2.grad.tolist()[0] == pytest.approx([1.5, 0.0, 1.5, 0.0])


def test_align_policy_gradient_dispatch_and_errors():
    lp = torch.tensor([[-1.0, -2.0]])
    raw, adv = torch.tensor([[3.0]]), torch.tensor([[0.5]])
    assert A.compute_policy_gradient_loss(lp, "no_baseline", raw_rewards=raw)[0].tolist() == [[3.0, 6.0]]
    assert A.compute_policy_gradient_loss(lp, "reinforce_with_baseline", advantages=adv)[0].tolist() == [[0.5, 1.0]]
    l, m = A.compute_policy_gradient_loss(lp, "grpo_clip", advantages=adv, old_log_probs=lp, cliprange=0.2)
    assert l.tolist() == [[-0.5, -0.5]] and float(m["clip_fraction"]) == 0.0


def test_align_grpo_microbatch_train_step_mean_vs_constant_normalization():
    lp0 = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([[1.0], [2.0]])
    lp = lp0.clone().requires_grad_(True)
    loss, _ = A.grpo_microbatch_train_step(lp, mask, 2, "reinforce_with_baseline", advantages=adv)
    # per-token loss -A*lp: row0 [1, 2], row1 [2]; masked means 1.5 and 2.0; batch mean 1.75; / 2
    assert float(loss) == pytest.approx(0.875)
    assert torch.allclose(lp.grad, torch.tensor([[-0.125, -0.125, 0.0], [-0.5, 0.0, 0.0]]))
    lp = lp0.clone().requires_grad_(True)
    loss, _ = A.grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv,
                                           normalize_constant=4.0)
    # Dr. GRPO: sums / 4 -> 0.75 and 0.5; mean 0.625; every token's gradient is -A / (4 * B)
    assert float(loss) == pytest.approx(0.625)
    assert torch.allclose(lp.grad, torch.tensor([[-0.125, -0.125, 0.0], [-0.25, 0.0, 0.0]]))
    lp = lp0.clone().requires_grad_(True)
    _, meta = A.grpo_microbatch_train_step(lp, mask, 1, "grpo_clip", advantages=adv,
                                           old_log_probs=lp0 - 1.0, cliprange=0.2)
    assert float(meta["clip_fraction"]) == pytest.approx(1.0)  # ratio e > 1.2 on every response token


# ---------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------
def test_align_dpo_loss_matches_direct_computation_from_two_models():
    tok = _align_byte_tokenizer()
    lm, ref = _align_tiny_model(seed=1, ctx=256), _align_tiny_model(seed=2, ctx=256)
    beta, prompt, good, bad = 0.5, "2+2?", "4", "five"
    loss = A.compute_per_instance_dpo_loss(lm, ref, tok, beta, prompt, good, bad)

    def seq_logp(model, response):  # log-prob of the WHOLE formatted sequence (prompt terms cancel)
        ids = tok.encode(A.ALPACA_TEMPLATE.format(instruction=prompt, response=response)) + [tok.eot_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x[:, :-1]).double()
        return float(torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).sum())
    h = beta * ((seq_logp(lm, good) - seq_logp(ref, good)) - (seq_logp(lm, bad) - seq_logp(ref, bad)))
    assert float(loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-h))), abs=1e-4)
    loss.backward()  # differentiable through the policy ...
    assert lm.lm_head.weight.grad is not None and ref.lm_head.weight.grad is None  # ... never the reference
    assert float(A.compute_per_instance_dpo_loss(lm, lm, tok, beta, prompt, good, bad).detach()) == \
        pytest.approx(math.log(2), abs=1e-5)  # policy == reference: margin 0


# ---------------------------------------------------------------------------------------------------
# rewards and parsing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("42", 42), ("-7", -7), ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)), ("2.50", Fraction(5, 2)),
    (".5", Fraction(1, 2)), ("3/4", Fraction(3, 4)), ("$18", 18), ("18.", 18), ("18 dollars", 18),
    ("1,23", None), ("abc", None), ("1/0", None), ("", None)])
def test_align_normalize_number(text, value):
    assert A.normalize_number(text) == value


@pytest.mark.parametrize("response,truth,fmt,ans", [
    (" 2 + 3 = 5. </think> <answer> 5 </answer>", "5", 1, 1),
    (" so </think> <answer>1,000</answer>", "1000", 1, 1),
    (" half </think> <answer> 0.5 </answer>", "1/2", 1, 1),
    (" x </think> <answer> 6 </answer>", "5", 1, 0),
    (" x </think><answer> 5 </answer>", "5", 1, 1),
    (" x <answer> 5 </answer>", "5", 0, 0),  # reasoning never closed
    (" x </think> the answer is 5", "5", 0, 0),  # no answer tags
    (" x </think> <answer> 5 </answer> <answer> 6 </answer>", "5", 0, 0),  # two answers: not one commitment
])
def test_align_r1_zero_reward_table(response, truth, fmt, ans):
    r = A.r1_zero_reward_fn(response, truth)
    assert (r["format_reward"], r["answer_reward"], r["reward"]) == (fmt, ans, ans)


def test_align_parse_gsm8k_and_mmlu_responses():
    assert A.parse_gsm8k_response("She sells 9 eggs for $2 each, so 9 * 2 = 18.") == "18"
    assert A.parse_gsm8k_response("The total is 1,234 apples") == "1234"
    assert A.parse_gsm8k_response("-3 degrees then 2.5") == "2.5"
    assert A.parse_gsm8k_response("no numbers here") is None
    ex = {"options": ["w", "x", "y", "z"]}
    assert A.parse_mmlu_response(ex, "The answer is C.") == "C"
    # no "answer is": the lone letters are (B) and A, and the documented rule takes the LAST one
    assert A.parse_mmlu_response(ex, "I think (B) because A is wrong") == "A"
    assert A.parse_mmlu_response(ex, "B. No wait: C") == "C"
    # an explicit "answer is" wins over any lone letter, even a later one
    assert A.parse_mmlu_response(ex, "The answer is B; A and D are traps") == "B"
    assert A.parse_mmlu_response(ex, "Answer: D") == "D"
    assert A.parse_mmlu_response(ex, "B") == "B"
    assert A.parse_mmlu_response(ex, "I do not know") is None
    assert A.parse_mmlu_response(ex, "Everything") is None


# ---------------------------------------------------------------------------------------------------
# the built-in task
# ---------------------------------------------------------------------------------------------------
def test_align_task_answers_checked_independently():
    for split, operands in (("train", {2, 3}), ("test", {3}), ("hard", {4})):
        probs = A.task_problems(split, 300, seed=5)
        seen = set()
        for p in probs:
            expr = p.question[len("Compute "):-1]
            assert int(eval(expr, {"__builtins__": {}})) == int(p.answer)  # Python evaluates the expression
            nums = expr.split()
            assert (len(nums) + 1) // 2 in operands
            steps = [s for s in p.solution.split(". ") if s]
            assert len(steps) == len(nums) // 2
            for s in steps:  # every worked step is itself true
                lhs, rhs = s.rstrip(".").split(" = ")
                assert eval(lhs, {"__builtins__": {}}) == int(rhs) and 0 <= int(rhs) <= 59
            assert steps[-1].rstrip(".").endswith(" " + p.answer)
            seen.add(p.question)
        if split != "train":
            assert len(seen) == len(probs)  # held-out problems are distinct
    train = {p.question for p in A.task_problems("train", 3000, seed=1)}
    assert not train & {p.question for p in A.task_problems("test", 500, seed=1000)}  # disjoint
    assert A.task_problems("test", 20, seed=3) == A.task_problems("test", 20, seed=3)  # deterministic
    assert "<think>" not in A.pretraining_text(20_000) and "Compute" in A.pretraining_text(20_000)


# ---------------------------------------------------------------------------------------------------
# SFT data, rollouts
# ---------------------------------------------------------------------------------------------------
def test_align_packed_sft_dataset_and_batches(tmp_path):
    tok = _align_byte_tokenizer()
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "hi", "response": "yo"}\nnot json\n{"prompt": "x"}\n{"prompt": "a", "response": "b"}\n')
    ds = A.get_packed_sft_dataset(tok, f, seq_length=16, shuffle=False)
    stream = []
    for p, r in (("hi", "yo"), ("a", "b")):
        stream += tok.encode(A.ALPACA_TEMPLATE.format(instruction=p, response=r)) + [256]
    assert len(ds) == (len(stream) - 1) // 16
    assert ds[1]["input_ids"].tolist() == stream[16:32] and ds[1]["labels"].tolist() == stream[17:33]
    batches = list(A.iterate_batches(ds, 4, shuffle=True, seed=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == len(ds) and batches[0]["labels"].shape[1] == 16
    assert sorted(x for b in batches for x in b["input_ids"][:, 0].tolist()) == \
        sorted(ds[i]["input_ids"][0].item() for i in range(len(ds)))


def test_align_rollouts_shared_prefill_match_generate():
    m = _align_tiny_model(seed=3)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5]]
    ours = A.sample_rollouts(m, prompts, 2, 6, 0.0, None)  # greedy: every copy of a prompt is the same
    ref = M.generate(m, prompts, 6, temperature=0)
    assert ours == [r for r in ref for _ in range(2)]
    assert A.sample_rollouts(m, prompts, 2, 6, 0.0, None, use_cache=False) == ours
    g = torch.Generator().manual_seed(0)
    sampled = A.sample_rollouts(m, prompts, 4, 5, 1.0, 256, g)
    assert len(sampled) == 12 and all(1 <= len(s) <= 5 for s in sampled)


# ---------------------------------------------------------------------------------------------------
# short real runs
# ---------------------------------------------------------------------------------------------------
def test_align_seconds_long_sft_lowers_response_loss():
    tok, m = _align_byte_tokenizer(), _align_tiny_model(seed=4, d=48)
    probs = A.task_problems("train", 16, seed=2)
    pairs = [(tok.encode(A.task_prompt(p)), tok.encode(A.task_response(p)) + [256]) for p in probs]
    cfg = A.AlignConfig(micro_batch=8, lr=3e-3)
    opt = T.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def nll():
        b = A.pack_prompt_response_ids(pairs, 256)
        with torch.no_grad():
            lp = A.get_response_log_probs(m, b["input_ids"], b["labels"])["log_probs"]
        return float(-A.masked_mean(lp, b["response_mask"]))
    before = nll()
    for _ in range(25):
        A.sft_update(m, opt, pairs, cfg, 256)
    after = nll()
    assert after < 0.6 * before, (before, after)


def test_align_seconds_long_grpo_raises_reward_on_a_toy():
    """Toy: reward = share of the response's 4 bytes that are ASCII digits. Random init starts near 10/257."""
    tok, m = _align_byte_tokenizer(), _align_tiny_model(seed=5)
    digit = lambda resp, gt: {"reward": sum(c.isdigit() for c in resp) / 4, "format_reward": 1.0,  # noqa: E731
                              "answer_reward": 0.0}
    cfg = A.AlignConfig(stage="grpo", batch_size=4, group_size=8, max_new_tokens=4, lr=2e-2, micro_batch=32,
                        loss_type="grpo_clip", epochs_per_batch=2)
    opt = T.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    pool = [A.Problem(q, "", "") for q in ("a", "b", "c", "d", "e")]
    ctx = A.StageContext(cfg, m, opt, tok, 256, pool, [], reward_fn=digit, prompt_fn=lambda p: p.question,
                         require_eot=False)
    rewards = [A.grpo_step(ctx, s)["reward_mean"] for s in range(25)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards


def test_align_stage_runs_resumes_and_rejects_foreign_checkpoints(tmp_path):
    init = _align_write_init(tmp_path / "base")
    out = tmp_path / "sft"
    kw = dict(stage="sft", init=init, out_dir=str(out), batch_size=4, micro_batch=4, sft_examples=3,  # < batch
              eval_problems=5, hard_problems=0, ckpt_interval=1, max_new_tokens=8)
    logs = []
    res = A.run_stage(A.AlignConfig(steps=2, **kw), log=logs.append)
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and res["test"]["n"] == 5
    A.run_stage(A.AlignConfig(steps=4, **kw), log=logs.append)  # picks up at step 2
    assert any("resumed" in l and "step 2" in l for l in logs)
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert T.read_checkpoint(out / "ckpt.pt")["iteration"] == 4
    assert not (out / ".lock").exists()  # released at the end
    (out / ".lock").write_text(str(__import__("os").getpid()))  # a live owner (this process): refused
    with pytest.raises(RuntimeError, match="in use by another run"):
        A.run_stage(A.AlignConfig(steps=4, **kw))
    (out / ".lock").write_text("999999999")  # a dead owner (killed with -9): taken over
    A.run_stage(A.AlignConfig(steps=4, **kw), log=logs.append)
    # the stage's output is a valid --init for the next stage, with its tokenizer next to it
    model, tok, _ = A.load_policy(str(out / "ckpt.pt"))
    assert tok.fingerprint() == _align_byte_tokenizer().fingerprint()
    # another run in the same folder: an error, and the checkpoint there is untouched
    other = _align_write_init(tmp_path / "other", seed=9)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="another run"):
        A.run_stage(A.AlignConfig(steps=4, **{**kw, "init": other}))
    assert (out / "ckpt.pt").read_bytes() == before
    # a checkpoint whose vocabulary does not match its tokenizer
    bad = _align_write_init(tmp_path / "bad", vocab=300)
    with pytest.raises(ValueError, match="vocabulary"):
        A.load_policy(bad)
    with pytest.raises(FileNotFoundError):
        A.load_policy(str(tmp_path / "missing.pt"))


def test_align_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """Ctrl-C after step 3 (last checkpoint: step 2), then the same command again: the weights and Adam's
    moments at the end equal an uninterrupted run's, bit for bit. A resume that dropped the optimizer state
    (Adam restarting from zero moments), the step or a batch would leave other weights, whatever the logs say."""
    init = _align_write_init(tmp_path / "base")
    kw = dict(stage="sft", init=init, steps=4, batch_size=4, micro_batch=4, sft_examples=8, eval_problems=0,
              hard_problems=0, ckpt_interval=2, max_new_tokens=4, lr=3e-3)
    A.run_stage(A.AlignConfig(out_dir=str(tmp_path / "whole"), **kw), log=lambda *a: None)

    def interrupt_at_step_3(line):
        if "step    3" in line:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        A.run_stage(A.AlignConfig(out_dir=str(tmp_path / "cut"), **kw), log=interrupt_at_step_3)
    assert T.read_checkpoint(tmp_path / "cut" / "ckpt.pt")["iteration"] == 2
    logs = []
    A.run_stage(A.AlignConfig(out_dir=str(tmp_path / "cut"), **kw), log=logs.append)
    assert any("resumed" in l and "step 2" in l for l in logs), logs
    whole, cut = (T.read_checkpoint(tmp_path / d / "ckpt.pt") for d in ("whole", "cut"))
    start = T.read_checkpoint(init)["model"]
    assert cut["iteration"] == whole["iteration"] == 4
    assert not all(torch.equal(whole["model"][k], start[k]) for k in start)  # training moved the weights
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], cut["model"][k]), k
    moments = lambda ck: [t for st in ck["optimizer"]["state"].values() for t in st.values()  # noqa: E731
                          if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(moments(whole), moments(cut))) and moments(whole)
    rows = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / d / "log.jsonl").open())]  # noqa
    assert rows("cut") == rows("whole") and [s for s, _ in rows("cut")] == [1, 2, 3, 4]


def test_align_resume_trims_only_its_own_rows_and_drops_a_torn_line(tmp_path):
    """A shared log (the demo's): on resume at step 1, this stage's later rows and its evaluation go, another
    stage's rows stay whatever their step, and a line torn by a kill is dropped instead of breaking the reader."""
    init = _align_write_init(tmp_path / "base")
    out, log = tmp_path / "sft", tmp_path / "shared.jsonl"
    other = [{"kind": "train", "stage": "base", "step": 9, "loss": 1.5}, {"kind": "eval", "stage": "base", "step": 9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in other))
    kw = dict(stage="sft", init=init, out_dir=str(out), log_path=str(log), batch_size=4, micro_batch=4,
              sft_examples=4, eval_problems=1, hard_problems=0, ckpt_interval=1, max_new_tokens=4)
    A.run_stage(A.AlignConfig(steps=1, **kw), log=lambda *a: None)
    with open(log, "a") as f:
        f.write('{"kind": "train", "stage": "sft", "step": 2, "lo')  # a kill mid-line, after the checkpoint
    A.run_stage(A.AlignConfig(steps=2, **kw), log=lambda *a: None)
    rows = [json.loads(l) for l in log.read_text().splitlines()]  # every line is whole JSON again
    assert rows[:2] == other
    assert [(r["kind"], r["step"]) for r in rows[2:]] == [("train", 1), ("train", 2), ("eval", 2)], rows


def test_align_resume_with_other_settings_is_refused_naming_them(tmp_path):
    init = _align_write_init(tmp_path / "base")
    out = tmp_path / "sft"
    kw = dict(stage="sft", init=init, out_dir=str(out), steps=1, batch_size=4, micro_batch=4, sft_examples=4,
              eval_problems=0, hard_problems=0, max_new_tokens=4)
    A.run_stage(A.AlignConfig(**kw), log=lambda *a: None)
    before = (out / "ckpt.pt").read_bytes()
    for change, named in (({"lr": 3e-4}, "--lr 0.001 -> 0.0003"), ({"seed": 1}, "--seed 0 -> 1"),
                          ({"batch_size": 2}, "--batch-size 4 -> 2"), ({"temperature": 0.5}, "--temperature")):
        with pytest.raises(ValueError, match="other settings") as e:
            A.run_stage(A.AlignConfig(**{**kw, "steps": 2, **change}), log=lambda *a: None)
        assert named in str(e.value), str(e.value)
    assert (out / "ckpt.pt").read_bytes() == before  # nothing of the earlier run was touched
    # what may change: the length of the run, its evaluation, its micro-batching
    logs = []
    A.run_stage(A.AlignConfig(**{**kw, "steps": 2, "micro_batch": 2, "eval_problems": 1}), log=logs.append)
    assert any("resumed" in l and "step 1" in l for l in logs), logs


def test_align_demo_folder_refuses_other_settings(tmp_path, capsys):
    """`python align.py --seed 1` on a folder made with seed 0 must not print the seed-0 table as its own."""
    out = tmp_path / "demo"
    out.mkdir()
    A.check_demo_settings(out, {"seed": 0, "scale": 1.0})
    A.check_demo_settings(out, {"seed": 0, "scale": 1.0})  # the same settings: reused
    with pytest.raises(ValueError, match=r"made with seed 0 \(this run: 1\)"):
        A.check_demo_settings(out, {"seed": 1, "scale": 1.0})
    with pytest.raises(SystemExit) as e:  # the command line: one line, before any work
        A.main(["--out-dir", str(out), "--seed", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "seed 0 (this run: 1)" in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((out / "demo.json").read_text()) == {"seed": 0, "scale": 1.0}
    # a folder from before demo.json: the seed is read from its base model (train.py's seed is seed + 1337)
    old = tmp_path / "old"
    (old / "base").mkdir(parents=True)
    T.write_checkpoint(old / "base" / "ckpt.pt", 0, model={}, config={"seed": 1337})
    with pytest.raises(ValueError, match=r"seed 0 \(this run: 2\)"):
        A.check_demo_settings(old, {"seed": 2, "scale": 1.0})


def test_align_resume_accepts_older_config_and_rejects_foreign_tokenizer(tmp_path):
    init = _align_write_init(tmp_path / "base")
    out = tmp_path / "sft"
    kw = dict(stage="sft", init=init, out_dir=str(out), batch_size=4, micro_batch=4, sft_examples=4,
              eval_problems=2, hard_problems=0, ckpt_interval=1, max_new_tokens=4)
    A.run_stage(A.AlignConfig(steps=1, **kw), log=lambda *a: None)
    # a checkpoint written before a default-off switch existed lacks that field: it still resumes
    ck = T.read_checkpoint(out / "ckpt.pt")
    ck["model_config"].pop("dropout")
    T.write_checkpoint(out / "ckpt.pt", ck.pop("iteration"), **ck)
    logs = []
    A.run_stage(A.AlignConfig(steps=2, **kw), log=logs.append)
    assert any("resumed" in l and "step 1" in l for l in logs), logs
    # a tokenizer folder from another corpus next to the checkpoint: refused, naming both fingerprints
    base = Path(init).parent
    other = tk.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|other|>"])
    other.save(str(base / "tokenizer"))
    with pytest.raises(ValueError, match="fingerprint"):
        A.find_tokenizer(Path(init), T.read_checkpoint(init) | {"tokenizer_fingerprint":
                                                                             _align_byte_tokenizer().fingerprint()})


# ---------------------------------------------------------------------------------------------------
# GSM8K / MMLU loaders and evaluation
# ---------------------------------------------------------------------------------------------------
def test_align_gsm8k_loader_skips_malformed_lines_and_downloads_file_url(tmp_path, capsys):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n{broken\n[1, 2]\n'
                 '{"question": "q", "answer": "no final"}\n{"question": "big", "answer": "#### 1,000"}\n')
    rows = A.load_gsm8k(str(f))
    assert [(r["question"], r["answer"]) for r in rows] == [("1+1?", "2"), ("big", "1000")]
    err = capsys.readouterr().err
    assert "3 malformed line(s): 2, 3, 4" in err
    got = A.load_gsm8k(None, cache_dir=str(tmp_path / "cache"), url=f.resolve().as_uri())  # the download path
    assert got == rows and (tmp_path / "cache" / "test.jsonl").exists()


def test_align_mmlu_loader_skips_malformed_rows(tmp_path, capsys):
    d = tmp_path / "test"
    d.mkdir()
    (d / "toy_subject_test.csv").write_text('"What, exactly?",a,b,c,d,B\nshort,row\nq,a,b,c,d,E\nq2,1,2,3,4,D\n')
    rows = A.load_mmlu(str(tmp_path))
    assert [(r["subject"], r["question"], r["answer"]) for r in rows] == \
        [("toy_subject", "What, exactly?", "B"), ("toy_subject", "q2", "D")]
    err = capsys.readouterr().err
    assert "toy_subject_test.csv:2" in err and "toy_subject_test.csv:3" in err and "2 malformed" in err
    m, tok = _align_tiny_model(ctx=256), _align_byte_tokenizer()
    r = A.evaluate_mmlu(m, tok, rows, batch_size=2, max_new_tokens=2)
    assert r["n"] == 2 and 0 <= r["loglik"]["accuracy"] <= 1 and 0 <= r["letter"]["accuracy"] <= 1
    # a question longer than the context: the prompt keeps its end, long options are cut, nothing crashes
    long_rows = [dict(rows[0], question="why? " * 80, options=["x" * 100, "b", "c", "d"])]
    r = A.evaluate_mmlu(_align_tiny_model(ctx=48), tok, long_rows, batch_size=1, max_new_tokens=2)
    assert r["n"] == 1
    # GSM8K on a model whose context cannot hold the R1-Zero prompt: a clear error, not a crash in forward
    with pytest.raises(ValueError, match="longer than the model's context"):
        A.evaluate_gsm8k(m, tok, [{"question": "1+1?", "answer": "2"}])


@pytest.mark.skipif(workspace("data", "gsm8k") is None or workspace("data", "mmlu") is None,
                    reason="needs SCRATCHLM_WORKSPACE's data/gsm8k and data/mmlu (absent on a user's machine)")
def test_align_loaders_on_the_shared_copies_of_gsm8k_and_mmlu():
    """Uses the workspace's data/gsm8k and data/mmlu (copies of the standard files)."""
    g = A.load_gsm8k(str(workspace("data", "gsm8k", "test.jsonl")))
    assert len(g) == 1319 and g[0]["answer"] == "18"
    mm = A.load_mmlu(str(workspace("data", "mmlu")), "test")
    assert len({r["subject"] for r in mm}) == 57 and len(mm) > 14000
    assert all(r["answer"] in "ABCD" and len(r["options"]) == 4 for r in mm)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def _align_broken_reward(resp, gt):
    raise KeyError("boom")


_ALIGN_ONE = lambda r, g: {"reward": 1.0}  # noqa: E731
_ALIGN_LP, _ALIGN_ADV = torch.tensor([[-1.0, -2.0]]), torch.tensor([[0.5]])


def _align_short_context_run(tmp_path, stage, eval_problems=0):
    """A stage from a model whose 48-token context cannot hold the task's prompt + response."""
    init = _align_write_init(tmp_path / "short", ctx=48)
    return A.run_stage(A.AlignConfig(stage=stage, init=init, out_dir=str(tmp_path / stage), steps=1, batch_size=2,
                                     group_size=2, eval_problems=eval_problems, hard_problems=0), log=lambda *a: None)


# Every error path of the stage, one row each: a call (given tmp_path) -> (exception, message), or a command line
# (list) -> (exit status, message). A command line fails with ONE line on stderr, never a traceback, before any work.
@pytest.mark.parametrize("case,expected,message", [
    (lambda _: A.compute_group_normalized_rewards(_ALIGN_ONE, [], [], 4, 1e-6, True), ValueError, "empty group"),
    (lambda _: A.compute_group_normalized_rewards(_ALIGN_ONE, ["a"] * 6, ["g"] * 6, 4, 1e-6, True), ValueError,
     "groups of 4"),
    (lambda _: A.compute_group_normalized_rewards(_align_broken_reward, ["a", "b"], ["g", "g"], 2, 1e-6, True),
     RuntimeError, "rollout 0"),
    (lambda _: A.compute_policy_gradient_loss(_ALIGN_LP, "grpo_clip", advantages=_ALIGN_ADV, cliprange=0.2),
     ValueError, "old_log_probs"),
    (lambda _: A.compute_policy_gradient_loss(_ALIGN_LP, "ppo", advantages=_ALIGN_ADV), ValueError, "loss_type"),
    (lambda _: A.tokenize_prompt_and_output(["a"], [], _align_byte_tokenizer()), ValueError, "1 prompts but 0"),
    (lambda _: A.sample_rollouts(_align_tiny_model(seed=3), [[1] * 190], 2, 10, 1.0, None), ValueError, "context"),
    # the library checks the same ranges as the command line, before touching the folder or the checkpoint
    (lambda t: A.run_stage(A.AlignConfig(stage="grpo", group_size=1, init="x.pt", out_dir=str(t))), ValueError,
     "--group-size must be >= 2 for grpo"),
    (lambda t: A.run_stage(A.AlignConfig(stage="sft", lr=float("inf"), init="x.pt", out_dir=str(t))), ValueError,
     "--lr must be > 0, got inf"),
    # a context too short for the task: named with its numbers, before any step (was "solutions up to 0 tokens")
    (lambda t: _align_short_context_run(t, "grpo"), ValueError,
     r"context of 48 tokens is too short for grpo: the longest training prompt \+ --max-new-tokens 40 is \d+ tokens"),
    (lambda t: _align_short_context_run(t, "sft"), ValueError,
     r"too short for sft: the longest prompt \+ worked solution is \d+ tokens"),
    (lambda t: _align_short_context_run(t, "ei", eval_problems=2), ValueError,  # the final evaluation too
     r"too short for ei: the longest test prompt \+ 48 new tokens \(evaluation\) is \d+ tokens"),
    (["grpo", "--init", "x.pt", "--steps", "0"], 2, "--steps must be >= 1, got 0"),
    (["grpo", "--init", "x.pt", "--loss-type", "ppo"], 2, "--loss-type must be one of"),
    (["dpo", "--init", "x.pt", "--length-normalization", "max"], 2, "--length-normalization must be one of"),
    (["grpo", "--init", "x.pt", "--temperature", "-1"], 2, "--temperature must be > 0 for grpo"),
    (["ei", "--init", "x.pt", "--temperature", "-1"], 2, "--temperature must be >= 0, got -1.0"),
    (["dpo", "--init", "x.pt", "--beta", "-1"], 2, "--beta must be > 0, got -1.0"),
    (["grpo", "--init", "x.pt", "--cliprange", "-0.5"], 2, "--cliprange must be > 0, got -0.5"),
    (["grpo", "--init", "x.pt", "--group-size", "1"], 2, "--group-size must be >= 2 for grpo (it compares"),
    (["dpo", "--init", "x.pt", "--group-size", "1"], 2, "--group-size must be >= 2 for dpo"),
    (["sft", "--init", "x.pt", "--lr", "nan"], 2, "--lr must be > 0, got nan"),
    (["ei", "--init", "x.pt", "--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1, got 0"),
    (["eval", "--checkpoint", "x.pt", "--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1, got 0"),
    (["bench", "--prompt-lengths", "16", "0"], 2, "--prompt-lengths must be >= 1, got 0"),
    (["sft"], 2, "give exactly one of --init CKPT and --pretrained"),
    (["eval", "--checkpoint", "x.pt", "--pretrained", "gpt2"], 2, "give exactly one of --checkpoint CKPT"),
    (["bench", "--repeats", "0"], 2, "--repeats must be >= 1"),
    (["eval", "--checkpoint", "{tmp}/none.pt"], 1, "does not exist"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_align_errors(case, expected, message, tmp_path, capsys):
    if callable(case):
        with pytest.raises(expected, match=message):
            case(tmp_path)
        return
    # in-process (a subprocess per row would cost a torch import each): main's own exit and its stderr
    with pytest.raises(SystemExit) as exit_info:
        A.main([a.replace("{tmp}", str(tmp_path)) for a in case])
    err = capsys.readouterr().err
    assert exit_info.value.code == expected and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_align_command_line_runs_and_help_shows_defaults():
    """One real subprocess (the script's entry point: a usage error is one line), and every stage's --help
    showing the defaults of its options."""
    root = str(Path(A.__file__).resolve().parent)
    r = subprocess.run([sys.executable, "align.py", "grpo", "--init", "x.pt", "--beta", "nan"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "align.py: error: --beta must be > 0, got nan", r.stderr
    for stage in ("sft", "ei", "grpo", "dpo"):  # in-process: the same parser the script builds
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            A.main([stage, "--help"])
        text = " ".join(out.getvalue().split())  # argparse wraps help lines at the terminal's width
        assert "--lr LR AdamW learning rate (default: 0.001)" in text, text
        assert "--group-size GROUP_SIZE rollouts per prompt (default: 8)" in text, text


@pytest.mark.skipif(workspace("tiktoken") is None,
                    reason="needs the workspace's tiktoken/ (GPT-2's tokenizer files; absent on a user's machine)")
def test_align_stage_from_a_pretrained_gpt2_folder(tmp_path, monkeypatch):
    """`--pretrained PATH`: a random GPT-2-shaped safetensors folder (HF layout) goes through model.from_pretrained
    and GPT-2's tokenizer (the workspace's tiktoken/ files), takes an SFT step and leaves a checkpoint that loads."""
    import struct
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(workspace("tiktoken")))
    g = torch.Generator().manual_seed(0)
    V, Tn, d = 50257, 128, 8
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    t = {"wte.weight": r(V, d), "wpe.weight": r(Tn, d), "ln_f.weight": 1 + r(d), "ln_f.bias": r(d),
         "h.0.ln_1.weight": 1 + r(d), "h.0.ln_1.bias": r(d), "h.0.ln_2.weight": 1 + r(d), "h.0.ln_2.bias": r(d),
         "h.0.attn.c_attn.weight": r(d, 3 * d), "h.0.attn.c_attn.bias": r(3 * d), "h.0.attn.c_proj.weight": r(d, d),
         "h.0.attn.c_proj.bias": r(d), "h.0.mlp.c_fc.weight": r(d, 4 * d), "h.0.mlp.c_fc.bias": r(4 * d),
         "h.0.mlp.c_proj.weight": r(4 * d, d), "h.0.mlp.c_proj.bias": r(d)}
    header, blobs, off = {}, [], 0
    for k, v in t.items():  # safetensors: 8-byte header length, JSON header, raw little-endian float32
        b = v.numpy().astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": V, "n_positions": Tn,
                                                           "n_embd": d, "n_layer": 1, "n_head": 2, "n_inner": None,
                                                           "activation_function": "gelu_new",
                                                           "layer_norm_epsilon": 1e-5}))
    out = tmp_path / "sft"
    res = A.run_stage(A.AlignConfig(stage="sft", pretrained=str(folder), out_dir=str(out), steps=1, batch_size=2,
                                    sft_examples=2, eval_problems=2, hard_problems=0, max_new_tokens=4),
                      log=lambda *a: None)
    assert res["test"]["n"] == 2
    model, tok, _ = A.load_policy(str(out / "ckpt.pt"))  # the stage's output loads like any other checkpoint
    assert tok.eot_id == 50256 and model.config.vocab_size == V
