"""
tokenizer.py -- stage 1 of ScratchLM: a byte-level BPE tokenizer, from scratch, then fast.

The problem
-----------
A language model reads integers, not text, so we need a reversible map  text <-> list of ids.
There are four obvious choices, and the trade-off between them is the whole story:

* characters (Unicode code points): ~150k possible symbols, most of them never seen in training, so the
  embedding table is huge and sparse; and a sequence is as long as the text (1 token per char).
* bytes (UTF-8): only 256 symbols and nothing is ever out-of-vocabulary, but sequences get even longer
  (an English character is 1 byte, a CJK character 3, an emoji 4). Attention costs O(T^2) in the sequence
  length T, so long sequences are expensive.
* words: short sequences, but an open vocabulary: every new name, typo or number is unknown.
* BPE (byte-pair encoding, Sennrich et al. 2016 / GPT-2 2019): start from the 256 bytes and repeatedly
  glue together the most frequent adjacent pair into a new token. Frequent strings ("the", " and",
  "ing") become single tokens, rare strings fall back to smaller pieces and, in the worst case, to raw
  bytes -- so nothing is ever unknown, and common text gets short.

We measure how well a tokenizer packs text by its *compression ratio* = UTF-8 bytes / tokens. Bytes give
exactly 1.0; GPT-2's 50k BPE gives ~4.3 on English prose; our 10k BPE on mixed text gives ~3.8 (see the
bench). Higher is better: the model sees more text per position of its context for the same compute.

Two rules make byte-level BPE behave (both from GPT-2):
1. Pre-tokenization. Before BPE, text is cut into "pre-tokens" by a regex (letters, digits, punctuation,
   whitespace runs, with an optional leading space, and English contractions); merges never cross a
   pre-token, so we don't learn junk like "dog." vs "dog!" vs "dog?" as separate tokens.
2. Special tokens such as <|endoftext|> are cut out first and are never merged into or across.

What it costs: training is a greedy loop of `vocab_size - 256 - len(special_tokens)` merges; done naively
each merge recounts every pair in the corpus (O(merges x corpus)). The fast trainer below counts each
distinct pre-token once (with its multiplicity) and updates pair counts incrementally, touching only the
words that contain the merged pair. Encoding replays the merges by rank inside each pre-token.

Special tokens in untrusted text: by the course's convention every `<|endoftext|>` string becomes the separator
token, right for a corpus we assembled, wrong for web text (a page could inject a document boundary); `encode`
takes tiktoken's keywords `allowed_special` and `disallowed_special` (see that Menu section).

Sources
-------
* P. Gage, "A New Algorithm for Data Compression", C Users Journal 1994 -- byte-pair encoding itself.
* R. Sennrich, B. Haddow, A. Birch, "Neural Machine Translation of Rare Words with Subword Units",
  arXiv:1508.07909 -- BPE as a subword vocabulary, the merge-the-most-frequent-pair training loop.
* A. Radford et al., "Language Models are Unsupervised Multitask Learners" (the GPT-2 report, 2019) --
  byte-level BPE, the pre-tokenization regex, no merges across character categories; its released
  `encoder.json`/`vocab.bpe` define the file format used here.
* C. Wang, K. Cho, J. Gu, "Neural Machine Translation with Byte-Level Subwords", arXiv:1909.03341.
* A. Karpathy, minbpe (github.com/karpathy/minbpe) -- the readable encoder's shape; OpenAI's tiktoken -- the
  Rust BPE core used as the fast path; Stanford CS336 assignment 1 -- the `train_bpe`/`Tokenizer` interface.

The file, in reading order
--------------------------
The core: 1. readable BPE from scratch (`get_stats`, `merge`, pre-tokenization, `train_bpe_reference`);
2. the real trainer `train_bpe` (parallel pre-tokenization, incremental pair counts, a lazy max-heap; a test
proves it equals the reference); 3. `Tokenizer`: encode, decode, save/load in GPT-2's file format.
The menu: special tokens in untrusted text; fast and streaming tokenization (the merges compiled into a
`tiktoken.Encoding`, `encode_iterable`, `encode_file` -> a flat `.bin` for np.memmap); GPT-2 parity
(`gpt2_tokenizer()`). Then the appendices: plumbing every stage file imports, benchmarks, command line.

Command line (`python tokenizer.py --help`):
    python tokenizer.py                                   # demo: train on this file's own text, encode/decode
    python tokenizer.py train --input FILE --vocab-size N --special-tokens '<|endoftext|>' --out DIR
    python tokenizer.py encode --tokenizer DIR --input FILE --out FILE.bin [--special-text ordinary] [--force]
    python tokenizer.py bench --data-dir DIR  # vs HuggingFace tokenizers and tiktoken
"""

import argparse
import bisect
import contextlib
import errno
import functools
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict, namedtuple
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex  # the `regex` package: supports \p{L} (Unicode letter) classes that `re` lacks

# GPT-2's pre-tokenization pattern, exactly as published: contractions, optional-space + letters,
# optional-space + digits, optional-space + punctuation, whitespace not followed by a non-space (so the
# last space before a word stays attached to the word: " world"), and any other whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same split written the way tiktoken writes it for its Rust regex engine: possessive quantifiers
# (`++`, never backtrack) and `\s++$` / `\s` instead of `\s+`. It splits every string identically
# (`\s+(?!\S)` already takes a whitespace run that ends the text, and the final `\s+` alternative can only
# ever match one character) but runs faster. Used only for the compiled fast path; tests check agreement.
FAST_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT = "<|endoftext|>"
_INF = float("inf")


# ---- 1. Readable BPE, from scratch (minbpe style) ----
# BPE by hand, on the one-word corpus "aaabdaaabac" (the classic example; a test checks every step):
#   pair counts  aa:4  ab:2  bd:1  da:1  ba:1  ac:1           -> merge (a, a) into token 256 = "aa"
#   aa a b d aa a b a c: (aa, a):2 ties (a, b):2; the tie goes to the greater byte string b"aa" > b"a"
#                                                               -> merge (aa, a) into 257 = "aaa"
#   aaa b d aaa b a c:   (aaa, b):2 is now the unique maximum   -> merge (aaa, b) into 258 = "aaab"
# Eleven bytes became five tokens "aaab d aaab a c" with a vocab of 259. Training is that loop; encoding
# a new text replays the learned merges in the same order (lowest rank first) inside each pre-token.

def get_stats(ids, counts=None, weight=1):
    """Count adjacent pairs in a list of ids: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}.

    `counts` lets callers accumulate over many words; `weight` counts the word `weight` times (a pre-token
    that occurs 1000 times in the corpus adds 1000 to each of its pairs)."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids` (left to right, non-overlapping) by `new_id`.

    merge([1, 1, 1, 2], (1, 1), 9) -> [9, 1, 2]  (the leftmost occurrence wins an overlap)."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


@functools.lru_cache(maxsize=None)
def _split_regex(pattern=GPT2_SPLIT_PATTERN):  # compiled once per process
    return regex.compile(pattern)


def _special_regex(special_tokens, as_bytes=False):
    """A regex that finds special tokens, longest first, or None when there are none.

    Regex alternation takes the FIRST alternative that matches at a position, so sorting by length
    (longest first) makes `<|endoftext|><|endoftext|>` win over `<|endoftext|>` when both are registered.
    The capture group makes `split` keep the special tokens in its output (at odd indices)."""
    if not special_tokens:
        return None
    toks = sorted(set(special_tokens), key=len, reverse=True)
    if as_bytes:
        return re.compile(b"(" + b"|".join(re.escape(t.encode("utf-8")) for t in toks) + b")")
    return re.compile("(" + "|".join(re.escape(t) for t in toks) + ")")


def split_on_special_tokens(text, special_tokens):
    """[(piece, is_special)] with the special tokens cut out (longest match first), empty pieces dropped.

    split_on_special_tokens("a<|endoftext|>b", ["<|endoftext|>"]) -> [("a", False), ("<|endoftext|>", True),
    ("b", False)]."""
    special_re = _special_regex(special_tokens)
    if special_re is None:
        return [(text, False)] if text else []
    return [(p, i % 2 == 1) for i, p in enumerate(special_re.split(text)) if p]


def pretokenize(text, special_tokens=()):
    """Pre-tokens of `text` (special tokens removed; they are never part of a merge).

    pretokenize("Hello, world! It's 42") -> ["Hello", ",", " world", "!", " It", "'s", " 42"]."""
    split = _split_regex()
    return [tok for piece, special in split_on_special_tokens(text, special_tokens) if not special
            for tok in split.findall(piece)]


def _initial_vocab(specials):
    """ids 0..255 are the single bytes (id i = bytes([i])), then the special tokens in the given order."""
    return {i: bytes([i]) for i in range(256)} | {256 + k: s.encode("utf-8") for k, s in enumerate(specials)}


def train_bpe_reference(text, vocab_size, special_tokens=()):
    """The textbook trainer, for reading and for checking the fast one (slow: it recounts every step).
    Same interface and result as `train_bpe`, on a string instead of a file."""
    specials = _check_vocab_size(vocab_size, special_tokens)
    # cost: every merge recounts every pair of every distinct pre-token, O(merges x corpus); fine for
    # tests and reading, hopeless for 10k merges on a real corpus (section 2 fixes that)
    vocab = _initial_vocab(specials)
    # distinct pre-tokens with their multiplicities: the corpus is a bag of words for BPE's purposes
    words = Counter(tok.encode("utf-8") for tok in pretokenize(text, specials))
    words = [(list(w), n) for w, n in words.items()]
    merges = []
    for _ in range(vocab_size - len(vocab)):
        stats = {}
        for ids, n in words:
            get_stats(ids, stats, weight=n)
        if not stats:
            break  # every pre-token is a single token: nothing left to merge
        # the most frequent pair; among equal counts the lexicographically greater (bytes_a, bytes_b), the
        # course's rule, so that training is deterministic and the fast trainer can be checked against this
        pair = max(stats, key=lambda p: (stats[p], vocab[p[0]], vocab[p[1]]))
        new_id = len(vocab)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        words = [(merge(ids, pair, new_id), n) for ids, n in words]
    _warn_if_vocab_short("the text", vocab_size, len(vocab), len(words))
    return vocab, merges


# ---- 2. The fast trainer ----
# Where the time goes in the reference trainer: (a) the regex over the whole corpus, (b) recounting all
# pairs of all words at every merge. Fixes:
#   (a) run the regex in worker processes over chunks of the file (each worker reads only its own byte
#       range, so the corpus never has to fit in memory; the chunks are cut where the whole text has a
#       pre-token boundary anyway, see "safe cut points" in the Menu on streaming), and count DISTINCT
#       pre-tokens: a 6 MB corpus has ~1.4M pre-tokens but only ~48k distinct ones.
#   (b) keep pair -> count and pair -> {words containing it}; after merging (a, b) -> z only the words that
#       contained (a, b) change, and only pairs around the merge sites change count. The best pair comes
#       from a max-heap with lazy invalidation: a stale entry (count went down) is re-pushed with its true
#       count when it surfaces, so it never wins unfairly.


def _count_pretokens_in_chunk(task):
    """Worker: distinct pre-tokens (as UTF-8 bytes) of one file chunk, with their counts."""
    path, start, end, special_tokens = task
    text = _read_chunk_text(path, start, end)
    split = _split_regex(FAST_SPLIT_PATTERN)  # identical split, faster (possessive) regex
    counts = Counter()
    for piece, special in split_on_special_tokens(text, special_tokens):
        if not special:
            counts.update(split.findall(piece))  # Counter.update on an iterable runs in C
    # counted as str (cheap to hash), sent back as UTF-8 bytes: BPE works on bytes, and the result is only
    # the distinct pre-tokens, tens of thousands of small objects instead of the chunk's millions
    return {tok.encode("utf-8"): n for tok, n in counts.items()}, end - start


def count_pretokens(input_path, special_tokens=(), *, num_workers=None, progress=True, chunk_bytes=None):
    """Stream a file through the pre-tokenizer in parallel -> {pre-token bytes: count}. Neither the text nor its
    pre-tokens cross a process boundary (fix (a) above); counters merge in any order, so first done, first taken."""
    size = _check_input_file(input_path)
    num_workers = _default_workers(num_workers)
    if chunk_bytes is None:  # ~4 chunks per worker for load balance; <= 8 MB so a worker's pre-token list
        chunk_bytes = min(max(size // (4 * num_workers) + 1, 1 << 20), 8 << 20)  # stays ~100s of MB at most
    bounds = _chunk_boundaries(input_path, size, special_tokens, chunk_bytes)
    tasks = [(os.fspath(input_path), a, b, list(special_tokens)) for a, b in zip(bounds, bounds[1:])]
    bar = Progress(progress, "pre-tokenize")
    total, done = Counter(), 0
    with _chunk_results(_count_pretokens_in_chunk, tasks, num_workers, ordered=False) as results:
        for counts, nbytes in results:
            total.update(counts)
            done += nbytes
            bar.update(f"{done / 1e6:.1f}/{size / 1e6:.1f} MB ({100 * done / size:.0f}%), "
                       f"{len(total):,} distinct pre-tokens")
    bar.close(f"{size / 1e6:.1f} MB, {sum(total.values()):,} pre-tokens, {len(total):,} distinct")
    return total


# The heap orders pairs by (-count, key) with Python's min-heap, so for ties we need a key that sorts the
# lexicographically GREATER (bytes_a, bytes_b) first. Map each byte x -> chr(255 - x) and end the token
# with chr(256): a larger byte gives a smaller char, and a proper prefix ("ab" < "abc") gets the larger
# terminator, so key(s) < key(t) exactly when s > t. The terminator never appears elsewhere, so comparing
# key(a) + key(b) as one string is the same as comparing the pair (key(a), key(b)).
_REVERSE_BYTES = bytes(range(255, -1, -1))


def _reverse_order_key(token: bytes) -> str:
    """Sort key: key(s) < key(t) exactly when bytes s > t (see above)."""
    return token.translate(_REVERSE_BYTES).decode("latin-1") + "\u0100"


def _train_merges(word_counts, vocab, num_merges, progress=True):
    """The merge loop with incremental pair counts. Mutates `vocab`; returns the merges.

    Cost per merge: O(occurrences of the merged pair) list work plus O(log P) heap work per changed pair
    (P = distinct pairs), instead of the reference's O(corpus). Early merges (" t", "he") touch most
    words; late ones touch a handful, so the loop speeds up as it goes."""
    # State: words[wi] = the current ids of distinct pre-token wi, freqs[wi] = how often it occurs;
    # pair_counts and pair_words are the two indexes that make one merge cheap.
    words = [list(w) for w in word_counts]  # bytes -> [byte values] = ids (id i is bytes([i]))
    freqs = list(word_counts.values())
    pair_counts = defaultdict(int)  # (a, b) -> occurrences in the corpus (weighted by word frequency)
    pair_words = defaultdict(set)  # (a, b) -> indices of words that contain (or once contained) it
    for wi, w in enumerate(words):
        f = freqs[wi]
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            pair_words[pair].add(wi)
    keys = {i: _reverse_order_key(tok) for i, tok in vocab.items()}
    heap = [(-c, keys[a] + keys[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    heappop, heappush = heapq.heappop, heapq.heappush
    bar = Progress(progress, "merges")
    merges, next_id, t0 = [], len(vocab), time.perf_counter()
    for step in range(num_merges):
        # 1. the most frequent pair: pop until an entry's count is current (lazy invalidation)
        while heap:
            neg, key, a, b = heappop(heap)
            c = pair_counts.get((a, b), 0)
            if c == -neg:
                break
            if c > 0:
                heappush(heap, (-c, key, a, b))  # stale: counts only ever drop, so re-queue the true count
        else:
            break  # nothing left to merge: every pre-token is a single token
        z, next_id = next_id, next_id + 1
        vocab[z] = vocab[a] + vocab[b]
        keys[z] = _reverse_order_key(vocab[z])
        merges.append((vocab[a], vocab[b]))
        # 2. rewrite only the words that contain (a, b); adjust the counts of the pairs around each site
        new_pairs = set()
        for wi in pair_words.pop((a, b)):
            _merge_word(words[wi], a, b, z, freqs[wi], wi, pair_counts, pair_words, new_pairs)
        pair_counts.pop((a, b), None)  # every occurrence was merged
        for p in new_pairs:
            heappush(heap, (-pair_counts[p], keys[p[0]] + keys[p[1]], p[0], p[1]))
        if step % 64 == 0:
            rate = (step + 1) / max(time.perf_counter() - t0, 1e-9)
            bar.update(f"{step + 1:,}/{num_merges:,} ({rate:,.0f} merges/s)")
    rate = len(merges) / max(time.perf_counter() - t0, 1e-9)
    bar.close(f"{len(merges):,}/{num_merges:,} ({rate:,.0f} merges/s)")
    return merges


def _merge_word(w, a, b, z, f, wi, pair_counts, pair_words, new_pairs):
    """Merge every (a, b) in word `w` (which occurs f times) into z, in place, updating the pair counts.

    At each site  L a b R  becomes  L z R, so the pairs (L, a) and (b, R) lose f occurrences and (L, z),
    (z, R) gain f. The a's are found with C-level list methods (`count`, then `index`; most words hold a
    single site, or none when the index entry is stale) and each site is spliced in place. With a == b
    ("a a a") the sites overlap: the leftmost wins, exactly as `merge` does in the reference trainer."""
    j = -1
    for _ in range(w.count(a)):
        try:
            j = w.index(a, j + 1)
        except ValueError:
            return  # (a == b: each merge consumed two of the a's counted)
        n = len(w)
        if j + 1 == n or w[j + 1] != b:
            continue  # an `a` without `b` after it
        if j:
            left = w[j - 1]
            if left != z:
                pair_counts[(left, a)] -= f
            # (left == z: the previous site already removed the old pair (b, a) and left (z, z)
            #  for us to add here)
            pair_counts[(left, z)] += f
            new_pairs.add((left, z))
            pair_words[(left, z)].add(wi)
        if j + 2 < n:
            right = w[j + 2]
            pair_counts[(b, right)] -= f
            if not (right == a and j + 3 < n and w[j + 3] == b):
                # (if the next site starts right here, that site adds (z, z) itself)
                pair_counts[(z, right)] += f
                new_pairs.add((z, right))
                pair_words[(z, right)].add(wi)
        w[j:j + 2] = [z]


def train_bpe(input_path, vocab_size, special_tokens=(), *, num_workers=None, progress=True, chunk_bytes=None):
    """Train a byte-level BPE on a UTF-8 text file -> (vocab {id: bytes}, merges [(bytes, bytes)]).

    ids: the 256 bytes, the special tokens in the given order, then one per merge in merge order. Same result
    as `train_bpe_reference` on the file's text (tested); pre-tokenizes in `num_workers` processes (default: all
    cores) over chunks of `chunk_bytes`. A corpus that runs out of pairs stops early with a UserWarning (naming
    the file and both sizes): the vocab is then smaller than `vocab_size`."""
    specials = _check_vocab_size(vocab_size, special_tokens)
    # 1. the corpus as a bag of distinct pre-tokens (parallel); 2. the merge loop on that bag (serial, but
    # on ~50k distinct words instead of millions of occurrences)
    word_counts = count_pretokens(input_path, specials, num_workers=num_workers, progress=progress,
                                  chunk_bytes=chunk_bytes)
    vocab = _initial_vocab(specials)
    merges = _train_merges(word_counts, vocab, vocab_size - len(vocab), progress=progress)
    _warn_if_vocab_short(os.fspath(input_path), vocab_size, len(vocab), len(word_counts))
    return vocab, merges


# ---- 3. The tokenizer: encode, decode, save/load ----
# The CS336 interface: Tokenizer(vocab, merges, special_tokens), .encode(text) -> ids, .decode(ids) -> text,
# .encode_iterable(lines) -> ids lazily, and Tokenizer.from_files(vocab_path, merges_path, specials).
# Encoding must reproduce training's segmentation exactly: the same pre-tokenizer, special tokens cut out
# first, and the merges replayed in training order inside each pre-token.

def token_dtype(vocab_size):
    """Smallest unsigned dtype that holds every id: uint16 up to 65,536 tokens, else uint32.

    A 10 GB corpus at ~4 bytes/token is 2.5G tokens: 5 GB as uint16, 20 GB as int64 (torch's default)."""
    if vocab_size <= 0 or vocab_size > 2 ** 32:
        raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


class Tokenizer:
    """Byte-level BPE tokenizer: `encode(text) -> ids`, `decode(ids) -> text`.

    vocab: {id: bytes}, ids 0..N-1 (every single byte must be present); merges: [(bytes_a, bytes_b)] in
    training order (rank 0 = first merge). special_tokens missing from the vocab are appended to it.
    fast=True (default) compiles a tiktoken encoder when it provably gives the same ids (Menu: fast and
    streaming tokenization); `use_fast = False` forces the readable pure-Python encoder at any time."""

    CACHE_SIZE = 1 << 17  # pre-token -> ids cache entries; cleared when full so memory stays bounded
    STREAM_BUFFER = 1 << 16  # encode_iterable encodes and drops its buffer about every this many characters

    def __init__(self, vocab, merges, special_tokens=None, *, fast=True):
        # all 256 single bytes must be present, else nothing could encode an unseen byte; byte_to_id: the inverse
        self.vocab, self.byte_to_id = _checked_vocab(vocab)
        # special tokens: reuse an id if the bytes exist (GPT-2's vocab already holds <|endoftext|> = 50256),
        # else append after the merges; keep registration order, drop repeats
        self.special_tokens = _checked_specials(special_tokens)
        for tok in (s.encode("utf-8") for s in self.special_tokens):
            self.vocab[self.byte_to_id.setdefault(tok, len(self.vocab))] = tok  # its id, or the next free one
        self.special_ids = {s: self.byte_to_id[s.encode("utf-8")] for s in self.special_tokens}
        self.merges = []
        self._pair_rank, self._rank_id = {}, []
        for rank, m in enumerate(merges):
            if len(m) != 2:
                raise _BadMerge(rank, f"merge #{rank} must be a pair, got {m!r}")
            a, b = bytes(m[0]), bytes(m[1])
            for part in (a, b, a + b):
                if part not in self.byte_to_id:
                    raise _BadMerge(rank, f"merge #{rank} ({a!r}, {b!r}): token {part!r} is not in the vocab")
            pair = (self.byte_to_id[a], self.byte_to_id[b])
            if pair in self._pair_rank:
                raise _BadMerge(rank, f"merge #{rank} ({a!r}, {b!r}) is listed twice")
            self._pair_rank[pair] = rank
            self._rank_id.append(self.byte_to_id[a + b])
            self.merges.append((a, b))
        # The encoder's tables, all keyed by ids: _pair_rank[(a, b)] = when (a, b) was merged (lower merges
        # first), _rank_id[rank] = the token the merge makes, _byte_ids[byte] = its id.
        self._byte_ids = [self.byte_to_id[bytes([b])] for b in range(256)]
        self._split = _split_regex(GPT2_SPLIT_PATTERN)
        self._special_re = _special_regex(self.special_tokens)  # every registered special, longest first
        self._policies = {}  # (allowed_special, disallowed_special) -> _SpecialPolicy, see `special_policy`
        self._specials_overlap = _specials_overlap(self.special_tokens)
        self._cache = {}  # pre-token string -> ids, shared by every encode call (bounded, see CACHE_SIZE)
        self._fast, self.fast_reason = None, "disabled (fast=False)"
        if fast:
            self._fast, self.fast_reason = _compile_fast(self)
        self.use_fast = self._fast is not None

    # ---- small facts ---------------------------------------------------------------------------------
    @property
    def vocab_size(self):
        """Number of ids: 256 bytes + special tokens + merges (the model's embedding rows)."""
        return len(self.vocab)

    @property
    def eot_id(self):
        """Id of <|endoftext|> (the document separator), or None if the vocab doesn't have it."""
        return self.byte_to_id.get(EOT.encode("utf-8"))

    def fingerprint(self):
        """A 16-hex hash of the vocab, merges and special tokens. A checkpoint stores it, so a tokenizer folder
        from another corpus (same vocab size, different ids) is caught instead of sampling garbage."""
        return _fingerprint(self.vocab, self.merges, self.special_tokens)

    def token_byte_lengths(self):
        """(vocab_size,) int64: UTF-8 byte length of each token, for bits-per-byte = nats / ln2 / bytes.

        Loss per token depends on the tokenizer (a bigger vocab packs more bytes into each token), loss per
        byte does not: sum of -ln p over the tokens, / ln 2, / the bytes those tokens stand for = bpb, a
        figure comparable across tokenizers and with character-level models."""
        return np.array([len(self.vocab[i]) for i in range(self.vocab_size)], dtype=np.int64)

    # ---- the readable encoder ---------------------------------------------------------------------------
    def _bpe(self, piece: bytes):
        """Apply the merges to one pre-token, lowest rank first (= training order).

        minbpe's loop: find the adjacent pair with the lowest merge rank, merge it, repeat until no pair is
        a merge. Merging the leftmost occurrence first and coming back for the others is the same as
        training's "merge every occurrence, left to right", because a merge only creates pairs that involve
        the new token, whose ranks are higher. Done in place: after merging at k only the ranks of the two
        neighbouring pairs change, so each round is one C-level min() plus O(1) updates.

        Example with the merges of "aaabdaaabac" (section 1): "aaab" -> [a, a, a, b], ranks [0, 0, inf]:
        merge rank 0 at 0 -> [aa, a, b], ranks [1, inf] -> merge rank 1 -> [aaa, b], ranks [2] -> [aaab]."""
        ids = [self._byte_ids[b] for b in piece]
        rank_get, inf = self._pair_rank.get, _INF
        ranks = list(map(rank_get, zip(ids, ids[1:]), repeat(inf)))  # ranks[i] = rank of (ids[i], ids[i+1])
        while ranks:
            best = min(ranks)
            if best == inf:
                break  # no mergeable pair left
            k = ranks.index(best)  # leftmost occurrence
            ids[k:k + 2] = [self._rank_id[best]]
            del ranks[k]
            if k > 0:
                ranks[k - 1] = rank_get((ids[k - 1], ids[k]), inf)
            if k < len(ranks):
                ranks[k] = rank_get((ids[k], ids[k + 1]), inf)
        return ids

    def _encode_ordinary_readable(self, text):
        """Pre-tokenize (with the published GPT-2 regex), BPE each DISTINCT pre-token once (cached across calls),
        then concatenate. Text is very repetitive at the pre-token level (" the" is everywhere), so after a
        warm-up almost every pre-token is a cache hit; the set difference, lookups and concatenation run in C."""
        pieces = self._split.findall(text)
        cache = self._cache
        new = set(pieces).difference(cache)
        if len(cache) + len(new) > self.CACHE_SIZE:  # bound the memory: start over
            cache.clear()
            new = set(pieces)
        for piece in new:
            cache[piece] = self._bpe(piece.encode("utf-8"))
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def _around_specials(self, text, policy, encode_ordinary):
        """Cut the allowed special tokens out first (longest first): they never enter BPE. The text between
        them is pre-tokenized and BPE'd on its own by `encode_ordinary`, exactly as in training."""
        if policy.split_re is None:
            return encode_ordinary(text)
        ids = []
        for i, part in enumerate(policy.split_re.split(text)):  # odd parts: the special tokens themselves
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(encode_ordinary(part))
        return ids

    # ---- encode / decode --------------------------------------------------------------------------------
    def encode(self, text, *, allowed_special="all", disallowed_special=(), readable=False):
        """text -> list of token ids. By default every special-token string in `text` becomes its special id
        (the course's behaviour). For text you did not write, see `special_policy`: allowed_special=set()
        encodes them as ordinary text, disallowed_special="all" raises ValueError naming the first one found."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        policy = self.special_policy(allowed_special, disallowed_special)
        policy.check(text)
        if not readable and self.use_fast and self._fast is not None:
            return self._encode_fast(text, policy)  # the same merges, compiled to tiktoken (see the Menu)
        return self._around_specials(_fix_surrogates(text), policy, self._encode_ordinary_readable)

    def encode_readable(self, text, **keywords):
        """Encode with the pure-Python encoder (whatever `use_fast` says); keywords as in `encode`."""
        return self.encode(text, readable=True, **keywords)

    def decode(self, ids):
        """ids -> text. Byte sequences that are not valid UTF-8 become U+FFFD (errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        """ids -> the exact bytes. `ids`: a list/tuple/iterable of ints, or a 0-d/1-d integer numpy array
        or torch tensor (what a model's `generate` returns). Floats, bools and unknown ids are refused."""
        ids = _as_id_list(ids)
        vocab = self.vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except KeyError:
            bad = next(i for i in ids if i not in vocab)
            raise ValueError(f"token id {bad!r} is outside the vocabulary (valid ids: 0..{self.vocab_size - 1})") \
                from None

    # ---- save / load (GPT-2 file format) -------------------------------------------------------------------
    def save(self, directory):
        """Write vocab.json ({token string: id}), merges.txt and special_tokens.json into `directory`, all or
        nothing (`atomic_write_files`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_json = {_token_to_str(self.vocab[i]): i for i in range(self.vocab_size)}
        lines = ["#version: 0.2"] + [f"{_token_to_str(a)} {_token_to_str(b)}" for a, b in self.merges]
        atomic_write_files(directory, {"vocab.json": json.dumps(vocab_json, ensure_ascii=False, indent=0),
                                       "merges.txt": "\n".join(lines) + "\n",
                                       "special_tokens.json": json.dumps(self.special_tokens, ensure_ascii=False)})

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None, **kwargs):
        """Load GPT-2-format vocab.json + merges.txt (ours, GPT-2's encoder.json/vocab.bpe, HuggingFace's); any
        problem is a ValueError naming the file (and, for merges.txt, the line)."""
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        vocab = _read_vocab_json(vocab_path)
        merges, merge_lines = _read_merges_txt(merges_path)
        try:
            return cls(vocab, merges, special_tokens, **kwargs)
        except _BadMerge as e:
            raise ValueError(f"merges file {merges_path}, line {merge_lines[e.rank]}: {e} "
                             f"(vocab file {vocab_path})") from None
        except ValueError as e:
            raise ValueError(f"inconsistent tokenizer files ({vocab_path}, {merges_path}): {e}") from None

    @classmethod
    def load(cls, directory, **kwargs):
        """Inverse of `save`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        specials = []
        if (directory / "special_tokens.json").exists():
            specials = _read_json(directory / "special_tokens.json", "special-tokens file")
            if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
                raise ValueError(f"malformed special-tokens file {directory / 'special_tokens.json'}: expected "
                                 "a JSON list of strings")
        return cls.from_files(directory / "vocab.json", directory / "merges.txt", specials, **kwargs)

    # ---- plugged in from the sections after the core: special-token policy, fast path, streaming ------
    def special_policy(self, allowed_special="all", disallowed_special=()):
        """The compiled allowed/disallowed choice that `encode` applies (Menu: special tokens in untrusted text)."""
        return _compile_policy(self, allowed_special, disallowed_special)

    def _encode_fast(self, text, policy):
        """The compiled tiktoken encoder (Menu: fast and streaming tokenization)."""
        return _encode_tiktoken(self, text, policy)

    def encode_iterable(self, iterable, *, allowed_special="all", disallowed_special=()):
        """Lazily encode an iterable of strings (e.g. an open file): yields exactly encode("".join(it)), in
        constant memory (Menu: fast and streaming tokenization). Keywords as in `encode`."""
        return _encode_iterable(self, iterable, allowed_special, disallowed_special)

    def __getstate__(self):
        # pickling (worker processes): a tiktoken Encoding does not pickle, so a flag says "rebuild it on arrival"
        state = dict(self.__dict__)
        state["_fast"], state["_cache"], state["_policies"] = state["_fast"] is not None, {}, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fast = _build_tiktoken(self) if state["_fast"] else None


# ===== Menu: special tokens in untrusted text =====
# Which special-token strings in the input become special ids, as tiktoken's two keywords; it plugs into the
# core through `Tokenizer.special_policy`, which `encode` calls before encoding anything.
#
# A security question, not a detail: <|endoftext|> tells the model "a new document starts here, ignore what
# came before", and text from the web or a chat user can hold that string on purpose. The course's default
# (every special string becomes its id) suits a corpus we assembled, not untrusted text, so, as in tiktoken:
#   allowed_special    "all" or a set: these strings become their special ids;
#   disallowed_special "all" (= every special not allowed) or a set: finding one raises ValueError;
#   every other special string is encoded as ordinary text (its bytes, BPE'd like any other text).
# tiktoken's own default is disallowed_special="all" (refuse); ours keeps the course's allowed_special="all".
# Untrusted text: encode(text, allowed_special=set()), or to stop instead add disallowed_special="all".

def _compile_policy(tok, allowed_special, disallowed_special):
    """`Tokenizer.special_policy`: validate the two keywords and compile them -> `_SpecialPolicy`.

    Cached per keyword pair, because encode_iterable and encode_file call `encode` once per chunk and
    a regex compile per call would cost more than encoding a short chunk."""
    key = (_special_set(allowed_special, "allowed_special"),
           _special_set(disallowed_special, "disallowed_special"))
    policy = tok._policies.get(key)
    if policy is None:
        known = set(tok.special_tokens)
        allowed = known if key[0] == "all" else key[0]
        disallowed = known - allowed if key[1] == "all" else key[1]
        unknown = sorted((allowed | disallowed) - known)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a special token of this tokenizer (its special tokens: "
                             f"{tok.special_tokens}); allowed_special/disallowed_special may only name those")
        ordered = [t for t in tok.special_tokens if t in allowed]  # keep the registration order
        policy = _SpecialPolicy(tuple(ordered), _special_regex(ordered), _special_regex(sorted(disallowed)))
        tok._policies[key] = policy
    return policy


def _special_set(value, name):
    """tiktoken's keyword types -> "all" or a frozenset of strings (a lone string other than "all" would
    silently be a set of characters, so it is refused)."""
    if isinstance(value, str) and value == "all":
        return value
    with contextlib.suppress(TypeError):  # (frozenset of a non-iterable)
        items = None if isinstance(value, (str, bytes)) else frozenset(value)
        if items is not None and all(isinstance(t, str) for t in items):
            return items
    raise TypeError(f'{name} must be "all" or a set of special-token strings, got {value!r}')


class _SpecialPolicy(namedtuple("_SpecialPolicy", "allowed split_re refuse_re")):
    """A compiled allowed/disallowed choice: `allowed` (special strings that become ids, in registration
    order), `split_re` (cuts them out, longest first; None if none), `refuse_re` (finds forbidden ones)."""

    def check(self, text):
        """Raise DisallowedSpecialError at the first forbidden special string in `text` (tiktoken's rule:
        checked on the raw text, before any splitting, so no choice of allowed tokens can hide one)."""
        m = self.refuse_re.search(text) if self.refuse_re is not None else None
        if m:
            raise DisallowedSpecialError(m.group(), m.start())


class DisallowedSpecialError(ValueError):
    """The text holds a special-token string that `disallowed_special` forbids (`.token`, at `.position`)."""

    def __init__(self, token, position, where=""):
        self.token, self.position, self.where = token, position, where
        super().__init__(f"{where}the text contains the special token {token!r} (at {position}), which "
                         "disallowed_special forbids; allow it to encode it as the special token, or leave it "
                         "out of both allowed_special and disallowed_special to encode it as ordinary text")

    def __reduce__(self):  # so the error crosses from an encode_file worker process intact
        return type(self), (self.token, self.position, self.where)


# ===== Menu: fast and streaming tokenization =====
# The same vocab and merges, faster or in constant memory: compiled into tiktoken's Rust BPE (`Tokenizer.encode`
# takes it when `use_fast`), streamed (`encode_iterable`), and a whole corpus encoded in parallel (`encode_file`).

# ---- the fast path: compile to tiktoken --------------------------------------------------------------
# tiktoken's Rust BPE, per pre-token: if the whole piece is a token, emit it; otherwise repeatedly merge
# the adjacent pair whose CONCATENATION has the lowest rank in `mergeable_ranks`. With rank = token id
# that is merge-order BPE as long as (1) ids increase in merge order and (2) BPE applied to each token's
# own bytes gives back that token -- the two known ways to diverge are tiktoken's whole-piece shortcut
# and reaching a token through a different split than the merge that made it. We check (1), (2) and a
# sample text at construction and otherwise fall back to the readable encoder (reason in `fast_reason`);
# the tests also compare both encoders on varied and random Unicode text, and on GPT-2's real vocab.
_SAMPLE_CHECK_TEXT = ("Hello, world! It's 2024; we'll test   spaces\n\n and\ttabs. naïve café 東京 🤖 12345 "
                      "don't I'VE   \n  trailing   ")


def _build_tiktoken(tok):
    # mergeable_ranks = {token bytes: rank}; with our ids in merge order the id IS the rank, so the Rust core
    # returns our ids directly. Special tokens are passed separately and never merged.
    import tiktoken
    special = set(tok.special_ids.values())
    ranks = {t: i for i, t in tok.vocab.items() if i not in special}
    return tiktoken.Encoding(name=f"scratchlm_bpe_{tok.vocab_size}", pat_str=FAST_SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens=dict(tok.special_ids))


def _compile_fast(tok):
    """-> (tiktoken Encoding, "ok") when it provably gives our ids, else (None, the reason why not)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed"
    ids = tok._rank_id  # the token each merge makes, in merge order
    if any(y <= x for x, y in zip(ids, ids[1:])):  # (1): tiktoken ranks by id, we by merge order
        return None, "token ids are not in merge order"
    special = set(tok.special_ids.values())
    merged = set(ids)
    if special & merged:
        return None, "a special token is also produced by a merge (tiktoken would never emit it from text)"
    # (2), O(vocab x token length), a fraction of a second for GPT-2's 50k tokens: otherwise tiktoken's "the
    # whole piece is a token" shortcut would emit a token where we would not
    for i, t in tok.vocab.items():
        if len(t) > 1 and i not in special:
            if i not in merged:
                return None, f"token {i} ({t!r}) is not produced by any merge"
            if tok._bpe(t) != [i]:
                return None, f"BPE of token {i}'s own bytes ({t!r}) is not that token"
    try:
        enc = _build_tiktoken(tok)
    except Exception as e:  # e.g. an unusual vocab tiktoken refuses
        return None, f"tiktoken refused the vocab: {e}"
    sample = _SAMPLE_CHECK_TEXT + "".join(tok.special_tokens[:4])
    tok._fast = enc
    ok = _encode_tiktoken(tok, sample, tok.special_policy()) == tok.encode(sample, readable=True)
    tok._fast = None
    return (enc, "ok") if ok else (None, "sample text encoded differently")


def _encode_tiktoken(tok, text, policy):
    """`Tokenizer._encode_fast`: the allowed special tokens and the text around them, in Rust."""
    # tiktoken matches special tokens in Rust, leftmost first; when two special tokens can overlap ("<|a|>"
    # inside "<|a|><|a|>") its choice may differ from our longest-first rule, so then we cut the allowed ones
    # out here and let tiktoken encode the ordinary text between them.
    if policy.split_re is not None and not tok._specials_overlap:
        # disallowed_special=(): `encode` already refused forbidden ones; the other specials are ordinary text
        return tok._fast.encode(text, allowed_special=set(policy.allowed), disallowed_special=())
    return tok._around_specials(text, policy, tok._fast.encode_ordinary)


# ---- safe cut points --------------------------------------------------------------------------------
# To work on a text in pieces (worker chunks, a stream) and still get exactly the whole-text result, we
# cut only where the whole-text tokenization has a boundary anyway, and never inside a special token:
#   * at the start or end of a special token that will be encoded AS a special token (one that is encoded
#     as ordinary text is not a boundary: " <|endoftext|>" pre-tokenizes as " <|", "endoftext", "|>");
#   * right after "\n" when both neighbours are printable non-space ASCII ("x\ny"): the "\n" is then a
#     pre-token on its own in the whole text too, and the regex only looks ahead one character;
#   * right before " " in "letter space letter" ("a b"): the letters run stops at the space either way,
#     and " b..." starts a new pre-token either way.
# The same patterns work on str and on bytes (all cut characters are ASCII, so a cut never splits a
# UTF-8 sequence). `_find_cut` applies the rules to a buffer; `_chunk_boundaries` (plumbing) uses it to cut
# a file into worker chunks, `encode_iterable` to cut a stream.
_CUT_STR = re.compile(r"(?<=[\x21-\x7e]\n)(?=[\x21-\x7e])|(?<=[A-Za-z])(?= [A-Za-z])")
_CUT_BYTES = re.compile(rb"(?<=[\x21-\x7e]\n)(?=[\x21-\x7e])|(?<=[A-Za-z])(?= [A-Za-z])")


def _find_cut(buf, special_re, lo, hi, last, cut_at=None):
    """A safe cut p with lo <= p <= hi (the first one, or the last one if `last`), or None.

    `buf` must start at a safe position; `hi` must leave room after p for the longest special token, so
    that any special token overlapping p is fully visible in `buf`. `special_re` finds every registered
    special token (no cut inside any of them, so a forbidden one is always seen whole); only the edges of
    those in `cut_at` (default: all) are cut points."""
    if hi < lo:
        return None
    found = list(special_re.finditer(buf)) if special_re is not None else []
    spans = [m.span() for m in found]
    starts = [s for s, _ in spans]
    cut_re = _CUT_BYTES if isinstance(buf, bytes) else _CUT_STR

    def inside_special(p):  # strictly inside some special token's span?
        k = bisect.bisect_right(starts, p - 1) - 1  # last span starting before p
        return k >= 0 and spans[k][1] > p

    # candidates: the text rules (the regex looks up to 2 characters past p, hence hi + 2) and the edges
    # of the special tokens that will be encoded as specials; then drop any that fall inside a special
    cands = [m.start() for m in cut_re.finditer(buf, lo, min(hi + 2, len(buf)))]
    cands += [p for m in found if cut_at is None or m.group() in cut_at for p in m.span()]
    cands = sorted(p for p in cands if lo <= p <= hi and not inside_special(p))
    return (cands[-1] if last else cands[0]) if cands else None


def _encode_iterable(tok, iterable, allowed_special, disallowed_special):
    """`Tokenizer.encode_iterable`, in constant memory: text is buffered only up to the last safe cut point,
    encoded and dropped; a pre-token or special token that straddles two chunks waits until it is complete,
    so the ids never depend on how the input was chunked."""
    kw = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
    cut_at = set(tok.special_policy(**kw).allowed)  # checks the keywords before reading anything
    max_special = max((len(s) for s in tok.special_tokens), default=0)
    buf, pending, threshold = [], 0, tok.STREAM_BUFFER
    for chunk in iterable:
        if not isinstance(chunk, str):
            raise TypeError(f"encode_iterable expects strings, got {type(chunk).__name__}")
        buf.append(chunk)
        pending += len(chunk)
        if pending < threshold:
            continue
        text = "".join(buf)
        hi = len(text) - max_special - 2
        # cut at the LAST safe point so the kept tail is short; look in the final 4 KB first (almost always
        # found there), else further back
        cut = _find_cut(text, tok._special_re, max(1, hi - 4096), hi, last=True, cut_at=cut_at)
        if cut is None and hi - 4096 > 1:
            cut = _find_cut(text, tok._special_re, 1, hi - 4096, last=True, cut_at=cut_at)
        if cut is None:
            threshold *= 2  # no safe point yet (one huge line?): wait for more text, amortized O(n)
            buf, pending = [text], len(text)
            continue
        yield from tok.encode(text[:cut], **kw)
        buf, pending, threshold = [text[cut:]], len(text) - cut, tok.STREAM_BUFFER
    text = "".join(buf)
    if text:
        yield from tok.encode(text, **kw)


# ---- encode_file: a corpus -> a flat token file for np.memmap ----------------------------------------
# Training reads random windows of a token stream, so the stream lives on disk as one flat array of ids
# with no header: np.memmap(path, dtype=token_dtype(vocab_size)) maps it without reading it, and a batch
# of windows touches only the pages it needs. Documents stay separated by their <|endoftext|> ids.

def encode_file(tokenizer, input_path, out_path, *, num_workers=None, progress=True, chunk_bytes=None,
                allowed_special="all", disallowed_special=(), overwrite=True):
    """Encode a UTF-8 text file into a flat `.bin` of token ids (dtype `token_dtype(vocab_size)`) -> the number
    of tokens. Cut at safe points, so it equals tokenizer.encode(whole text, same keywords); the chunks are
    encoded by `num_workers` processes and written in order through `atomic_open` (until the last byte is
    synced `out_path` keeps its old content). overwrite=False refuses an existing `out_path`; a special
    token the keywords refuse is reported with the file and its byte offset."""
    size = _check_input_file(input_path)
    _check_output_file(out_path, [input_path], overwrite)  # all that can be checked before the work
    kw = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
    cut_at = tokenizer.special_policy(**kw).allowed  # also validates the keywords
    num_workers = _default_workers(num_workers)
    dtype = token_dtype(tokenizer.vocab_size)
    if chunk_bytes is None:
        chunk_bytes = min(max(size // (8 * num_workers) + 1, 1 << 20), 8 << 20)
    bounds = _chunk_boundaries(input_path, size, tokenizer.special_tokens, chunk_bytes, cut_at=cut_at)
    tasks = [(os.fspath(input_path), a, b, dtype, kw) for a, b in zip(bounds, bounds[1:])]
    bar = Progress(progress, f"encode {os.path.basename(os.fspath(input_path))}")
    n_tokens, done, t0 = 0, 0, time.perf_counter()
    # only a few chunks of ids are in flight (imap's queue): a many-GB file needs a few 8 MB chunks of memory
    with atomic_open(out_path, "wb") as f, \
            _chunk_results(_encode_chunk, tasks, num_workers, state=tokenizer) as results:
        for arr, nbytes in results:  # in file order
            f.write(arr.tobytes())
            n_tokens, done = n_tokens + len(arr), done + nbytes
            bar.update(f"{done / 1e6:.1f}/{size / 1e6:.1f} MB, {n_tokens:,} tokens, "
                       f"{done / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s")
    bar.close(f"{size / 1e6:.1f} MB -> {n_tokens:,} tokens ({size / max(n_tokens, 1):.2f} bytes/token), "
              f"{np.dtype(dtype).name}")
    return n_tokens


# ===== Menu: GPT-2 parity =====
# GPT-2's own tokenizer rebuilt in this file's format, the strongest check it has: given GPT-2's vocab and
# merges, the core's readable `Tokenizer` must give the ids GPT-2 was trained with, on any text (tests
# compare with tiktoken's "gpt2").

def _recover_merge(ranks, token, rank):
    """Split `token` into the pair GPT-2 merged to make it: run BPE with only the merges below its rank;
    what remains is exactly two parts (the merge inputs). (Same idea as minbpe's `recover_merges`.)

    Why this works: tiktoken keeps only {token: rank}, not the merge list. In merge-order BPE every token
    of rank r was made by ONE merge at step r from two tokens of lower rank, and replaying the merges
    below r on the token's bytes rebuilds exactly those two parts (GPT-2's vocab has this property; the
    parity test would fail on a token where it does not)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"cannot recover the merge that made token {token!r}")
    return parts[0], parts[1]


def gpt2_tokenizer(fast=True):
    """A Tokenizer with GPT-2's exact vocabulary and merges (50,257 tokens, 50,000 merges, <|endoftext|> =
    50256), from tiktoken's `gpt2` encoding. tiktoken reads its files from its cache (TIKTOKEN_CACHE_DIR when
    set) or downloads them; errors propagate to the caller."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ranks = enc._mergeable_ranks
    vocab = {r: tok for tok, r in ranks.items()}
    for s, i in enc._special_tokens.items():
        vocab[i] = s.encode("utf-8")
    merges = [_recover_merge(ranks, tok, r) for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    return Tokenizer(vocab, merges, list(enc._special_tokens), fast=fast)


# ===== Appendix: plumbing =====
# First the helpers every stage file shares, defined once here in the leftmost file that needs them and imported
# by the files to the right (`from tokenizer import atomic_open, Progress, ...`): Progress, atomic_open and its
# atomic_write_* uses, machine_label, OneLineParser, peak_rss_mb. Then this file's own.

class Progress:
    """One self-overwriting status line on stderr, at most ~5 updates per second.

    On a terminal the line rewrites itself (carriage return); when stderr is a file or a pipe (a log, CI)
    only the final line of each task is printed, so logs don't fill with hundreds of partial lines."""

    def __init__(self, enabled, label):
        self.enabled, self.label = enabled and sys.stderr is not None, label
        self.tty = self.enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, msg, force=False):
        """Show `msg` (rate-limited to 5/s so that a tight loop can call this every step for free)."""
        now = time.perf_counter()
        if self.enabled and self.tty and (force or now - self.last > 0.2):
            self.last = now
            print(f"\r{self.label}: {msg} [{now - self.t0:.1f}s]\033[K", end="", file=sys.stderr, flush=True)

    def close(self, msg):
        """Final line of the task, with its total time; always printed (also to logs)."""
        if self.tty:
            self.update(msg, force=True)
            print(file=sys.stderr, flush=True)
        elif self.enabled:
            print(f"{self.label}: {msg} [{time.perf_counter() - self.t0:.1f}s]", file=sys.stderr, flush=True)


def _is_disk_full(exc):
    """True when `exc` (or anything in its cause/context chain) is 'no space left on device'. torch.save
    wraps the OS error in its own RuntimeError ('enforce fail at inline_container.cc'), hence the walk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8"):
    """Open `path` for writing so that readers only ever see the old file or the complete new one.

    The data goes to a temporary file in the same folder (same filesystem, so the final `os.replace` is an
    atomic rename); on success it is flushed, fsync'ed and renamed over `path`. On ANY error the temporary
    file is removed and `path` is untouched: a kill, a full disk or an exception mid-write never leaves a
    half-written file where a complete one used to be. A full disk becomes one clear OSError."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: the folder {folder} does not exist")
    # A unique temporary name (mkstemp), so two writers of the same path never share a temp file. mkstemp
    # makes it private (0600); give it the mode a plain open() would have (0666 minus the umask), or the
    # old file's mode when replacing one, so atomic writing does not silently change who can read the file.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()  # Python's buffer -> the OS
            os.fsync(f.fileno())  # the OS's cache -> the disk: without it a power cut after the rename
            # could leave the NEW name pointing at an empty file (the rename reaches the disk first)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception) and _is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left writing {path}; the previous file there (if any) is "
                                        "intact") from e
        raise


def _proc_status(field):
    """The number after `field:` in Linux's /proc/self/status (e.g. "VmHWM: 1234 kB" -> "1234"), or None."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    return None


def _umask():
    """The process's umask. Linux shows it in /proc (read-only); elsewhere os.umask must set it to read it,
    which for an instant changes it for every thread, so that is only the fallback."""
    if _proc_status("Umask") is not None:
        return int(_proc_status("Umask"), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    """Write a whole text file atomically (UTF-8)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path, data):
    """Write a whole binary file atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_files(directory, files):
    """Write several text files {name: text} into `directory` all-or-nothing (short of a crash between the
    renames): all are written and synced before the first rename, so a full disk never leaves, say, a new
    vocab.json next to an old merges.txt."""
    with contextlib.ExitStack() as stack:
        for name, text in files.items():
            f = stack.enter_context(atomic_open(Path(directory) / name, "w"))
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    # (leaving the ExitStack renames the files, last opened first)


def atomic_write_json(path, obj, indent=1):
    """Write `obj` as JSON atomically (UTF-8, non-ASCII kept as is)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def machine_label():
    """A one-line description of this machine for benchmark tables: cores, architecture, torch build."""
    label = f"{os.cpu_count()}-core {platform.machine()} CPU"
    try:
        import torch
        label += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            label = f"{torch.cuda.get_device_name(0)}, " + label
    except ImportError:
        pass
    return label


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage error is ONE line on stderr (`prog: error: ...`) and exit status 2. argparse's own
    error() prints the whole usage block first, which buries the one line that says what was wrong. Every
    stage's command line uses it (subcommand parsers inherit the class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_config(self, cls, *, skip=(), types=None, defaults=None, given_only=False, note=""):
        """One --flag per field of the dataclass `cls`, derived, never declared twice: the name (`d_model` ->
        `--d-model`), the type (from the annotation; `types` overrides a field's), the default (the field's, or
        `defaults[name]`) and the help line (from the class docstring's `name: text` lines, `config_help`).
        Booleans get --flag / --no-flag. given_only=True makes every default None, so a caller can tell "not
        given" from "given the default's value" (train.py lays flags over a preset that way)."""
        import dataclasses
        helps, types, defaults = config_help(cls), types or {}, defaults or {}
        scalar = {"int": int, "float": float, "str": str, "bool": bool}
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.init:
                continue
            if f.name in defaults:
                default = defaults[f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kind = types.get(f.name) or scalar.get(_bare_type(f.type))
            if kind is None:
                raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {f.type!r}; pass types=")
            text = helps.get(f.name, f.name.replace("_", " ")) + note.format(default=default)
            text = text.replace("%", "%%")  # argparse formats help with %
            how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
            self.add_argument("--" + f.name.replace("_", "-"), default=None if given_only else default, help=text,
                              **how)
        return self


def _bare_type(annotation) -> str:
    """'Optional[int]' / 'int | None' / int -> 'int' (annotations are strings under postponed evaluation)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    name = name.replace(" ", "")
    if name.startswith("Optional[") and name.endswith("]"):
        name = name[len("Optional["):-1]
    return name.removesuffix("|None").removeprefix("None|")


def config_help(cls) -> dict:
    """{field: help text} from a dataclass's docstring lines `    name: text` (continuations indented deeper),
    so each option is documented once, beside its class. A class whose optional switches are documented beside
    their code, elsewhere in its file, returns those lines from a `field_help()` classmethod ({field: text}),
    read here as well (model.py's ModelConfig: each menu section holds its switches' lines)."""
    helps, name = {}, None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            name = m.group(1)
            helps[name] = m.group(2)
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
        else:
            name = None
    extra = cls.field_help() if callable(getattr(cls, "field_help", None)) else {}
    twice = sorted(set(helps) & set(extra))
    if twice:  # one home per line: a field documented in both places would show only one of them
        raise ValueError(f"{cls.__name__}: field(s) {twice} documented both in the docstring and in field_help()")
    return {**helps, **extra}


def peak_rss_mb():
    """This process's peak resident memory in MB (Linux VmHWM; else ru_maxrss, which on Linux survives exec
    and so can include the parent's peak -- hence VmHWM first)."""
    if _proc_status("VmHWM") is not None:
        return int(_proc_status("VmHWM")) / 1024
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024


# ---- this file's own plumbing -------------------------------------------------------------------

def _checked_specials(special_tokens):
    """The special tokens in registration order, repeats dropped; each must be a non-empty string."""
    bad = [s for s in special_tokens or [] if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"special tokens must be non-empty strings, got {bad[0]!r}")
    return list(dict.fromkeys(special_tokens or []))


def _check_vocab_size(vocab_size, special_tokens):
    """Validate the special tokens and the vocab size; return the de-duplicated special-token list."""
    specials = _checked_specials(special_tokens)
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size!r} is too small: a byte-level BPE vocabulary needs at least "
                         f"256 byte tokens + {len(specials)} special token(s) = {256 + len(specials)}")
    return specials


def _warn_if_vocab_short(source, asked, got, distinct_pretokens):
    """Training stops early when no adjacent pair is left to merge (every distinct pre-token is already
    one token). The vocabulary then comes out smaller than asked, which the caller must hear about: a
    model built for `asked` ids would carry embedding rows that never occur."""
    if got >= asked:
        return
    why = ("it holds no text outside the special tokens" if distinct_pretokens == 0 else
           f"its {distinct_pretokens:,} distinct pre-token(s) ran out of pairs to merge")
    warnings.warn(f"{source}: the vocabulary has {got:,} tokens, fewer than the {asked:,} asked for: {why} "
                  f"(train on more text, or ask for vocab_size <= {got:,})", UserWarning, stacklevel=3)


def _check_input_file(path):
    """Size in bytes of a readable, non-empty regular file, or a clear error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected a text file but got a directory: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"input file is empty: {path}")
    with open(path, "rb"):  # readable (permissions are tried, not guessed)
        return size


def _chunk_boundaries(path, size, special_tokens, chunk_bytes, cut_at=None):
    """Byte offsets [0, c1, c2, ..., size] cutting the file at safe points roughly chunk_bytes apart, reading
    only a small window around each target offset. (It assumes special tokens don't overlap each other in odd
    ways, e.g. a token that ends with another's beginning; the usual <|...|> tokens can't.)"""
    special_re = _special_regex(special_tokens, as_bytes=True)
    cut_at = None if cut_at is None else {s.encode("utf-8") for s in cut_at}
    max_special = max((len(s.encode("utf-8")) for s in special_tokens), default=0)
    bounds = [0]
    with open(path, "rb") as f:
        while size - bounds[-1] > chunk_bytes:
            target = bounds[-1] + chunk_bytes
            # start the window a little before the target so a special token straddling it is seen whole
            # (the window must start at a safe position: right after the previous cut is always safe, and
            # 2 * max_special + 2 bytes back is outside any special token that could cover the target)
            window_start = max(bounds[-1], target - 2 * max_special - 2)
            look, cut = 1 << 16, None
            while cut is None:  # widen the look-ahead 4x until a cut shows up (a file with no cut at all
                # is read once to its end and becomes one chunk)
                f.seek(window_start)
                buf = f.read(target - window_start + look)
                at_eof = window_start + len(buf) >= size
                hi = len(buf) - 1 if at_eof else len(buf) - max_special - 2
                cut = _find_cut(buf, special_re, target - window_start, hi, last=False, cut_at=cut_at)
                if cut is None and at_eof:
                    break
                look *= 4
            if cut is None:
                break  # no safe cut in the rest of the file: it becomes the last chunk
            bounds.append(window_start + cut)
    bounds.append(size)
    return bounds


def _read_chunk_text(path, start, end):
    """Decode bytes [start, end) of a file, or a ValueError naming the file and the bad byte's offset."""
    with open(path, "rb") as f:
        f.seek(start)
        return _decode_utf8(f.read(end - start), path, start)


def _decode_utf8(data, where, offset=0):
    """data.decode("utf-8"), or a ValueError naming `where` and the bad byte (its offset in the file: + offset)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 at byte offset {offset + e.start} "
                         f"(byte 0x{data[e.start]:02x}: {e.reason})") from None


_WORKER_STATE = None  # what every chunk of one job needs (encode_file: the tokenizer), set once per worker


def _set_worker_state(state):
    global _WORKER_STATE
    _WORKER_STATE = state


@contextlib.contextmanager
def _chunk_results(func, tasks, num_workers, state=None, ordered=True):
    """An iterator of func(task) over `tasks`: in this process when one worker (or one chunk) suffices,
    else from a pool of worker processes that is closed on leaving the `with`. `state` is sent to each
    worker once (`_WORKER_STATE`), not with every task. ordered=False hands back whichever chunk is done
    first (for results whose merge does not depend on the order)."""
    if num_workers == 1 or len(tasks) == 1:
        _set_worker_state(state)
        try:
            yield map(func, tasks)
        finally:
            _set_worker_state(None)
        return
    # fork (Linux) starts workers in milliseconds and shares the parent's memory copy-on-write; elsewhere
    # the platform default (spawn) pickles the work and re-imports this module.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(num_workers, len(tasks)), initializer=_set_worker_state, initargs=(state,)) as pool:
        yield (pool.imap if ordered else pool.imap_unordered)(func, tasks)


def _default_workers(num_workers):
    """None -> the cores this process may run on (sched_getaffinity honours taskset/cgroups), else >= 1."""
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return int(num_workers)


def _bytes_to_unicode():
    """GPT-2's printable stand-in for every byte, so tokens can be written as text in vocab.json/merges.txt:
    printable bytes map to themselves, the others (space, control bytes, ...) to chr(256 + k), e.g. the space
    byte to 'Ġ' (b" the" is written "Ġthe"). GPT-2's encoder.json/vocab.bpe and HuggingFace's files load as is."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _token_to_str(token: bytes) -> str:
    """b" the" -> "Ġthe": a token as it is written in vocab.json and merges.txt."""
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _str_to_token(s: str, where: str) -> bytes:
    """"Ġthe" -> b" the", or a ValueError naming `where` (file and line) for a character outside the map."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{where}: {s!r} is not a GPT-2 byte-level token string (bad character {e})") from None


def _encode_chunk(task):
    """Worker: ids of bytes [start, end) of the file in the output dtype (uint16 halves what crosses the pipe)."""
    path, start, end, dtype, kw = task
    text = _read_chunk_text(path, start, end)
    try:
        ids = _WORKER_STATE.encode(text, **kw)  # the tokenizer
    except DisallowedSpecialError as e:  # say where in the FILE, not where in the chunk
        offset = start + len(text[:e.position].encode("utf-8"))
        raise DisallowedSpecialError(e.token, f"byte offset {offset}", where=f"{path}: ") from None
    return np.asarray(ids, dtype=dtype), end - start


def _specials_overlap(specials):
    """Can two special tokens overlap in a text (one inside the other, or a suffix of one being a prefix
    of the other)? Only then can tiktoken's leftmost-first and our longest-first matching disagree."""
    return any(a != b and (a in b or any(a.endswith(b[:k]) for k in range(1, min(len(a), len(b)))))
               for a in specials for b in specials)


def _read_json(path, what):
    """Parse a JSON file, or a ValueError naming the file and what is wrong (bad UTF-8, bad JSON)."""
    text = _decode_utf8(Path(path).read_bytes(), f"malformed {what} {path}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed {what} {path}: not valid JSON ({e})") from None


def _read_vocab_json(path):
    """GPT-2's vocab.json/encoder.json ({token string: id}) -> {id: bytes}, or a ValueError naming the file."""
    raw = _read_json(path, "vocab file")
    if not isinstance(raw, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        raise ValueError(f"malformed vocab file {path}: expected a JSON object {{token: integer id}}")
    vocab = {i: _str_to_token(s, f"vocab file {path}") for s, i in raw.items()}
    if len(vocab) != len(raw):
        raise ValueError(f"malformed vocab file {path}: two tokens share an id")
    return vocab


def _read_merges_txt(path):
    """GPT-2's merges.txt/vocab.bpe -> ([(bytes_a, bytes_b)], [line number of each merge]). Read as bytes,
    so that invalid UTF-8 is reported with the file and the line, not by `open` with neither."""
    merges, lines = [], []
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            where = f"merges file {path}, line {lineno}"
            line = _decode_utf8(raw_line, where).rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"malformed {where}: expected 'token_a token_b', got {line!r}")
            merges.append((_str_to_token(parts[0], where), _str_to_token(parts[1], where)))
            lines.append(lineno)
    return merges, lines


def _checked_vocab(vocab):
    """{id: bytes} with ids exactly 0..N-1, distinct tokens and all 256 single bytes -> (vocab, byte_to_id)."""
    out = {}
    for i, tok in dict(vocab).items():
        if not isinstance(i, (int, np.integer)) or not isinstance(tok, (bytes, bytearray)) or not tok:
            raise ValueError(f"vocab must map int ids to non-empty bytes; got {i!r}: {tok!r}")
        out[int(i)] = bytes(tok)
    if sorted(out) != list(range(len(out))):
        raise ValueError("vocab ids must be exactly 0..N-1 with no gaps")
    byte_to_id = {tok: i for i, tok in out.items()}
    if len(byte_to_id) != len(out):
        raise ValueError("vocab maps two ids to the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in byte_to_id]
    if missing:
        raise ValueError(f"vocab lacks {len(missing)} single-byte token(s) (e.g. byte {missing[0]}); "
                         "a byte-level BPE needs all 256 to encode any text")
    return out, byte_to_id


def _fingerprint(vocab, merges, special_tokens):
    """sha256 over every token, merge and special token, each length-prefixed (so that no two different
    tokenizers can serialize to the same byte stream), cut to 16 hex digits (64 bits)."""
    h = hashlib.sha256()
    for i in sorted(vocab):
        h.update(i.to_bytes(4, "little") + len(vocab[i]).to_bytes(4, "little") + vocab[i])
    for a, b in merges:
        h.update(len(a).to_bytes(4, "little") + a + len(b).to_bytes(4, "little") + b)
    h.update(json.dumps(list(special_tokens)).encode("utf-8"))
    return h.hexdigest()[:16]


class _BadMerge(ValueError):
    """A merge the vocab can't hold; `.rank` lets `from_files` name the line of merges.txt."""

    def __init__(self, rank, msg):
        super().__init__(msg)
        self.rank = rank


def _as_id_list(ids):
    """A list of Python ints from a list, tuple, iterable, numpy array or torch tensor of integer ids.

    Iterating a tensor yields 0-d tensors, which hash by identity, so a dict lookup would call a valid id
    unknown: convert with `.tolist()` first. A float id (3.0) would silently look up token 3 (3.0 == 3 in
    a dict), and True token 1, so both are refused by type."""
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and hasattr(ids, "tolist"):  # numpy array/scalar or torch tensor
        name = str(dtype).replace("torch.", "")
        if not (name.startswith("int") or name.startswith("uint")):
            raise TypeError(f"token ids must be integers, got an array of dtype {name}")
        if getattr(ids, "ndim", 0) > 1:
            raise ValueError(f"decode expects a 0-d or 1-d sequence of ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else ids
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        return [int(ids)]
    ids = list(ids)
    if not set(map(type, ids)) <= {int}:  # the common case (all plain ints) is checked in C
        # anything else, one by one: numpy integers, 0-d integer tensors ([t for t in row] of a tensor)
        ids = [j for i in ids for j in (_as_id_list(i) if getattr(i, "ndim", 1) == 0 else [i])]
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))), None)
        if bad is not None:
            raise TypeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})")
        ids = [int(i) for i in ids]
    return ids


def _fix_surrogates(text):
    """Lone surrogates can't be UTF-8 encoded; replace them with U+FFFD (what tiktoken does too)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_output_file(out, inputs, overwrite, what="the output", force="overwrite=True (--force)"):
    """An output file may never be one of the inputs (also through a symlink or a hard link: samefile), nor a
    folder, and replaces an existing file only when `overwrite`; `what` and `force` name the option."""
    def same(x):  # also through a symlink or a hard link (samefile); realpath when `out` does not exist yet
        try:
            return os.path.samefile(out, x)
        except OSError:
            return os.path.realpath(out) == os.path.realpath(x)

    if any(map(same, inputs)):
        raise ValueError(f"{what} {out} is one of the command's inputs; writing it would destroy that file")
    if os.path.isdir(out):
        raise IsADirectoryError(f"{what} {out} is a folder; give a file name such as data.bin")
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"{what} {out} already exists; pass {force} to replace it")


# ===== Appendix: benchmarks =====
# `python tokenizer.py bench`: our trainer against HuggingFace `tokenizers` (Rust), our encoders against
# tiktoken, side by side in one run so that the ratios are fair. The peers are used only here.

def build_bench_corpus(out_path, target_mb, data_dir):
    """Mixed real text: all of tinyshakespeare + MMLU questions (documents separated by <|endoftext|>) from
    the folder `data_dir` (`BENCH_FILES`), cut at a document boundary near `target_mb` MB."""
    shakespeare, mmlu = (Path(data_dir, name).read_text(encoding="utf-8") for name in BENCH_FILES)
    text = shakespeare + EOT + mmlu
    cut = text.find(EOT, int(target_mb * 1e6) - 1)
    text = text if cut < 0 else text[:cut + len(EOT)]
    atomic_write_text(out_path, text)
    return len(text.encode("utf-8"))


def _run_json(code, *args):
    """Run python code in a fresh subprocess (fair wall time and peak RSS); it prints one JSON line."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# The benchmark scripts, each run as `python -c SCRIPT ARGS` in a fresh process that prints one JSON line:
# a fresh process per measurement gives each side the same start (no warm caches, no shared pages) and its
# own peak RSS. Ours: train_bpe + save. HF: the same job with HuggingFace's BpeTrainer (GPT-2's byte-level
# pre-tokenizer and regex, the full 256-byte alphabet, min_frequency=0 so it may merge any pair).
_BENCH_OURS = r"""
import json, resource, sys, time, tokenizer as tk
t = time.perf_counter()
vocab, merges = tk.train_bpe(sys.argv[1], int(sys.argv[2]), ["<|endoftext|>"], num_workers=int(sys.argv[3]),
                             progress=False)
s = time.perf_counter() - t
tk.Tokenizer(vocab, merges, ["<|endoftext|>"], fast=False).save(sys.argv[4])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"s": s, "rss": tk.peak_rss_mb(), "vocab": len(vocab), "rss_workers": kids.ru_maxrss / 1024,
                  "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}))
"""

_BENCH_HF = r"""
import json, os, resource, sys, time
os.environ["RAYON_NUM_THREADS"] = sys.argv[3]
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
t = time.perf_counter()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex + bytes
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"], min_frequency=0,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train([sys.argv[1]], trainer)
s = time.perf_counter() - t
import tokenizer as tk
me = resource.getrusage(resource.RUSAGE_SELF)  # all of rayon's threads
print(json.dumps({"s": s, "rss": tk.peak_rss_mb(), "vocab": tok.get_vocab_size(), "cpu": me.ru_utime + me.ru_stime}))
"""

# Memory of streaming vs whole-text encoding: the peak RSS before encoding (the loaded tokenizer) is
# subtracted, so the figure is what encoding itself adds.
_BENCH_STREAM = r"""
import json, resource, sys, time, tokenizer as tk
tok = tk.Tokenizer.load(sys.argv[1])
before = tk.peak_rss_mb()
t, n = time.perf_counter(), 0
with open(sys.argv[2], encoding="utf-8") as f:
    if sys.argv[3] == "stream":
        for _ in tok.encode_iterable(f):  # ids are consumed (counted) as they come
            n += 1
    else:
        n = len(tok.encode(f.read()))  # the non-streaming contrast: whole text and all ids in memory
s = time.perf_counter() - t
print(json.dumps({"s": s, "tokens": n, "rss_before": before, "rss": tk.peak_rss_mb()}))
"""


def bench(args):
    """Side-by-side benchmarks; prints each result as it comes, then a markdown table of README rows."""
    machine = args.machine or machine_label()
    workers = _default_workers(args.workers)
    rows = []

    def row(what, corpus, ours, peer, ratio):
        rows.append(f"| tokenizer | {what} | `python tokenizer.py bench --data-dir DIR` | {corpus} | {ours} | {peer} "
                    f"| {ratio} | {machine} |")
        print(f"  {what}: ours {ours} | peer {peer} | ratio {ratio}", flush=True)

    with tempfile.TemporaryDirectory(prefix="scratchlm_bench_") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        nbytes = build_bench_corpus(corpus, args.mb, args.data_dir)
        print(f"corpus: {nbytes / 1e6:.2f} MB (tinyshakespeare + MMLU questions), {workers} worker(s)", flush=True)
        tok_dir = os.path.join(tmp, "tok")
        _bench_training(args, corpus, nbytes, workers, tok_dir, row)
        trained = Tokenizer.load(tok_dir)
        print(f"  trained tokenizer fast path: {trained.fast_reason}")
        text = Path(corpus).read_text(encoding="utf-8")
        _bench_gpt2(text[:2_000_000], row)
        _bench_encoding(text, corpus, nbytes, trained, workers, tmp, row)
        _bench_streaming(args, text, nbytes, tok_dir, tmp, row)
    print("\n| stage | what | command | corpus/shape | ours | peer | ratio | machine |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def _bench_training(args, corpus, nbytes, workers, tok_dir, row):
    """train_bpe vs HuggingFace's BpeTrainer: same corpus, vocab size, special token and worker count, each
    in a fresh process (fair peak RSS and start-up)."""
    # alternate ours / HF `--repeats` times and keep each one's fastest run: timing noise only ever adds
    # time, so the minimum is the best estimate of each side's cost (timeit's rule)
    best = {}
    for _ in range(args.repeats):
        for side, script, extra in (("ours", _BENCH_OURS, [tok_dir]), ("HF tokenizers", _BENCH_HF, [])):
            try:
                run = _run_json(script, corpus, args.vocab_size, workers, *extra)
            except (RuntimeError, ImportError) as e:
                if side == "ours":
                    raise
                print(f"  (HuggingFace tokenizers unavailable, skipping the peer: {str(e)[-200:]})")
                continue
            workers_rss = f" / workers {run['rss_workers']:.0f} MB" if "rss_workers" in run else ""
            print(f"  {side}: {run['s']:.2f} s wall, {run['cpu']:.2f} s CPU (incl. interpreter start), "
                  f"peak RSS {run['rss']:.0f} MB{workers_rss}")
            best[side] = min(best.get(side, run), run, key=lambda r: r["s"])
    ours, hf = best["ours"], best.get("HF tokenizers")
    if hf is not None:
        row(f"train BPE, vocab {args.vocab_size} + <\\|endoftext\\|>, wall time (peak RSS)",
            f"{nbytes / 1e6:.1f} MB mixed text",
            f"{ours['s']:.2f} s ({ours['rss']:.0f} MB + workers {ours['rss_workers']:.0f} MB)",
            f"HF tokenizers {hf['s']:.2f} s ({hf['rss']:.0f} MB)",
            f"{ours['s'] / hf['s']:.2f}x time (CPU seconds: {ours['cpu']:.1f} vs {hf['cpu']:.1f})")


def _cpu_timed(fn, *args, **kwargs):
    """(fn(...), the CPU seconds it took): `process_time` counts only the time this process actually ran."""
    c = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c


def _bench_gpt2(sample, row):
    """Our encoders on GPT-2's own vocab (`gpt2_tokenizer`) against tiktoken's gpt2, one thread. tiktoken
    finds its files in its usual cache (TIKTOKEN_CACHE_DIR when set) or downloads them; offline the rows
    are skipped, saying so."""
    try:
        import tiktoken
        ref, ours = tiktoken.get_encoding("gpt2"), gpt2_tokenizer()
    except Exception as e:
        print(f"  (tiktoken gpt2 unavailable, skipping GPT-2 throughput: {e})")
        return
    smb = len(sample.encode()) / 1e6
    # Both sides run the same Rust core, so the true ratio is ~1 and timing noise dominates:
    # alternate who goes first over 10 rounds and keep each side's best CPU time.
    calls = {"ref": functools.partial(ref.encode, allowed_special="all"), "ours": ours.encode}
    ids, best = {}, {"ref": _INF, "ours": _INF}
    for rep in range(10):
        for who in sorted(calls, reverse=rep % 2 == 0):  # "ref" first, then "ours" first, ...
            ids[who], t = _cpu_timed(calls[who], sample)
            best[who] = min(best[who], t)
    t_ref, t_ours = best["ref"], best["ours"]
    same = "identical ids" if ids["ours"] == ids["ref"] else "IDS DIFFER"
    row(f"encode, GPT-2 vocab, fast path vs tiktoken gpt2 (1 thread, best CPU time of 10; {same})",
        f"{smb:.1f} MB", f"{smb / t_ours:.1f} MB/s", f"tiktoken {smb / t_ref:.1f} MB/s",
        f"{t_ref / t_ours:.2f}x throughput")
    t = time.perf_counter()
    _, c_py = _cpu_timed(ours.encode_readable, sample)  # a fresh tokenizer: its pre-token cache starts cold
    t_py = time.perf_counter() - t
    row("encode, GPT-2 vocab, pure-Python encoder vs tiktoken (1 thread, cold cache; CPU-time rate, wall "
        "rate in brackets)", f"{smb:.1f} MB", f"{smb / c_py:.2f} MB/s ({smb / t_py:.2f} MB/s wall)",
        f"tiktoken {smb / t_ref:.1f} MB/s", f"{t_ref / c_py:.2f}x throughput")


def _bench_encoding(text, corpus, nbytes, trained, workers, tmp, row):
    """Both our encoders on the trained vocab (one thread, CPU time), then encode_file in parallel, which
    must give exactly encode()'s ids (a consistency check, printed, no row)."""
    mb = nbytes / 1e6
    ids_fast, t_fast = _cpu_timed(trained.encode, text)
    ids_py, t_py = _cpu_timed(trained.encode_readable, text)
    same = "identical ids" if ids_fast == ids_py else "IDS DIFFER"
    row(f"encode, our {trained.vocab_size} vocab: fast path vs pure Python (1 thread, CPU time; {same}; "
        f"{nbytes / len(ids_fast):.2f} bytes/token)",
        f"{mb:.1f} MB", f"{mb / t_fast:.1f} MB/s", f"pure Python {mb / t_py:.2f} MB/s", f"{t_py / t_fast:.1f}x")
    t = time.perf_counter()
    n = encode_file(trained, corpus, os.path.join(tmp, "corpus.bin"), num_workers=workers, progress=False)
    t_file = time.perf_counter() - t
    assert n == len(ids_fast), "encode_file disagrees with encode"
    print(f"  encode_file: {n:,} tokens in {t_file:.2f} s ({mb / t_file:.1f} MB/s, {workers} workers, == encode)")


def _bench_streaming(args, text, nbytes, tok_dir, tmp, row):
    """Peak memory of encode_iterable over a file of tens of MB vs encode(whole text), each in a fresh
    process: streaming should add nothing that grows with the file."""
    mb = nbytes / 1e6
    big = os.path.join(tmp, "big.txt")
    reps = max(1, int(args.stream_mb / mb + 0.999))
    with open(big, "w", encoding="utf-8") as f:
        for _ in range(reps):
            f.write(text)
    st, whole = (_run_json(_BENCH_STREAM, tok_dir, big, how) for how in ("stream", "whole"))
    row("peak RSS: encode_iterable over the file's lines vs encode(whole text)",
        f"{reps * mb:.0f} MB file", f"{st['rss']:.0f} MB (+{st['rss'] - st['rss_before']:.0f} MB over the "
        f"loaded tokenizer; {st['tokens']:,} tokens, {reps * mb / st['s']:.1f} MB/s)",
        f"encode(f.read()): {whole['rss']:.0f} MB (+{whole['rss'] - whole['rss_before']:.0f} MB)",
        f"{(st['rss'] - st['rss_before']) / max(whole['rss'] - whole['rss_before'], 1e-9):.3f}x growth")


# ===== Command line =====
# `python tokenizer.py [train|encode|bench]`. Every option is checked before any work starts: a usage error
# is one line on stderr and exit status 2, a failed command removes the folders it created, and no command
# replaces an existing output unless told to (--force).

def demo():
    """No-argument run: train a small BPE on this file's own text (English docs + code), show what it does."""
    src = os.path.abspath(__file__)
    text = Path(src).read_text(encoding="utf-8")
    t = time.perf_counter()
    vocab, merges = train_bpe(src, 256 + 1 + 744, [EOT], num_workers=1, progress=False)
    tok = Tokenizer(vocab, merges, [EOT])
    print(f"trained a {tok.vocab_size}-token byte-level BPE on {src} ({len(text.encode()):,} bytes) in "
          f"{time.perf_counter() - t:.2f} s")
    print(f"compression: {len(text.encode()) / len(tok.encode(text)):.2f} bytes/token (raw bytes would be 1.00)")
    print("first merges:", ", ".join(f"{(a + b).decode('utf-8', 'replace')!r}" for a, b in merges[:12]))
    example = "The tokenizer turns text into integers.<|endoftext|>Ünïcödé and emoji 🙂 still round-trip."
    ids = tok.encode(example)
    print(f"\nencode({example!r})\n  -> {ids}")
    print("  pieces:", [tok.vocab[i].decode("utf-8", "backslashreplace") for i in ids])
    assert tok.decode(ids) == example
    print(f"decode(...) == input: True   (fast path: {tok.fast_reason}; readable encoder agrees: "
          f"{tok.encode_readable(example) == ids})")
    # the same string as untrusted text: the separator is encoded as its characters, not as the special id
    plain = tok.encode(example, allowed_special=set())
    print(f"with allowed_special=set(): {len(plain)} ids, no <|endoftext|> id among them: {tok.eot_id not in plain}")
    print("\nnext: python tokenizer.py train --input FILE --vocab-size 10000 --special-tokens '<|endoftext|>' "
          "--out DIR")


MAX_VOCAB = 2 ** 32  # ids must fit the uint32 of a token file (`token_dtype`)
SPECIAL_TEXT = {"special": ("all", ()), "ordinary": (set(), ()), "error": (set(), "all")}  # --special-text
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens.json")
BENCH_FILES = ("tinyshakespeare.txt", "mmlu_questions.txt")  # what --data-dir must hold
# (option, test, what it must be): every number an option takes, checked before any work
OPTION_RANGES = [("--workers", lambda v: v >= 1, ">= 1"), ("--repeats", lambda v: v >= 1, ">= 1"),
                 ("--mb", lambda v: 0 < v <= 100_000, "in (0, 100000] MB"),
                 ("--stream-mb", lambda v: 0 < v <= 100_000, "in (0, 100000] MB")]


def build_parser():
    """The command line: train, encode and bench subcommands; no subcommand runs the demo."""
    p = OneLineParser(prog="tokenizer.py", description="ScratchLM stage 1: byte-level BPE tokenizer. With no "
                                                       "subcommand: a small demo that trains on this file's own text.")
    sub = p.add_subparsers(dest="cmd")
    t = sub.add_parser("train", help="train a BPE tokenizer on a UTF-8 text file")
    t.add_argument("--vocab-size", type=int, required=True,
                   help=f"total vocabulary size: 256 bytes + special tokens + merges (at most {MAX_VOCAB})")
    t.add_argument("--special-tokens", nargs="*", default=[EOT],
                   help="special tokens, never merged (default: <|endoftext|>)")
    t.add_argument("--out", required=True, help="folder to write vocab.json, merges.txt, special_tokens.json")
    e = sub.add_parser("encode", help="encode a UTF-8 text file into a flat .bin of token ids (np.memmap-able)")
    e.add_argument("--tokenizer", required=True, help="folder written by `train` (or Tokenizer.save)")
    e.add_argument("--out", required=True, help="output .bin (uint16 if the vocab fits, else uint32), written "
                                                "atomically; never the input file")
    e.add_argument("--special-text", choices=list(SPECIAL_TEXT), default="special",
                   help="what special-token strings in the input become: 'special' = their special ids (default; "
                        "for a corpus you assembled), 'ordinary' = plain text (web text, user input), 'error' = stop "
                        "and name the first one")
    e.add_argument("--readable", action="store_true",
                   help="force the pure-Python encoder instead of the tiktoken fast path")
    for q, verb, what, out in ((t, "train on", "pre-tokenization", "a tokenizer already saved in --out"),
                               (e, "encode", "encoding", "--out if it already exists")):
        q.add_argument("--input", required=True, help=f"UTF-8 text file to {verb}")
        q.add_argument("--force", action="store_true", help=f"replace {out}")
        q.add_argument("--workers", type=int, default=None, help=f"{what} processes, >= 1 (default: all cores)")
        q.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    b = sub.add_parser("bench", help="benchmarks vs HuggingFace tokenizers (training) and tiktoken (encoding)")
    b.add_argument("--data-dir", default=None, help="folder with " + " and ".join(BENCH_FILES) + " (required)")
    b.add_argument("--mb", type=float, default=6.0, help="size of the mixed training corpus in MB, > 0 (default 6)")
    b.add_argument("--vocab-size", type=int, default=10000, help="vocabulary size to train (default 10000)")
    b.add_argument("--workers", type=int, default=None,
                   help="processes/threads for both us and the peer (default: all cores)")
    b.add_argument("--repeats", type=int, default=1,
                   help="training runs per side, alternating; the fastest of each is kept")
    b.add_argument("--stream-mb", type=float, default=30.0, help="size of the file for the encode_iterable memory test")
    b.add_argument("--machine", default=None, help="machine label for the table (default: this machine's cores/torch)")
    b.set_defaults(special_tokens=[EOT])  # what the bench trains with (for the --vocab-size check)
    return p


def _check_args(p, args):
    """Every check that needs no real work, so a bad option fails in milliseconds, not after training."""
    fail = p._subparsers._group_actions[0].choices[args.cmd].error  # the subcommand's parser: its prog in errors
    if args.cmd == "bench" and not (args.data_dir and all((Path(args.data_dir) / n).is_file() for n in BENCH_FILES)):
        fail(f"--data-dir must be a folder with {' and '.join(BENCH_FILES)}, got {args.data_dir or 'none'}")
    for opt, ok, want in OPTION_RANGES:
        v = getattr(args, opt[2:].replace("-", "_"), None)
        if v is not None and not ok(v):
            fail(f"{opt} must be {want}, got {v}")
    if args.cmd in ("train", "bench"):  # the vocab holds at least the 256 bytes and the special tokens
        if any(not s for s in args.special_tokens):
            fail("--special-tokens must be non-empty strings")
        low = 256 + len(set(args.special_tokens))
        if not low <= args.vocab_size <= MAX_VOCAB:
            fail(f"--vocab-size must be in {low}..{MAX_VOCAB} (256 bytes + {low - 256} special token(s) at least), "
                 f"got {args.vocab_size}")
    if args.cmd in ("train", "encode"):
        try:
            _check_input_file(args.input)
        except (OSError, ValueError) as e:
            fail(f"--input: {e}")
    if args.cmd == "train":
        # --out is a folder; an earlier tokenizer in it is replaced only with --force (a model trained on
        # its ids would silently read garbage with new ones)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; train writes a folder")
        saved = [n for n in TOKENIZER_FILES if (out / n).exists()]
        if saved and not args.force:
            fail(f"--out {out} already holds a tokenizer ({saved[0]}); pass --force to replace it")
        _check_writable(fail, "--out", out)
    elif args.cmd == "encode":
        tdir = Path(args.tokenizer)
        missing = [n for n in TOKENIZER_FILES[:2] if not (tdir / n).is_file()]
        if missing:
            fail(f"--tokenizer {tdir}: no {missing[0]} there (expected a folder written by `train`)")
        try:
            _check_output_file(args.out, (args.input, tdir / "vocab.json", tdir / "merges.txt"), args.force,
                               "--out", "--force")
        except (OSError, ValueError) as e:
            fail(str(e))
        _check_writable(fail, "--out", Path(args.out).parent)


def _check_writable(fail, opt, folder):
    """The nearest existing folder of `folder` must be a folder we can create files in (tried, not guessed:
    permission bits say nothing on a read-only mount)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        fail(f"{opt}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".scratchlm_probe_", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fail(f"{opt}: cannot write in {folder} ({e.strerror or e})")


@contextlib.contextmanager
def _new_folder(folder):
    """Create `folder` and its missing parents; if the body fails, remove those of them that are still
    empty (only what this command created, never a folder that was there before)."""
    created, p = [], Path(os.path.abspath(folder))
    while not p.exists():
        created.append(p)
        p = p.parent
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def main(argv=None):
    """Entry point. With `argv` (tests) errors found during the work propagate as exceptions; from a shell
    they become one line on stderr with exit status 2 (Ctrl-C: 130), never a traceback."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd is not None:
        _check_args(p, args)
    try:
        _run_command(args)
    except (OSError, ValueError, KeyboardInterrupt) as e:  # found during the work: one line, nothing half-written
        if argv is not None:
            raise
        if isinstance(e, KeyboardInterrupt):
            print("interrupted; no output was written", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, DisallowedSpecialError):  # speak of the command's option, not the API's keywords
            e = f"{e.where}the input contains the special token {e.token!r} (at {e.position}); --special-text " \
                "error refuses it (--special-text special or ordinary encodes it)"
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


def _run_command(args):
    """Do the work of one subcommand whose options `_check_args` has accepted."""
    if args.cmd is None:
        demo()
    elif args.cmd == "train":
        t0 = time.perf_counter()
        with _new_folder(args.out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens, num_workers=args.workers,
                                      progress=not args.quiet)
            tok = Tokenizer(vocab, merges, args.special_tokens)
            tok.save(args.out)
        for w in caught:  # e.g. "the vocabulary has 300 tokens, fewer than the 1,000 asked for"
            print(f"warning: {w.message}", file=sys.stderr)
        print(f"trained {tok.vocab_size} tokens ({len(merges)} merges) in {time.perf_counter() - t0:.1f} s "
              f"-> {args.out}")
        with open(args.input, encoding="utf-8", errors="replace") as f:
            sample = f.read(1 << 20)
        print(f"compression on the first MB: {len(sample.encode()) / max(1, len(tok.encode(sample))):.2f} bytes/token")
    elif args.cmd == "encode":
        tok = Tokenizer.load(args.tokenizer, fast=not args.readable)
        allowed, disallowed = SPECIAL_TEXT[args.special_text]
        t0 = time.perf_counter()
        with _new_folder(os.path.dirname(os.path.abspath(args.out))):
            n = encode_file(tok, args.input, args.out, num_workers=args.workers, progress=not args.quiet,
                            allowed_special=allowed, disallowed_special=disallowed, overwrite=args.force)
        size = os.path.getsize(args.input)
        print(f"{n:,} tokens -> {args.out} ({np.dtype(token_dtype(tok.vocab_size)).name}); "
              f"{size / max(n, 1):.2f} bytes/token; {size / 1e6 / (time.perf_counter() - t0):.1f} MB/s")
    elif args.cmd == "bench":
        bench(args)


if __name__ == "__main__":
    main()
