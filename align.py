"""
align.py -- Stage 8 of ScratchLM: from a base model to one that follows a format and gets better at a task
a program can check. Supervised fine-tuning, expert iteration, GRPO and DPO, each measured on held-out problems.

The story
---------
A base model (train.py) only CONTINUES text: ask it "Compute 7 + 5 - 3." and it writes whatever usually
follows such a line in its training data. Three ideas turn it into something useful:

  1. Supervised fine-tuning (SFT) SURFACES a skill the base model already half has. A few hundred worked
     examples in a fixed format (prompt -> reasoning -> answer) teach it WHERE to put its reasoning and its
     answer; the arithmetic itself it learned in pretraining. The loss is ordinary cross-entropy, but only on
     the RESPONSE tokens (the prompt is given, not predicted).            (InstructGPT, arXiv:2203.02155)
  2. Learning from FEEDBACK improves the skill without new labels. The model samples answers and something
     judges them:
       * expert iteration: keep the samples a verifier accepts and fine-tune on them (STaR, 2203.14465);
       * policy gradient: raise the log-probability of each sample in proportion to its ADVANTAGE, its reward
         minus the average reward of the other samples for the same prompt (GRPO, DeepSeekMath 2402.03300;
         the R1-Zero recipe, DeepSeek-R1 2501.12948). Reusing a batch of samples for several updates needs
         PPO's clipped importance ratio (1707.06347); Dr. GRPO (2503.20783) removes two biases of GRPO's
         normalization (per-sequence length and per-group std);
       * preferences: from a pair (chosen, rejected) DPO raises the chosen response's likelihood relative to
         a frozen reference model and lowers the rejected one's, with no reward model and no sampling in the
         loss (Direct Preference Optimization, 2305.18290). Here a verifier ranks the pairs.
  3. EFFICIENCY decides what is affordable. Every RL step starts with rollouts, which are INFERENCE: they use
     model.py's KV cache (each new token costs one position, not the whole sequence), and the G samples of a
     group share their prompt's prefill (computed once, then the cache is copied G times).

The task. A program must be able to check the answer: the built-in task is multi-step arithmetic ("Compute
27 + 8 - 5 + 3.") with exact answers, disjoint held-out problems and a harder split with more operands than
training shows. Real benchmarks too: GSM8K (2110.14168; exact match on the last number) and MMLU (2009.03300;
by the option letter, and by the log-likelihood of each option -- the robust method for small models).

What it costs. SFT and DPO cost a forward+backward per example token (DPO adds two reference forwards).
GRPO and expert iteration spend most of their time SAMPLING: G rollouts per prompt, one token at a time.

Command line: `python align.py` runs the whole demo (pretrain -> SFT -> expert iteration -> GRPO on- and
off-policy -> DPO) on a CPU in about a quarter of an hour; `--help` lists sft, ei, grpo, dpo, eval, bench.

The functions use the names and return conventions of Stanford CS336's assignment 5, so a course learner's
adapters map one to one (tokenize_prompt_and_output, compute_entropy, get_response_log_probs, masked_mean,
masked_normalize, sft_microbatch_train_step, compute_group_normalized_rewards, compute_naive_policy_gradient_loss,
compute_grpo_clip_loss, compute_policy_gradient_loss, grpo_microbatch_train_step, compute_per_instance_dpo_loss,
get_packed_sft_dataset, iterate_batches, parse_gsm8k_response, parse_mmlu_response, r1_zero_reward_fn).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

import model as M
import train as T
from tokenizer import EOT, atomic_open, atomic_write_json, atomic_write_text, machine_label
import tokenizer as tk

# ---- 1. Prompt formats ----
# The R1-Zero format: the prompt ends by OPENING the reasoning, and a well-formed response closes it and
# gives the answer:   ... Assistant: <think> REASONING </think> <answer> ANSWER </answer>
# The format is what the format reward checks; the answer is what the verifier checks.
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>")
# The same format, shortened for the built-in task: a 1M-parameter CPU model pays for every prompt token on
# every rollout, and the long preamble carries nothing a model trained from scratch could use.
SHORT_R1_PROMPT = "User: {question}\nAssistant: <think>"
# The Alpaca instruction template, the format of CS336's SFT and DPO data.
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}")


# ---- 2. Log-probabilities of a response, and the SFT loss ----
def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of UNTRUSTED text (a data set's question, a model's answer): a literal "<|endoftext|>" in it
    stays ordinary text, so a document cannot smuggle in a control token; callers append end-of-text ids
    themselves. Falls back to plain encode() for tokenizers without the keyword (HF's, or older ones)."""
    try:
        return list(tokenizer.encode(text, allowed_special=set()))
    except TypeError:
        return list(tokenizer.encode(text))


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad id if it has one, else end-of-text. Any id will do:
    padded positions are masked out of every loss."""
    for name in ("pad_token_id", "pad_id", "eot_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer) -> dict:
    """Tokenize each prompt and output SEPARATELY (BPE could merge across the boundary otherwise), concatenate,
    right-pad, and shift by one. Returns input_ids, labels and response_mask (bool), each (B, L-1) for the
    longest prompt+output L: labels[t] = ids[t+1] is what position t must predict; response_mask[t] is True
    exactly where that label is an output token (not prompt, not padding)."""
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output needs at least one (prompt, output) pair")
    pairs = [(_encode(tokenizer, p), _encode(tokenizer, o)) for p, o in zip(prompt_strs, output_strs)]
    return pack_prompt_response_ids(pairs, pad_id_of(tokenizer))


def pack_prompt_response_ids(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """The tensor half of tokenize_prompt_and_output, for ids already in hand (rollouts)."""
    # Right padding (unlike generation's left padding): causal attention never lets a real token see the
    # padding after it, so no attention mask is needed, and the loss ignores padded labels via the mask.
    L = max(len(p) + len(o) for p, o in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), L), dtype=torch.bool)
    for i, (p, o) in enumerate(pairs):
        ids[i, :len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[i, len(p):len(p) + len(o)] = True
    # position t predicts token t+1: inputs drop the last token, labels (and their mask) drop the first
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask[:, 1:]}


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, in nats: (..., V) -> (...).
    H = -sum_v p_v log p_v with log p = z - logsumexp(z), so H = logsumexp(z) - sum_v p_v z_v. Written this
    way nothing overflows (logsumexp subtracts the max) and no log(0) appears for tokens of probability 0."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (...)
    p = torch.softmax(z, dim=-1)  # (..., V)
    return lse - (p * z).sum(dim=-1)


def get_response_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           return_token_entropy: bool = False) -> dict:
    """Per-token log p(labels[t] | input_ids[..t]) under `model`: {"log_probs": (B, T)} and, if asked,
    {"token_entropy": (B, T)} (the entropy of the whole next-token distribution at each position).
    Nothing is masked here; callers apply the response mask. A Hugging Face model (output with .logits)
    works too, so a course learner can check these functions against a transformers model unchanged."""
    result = model(input_ids)
    logits = getattr(result, "logits", result).float()  # (B, T, V); float32 even if the model runs in bf16
    # log p(y_t) = z_{y_t} - logsumexp(z): log_softmax then a gather of the label's column, (B, T, V) -> (B, T)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    out = {"log_probs": log_probs}
    if return_token_entropy:
        with torch.no_grad():  # a diagnostic, never differentiated
            out["token_entropy"] = compute_entropy(logits)
    return out


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of the entries where mask is True: sum(tensor * mask, dim) / sum(mask, dim). dim=None: over all.
    A slice with no True entries gives NaN (0/0), as the mean of nothing should."""
    m = mask.to(tensor.dtype)
    return (tensor * m).sum(dim=dim) / m.sum(dim=dim)


def masked_normalize(tensor: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
                     normalize_constant: float = 1.0) -> torch.Tensor:
    """sum(tensor * mask, dim) / normalize_constant. Dividing by a CONSTANT (not the number of tokens) is
    what keeps a long response's every token weighted like a short response's (Dr. GRPO's point)."""
    return (tensor * mask.to(tensor.dtype)).sum(dim=dim) / normalize_constant


def sft_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, normalize_constant: float = 1.0):
    """One SFT micro-batch: loss = -(sum of response-token log-probs / normalize_constant), averaged over
    the batch and divided by gradient_accumulation_steps (so the accumulated gradient is a mean over the
    whole step); calls backward(). Returns (loss, metadata) with the loss as back-propagated."""
    # (B, T) -> (B,): summed log-likelihood of each response; the negative is the cross-entropy to minimize
    per_example = masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = -per_example.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"response_tokens": response_mask.sum().detach(),
                           "nll_per_token": (-masked_mean(policy_log_probs, response_mask)).detach()}


# ---- 3. Rewards: parsing answers, grading them, the R1-Zero reward ----
def normalize_number(text: str) -> Optional[Fraction]:
    """A number written any common way -> an exact Fraction, or None.
    "1,234" (thousands separators), "-3", "2.50", ".5", "3/4", "$18", "18." and "18 dollars" all parse;
    exact rationals mean 0.5 == 1/2 == "0.50" without float rounding."""
    s = text.strip().replace("$", "").replace("\u2212", "-").rstrip(".")  # U+2212 is the typographic minus
    # The alternatives, in order: an integer with proper thousands groups ("1,234,567", never "1,23") or
    # plain digits, either with an optional decimal part; a bare decimal (".5"); a fraction ("3/4").
    m = re.fullmatch(r"(-?\d{1,3}(?:,\d{3})+|-?\d+)(?:\.(\d+))?|(-?)\.(\d+)|(-?\d+)\s*/\s*(\d+)", s)
    if m is None:
        m2 = re.match(r"^(-?[\d,]*\.?\d+(?:/\d+)?)\s*[A-Za-z%]*$", s)  # a trailing unit: "18 dollars", "50%"
        if m2 is None or m2.group(1) == s:
            return None
        return normalize_number(m2.group(1))
    try:  # Fraction("2.50") is exact (5/2): no 0.1 + 0.2 != 0.3 surprises when grading
        if m.group(5) is not None:
            den = int(m.group(6))
            return None if den == 0 else Fraction(int(m.group(5)), den)
        if m.group(4) is not None:
            return Fraction(("-" if m.group(3) else "") + "0." + m.group(4))
        whole = m.group(1).replace(",", "")
        return Fraction(whole + ("." + m.group(2) if m.group(2) else ""))
    except (ValueError, ZeroDivisionError):
        return None


def grade_answer(given: str, ground_truth: str) -> bool:
    """True if `given` names the same number as `ground_truth` (exact rationals), or -- for non-numeric
    answers -- the same text up to case and surrounding whitespace."""
    a, b = normalize_number(given), normalize_number(str(ground_truth))
    if a is not None and b is not None:
        return a == b
    # not numbers (a word answer): compare text; an empty answer is never right, even against ""
    return given.strip().lower() == str(ground_truth).strip().lower() and given.strip() != ""


def r1_zero_reward_fn(response: str, ground_truth: str) -> dict:
    """The R1-Zero reward for a response to a prompt ending in "<think>".
    format_reward = 1 if the response closes the reasoning and gives one answer: "... </think> <answer> X
    </answer>"; answer_reward = 1 if X grades equal to the ground truth; reward = answer_reward, and 0
    without the format (an answer that cannot be found cannot be checked)."""
    # The CS336 grader asks for exactly "</think> <answer>"; any whitespace between the tags is accepted here,
    # since a BPE model may emit the space as its own token or fold it into the next one.
    m = re.search(r"</think>\s*<answer>(.*?)</answer>", response, flags=re.DOTALL)
    if m is None or response.count("<answer>") != 1:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    ok = grade_answer(m.group(1), ground_truth)
    return {"format_reward": 1.0, "answer_reward": float(ok), "reward": float(ok)}


# ---- 4. Policy gradients: group-normalized advantages, the three losses, one GRPO micro-batch ----
# The objective is J(theta) = E_{q, o ~ pi_theta(.|q)} [ R(q, o) ]. Its gradient is
#     grad J = E [ R(q, o) * grad log pi_theta(o | q) ]          (REINFORCE: push up what scored well)
# and subtracting any baseline b(q) that does not depend on o keeps it unbiased while cutting its variance.
# GRPO's baseline needs no value network: sample G responses per prompt and use their mean reward,
#     A_i = (r_i - mean(r_group)) / (std(r_group) + eps)        (std division optional; Dr. GRPO drops it)
# A group where every response scores the same has A = 0: it teaches nothing, whatever the reward.

def compute_group_normalized_rewards(reward_fn: Callable, rollout_responses: list[str],
                                     repeated_ground_truths: list[str], group_size: int, advantage_eps: float,
                                     normalize_by_std: bool):
    """Score each rollout and normalize within its group of `group_size` consecutive rollouts.
    Returns (advantages (N,), raw_rewards (N,), metadata). std is torch's unbiased std of the group.
    A reward function that raises is reported with the rollout it failed on (not swallowed: a broken
    verifier would silently train the model on zeros)."""
    n = len(rollout_responses)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if n == 0:
        raise ValueError("no rollouts to score (an empty group)")
    if n != len(repeated_ground_truths):
        raise ValueError(f"{n} rollouts but {len(repeated_ground_truths)} ground truths")
    if n % group_size:
        raise ValueError(f"{n} rollouts do not split into groups of {group_size}")
    scores = []
    for i, (resp, gt) in enumerate(zip(rollout_responses, repeated_ground_truths)):
        try:
            scores.append(reward_fn(resp, gt))
        except Exception as e:
            raise RuntimeError(f"reward function failed on rollout {i} (response {resp[:80]!r}): "
                               f"{type(e).__name__}: {e}") from e
    raw = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (N,)
    # consecutive rollouts share a prompt: row g of the view is group g
    grouped = raw.view(-1, group_size)  # (n_groups, G)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_by_std:
        # Dividing by the std makes every group's advantages unit-scale: a group of nearly-equal rewards gets
        # its small differences blown up, which is the difficulty bias Dr. GRPO points out (too-easy and
        # too-hard prompts are up-weighted). eps keeps an all-equal group at 0 instead of 0/0.
        std = grouped.std(dim=-1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + advantage_eps)
    # what the log reports per step: how good the batch was, and how much of it carried any signal at all
    meta = {"reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if n > 1 else 0.0,
            "reward_max": float(raw.max()), "reward_min": float(raw.min()),
            "format_reward_mean": sum(float(s.get("format_reward", 0.0)) for s in scores) / n,
            "answer_reward_mean": sum(float(s.get("answer_reward", 0.0)) for s in scores) / n,
            "frac_groups_all_equal": float((grouped.max(-1).values == grouped.min(-1).values).float().mean())}
    return centred.reshape(-1), raw, meta


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: torch.Tensor,
                                       policy_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token REINFORCE loss -A * log pi(o_t): (B, 1) advantages broadcast over (B, T) log-probs.
    Minimizing it follows A * grad log pi, the policy gradient."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages: torch.Tensor, policy_log_probs: torch.Tensor,
                           old_log_probs: torch.Tensor, cliprange: float):
    """PPO's clipped surrogate, per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), with
    ratio = pi_theta(o_t) / pi_old(o_t) = exp(log pi_theta - log pi_old).
    Why clip: reusing a batch of rollouts for several updates makes them off-policy; the ratio corrects for
    that, and clipping stops any one token's probability moving more than a factor (1 +- eps) per batch --
    for A > 0 the gain is capped once ratio > 1 + eps, for A < 0 once ratio < 1 - eps.
    Returns (loss (B, T), {"clipped": bool (B, T) where the clipped term was the smaller, "clip_fraction"})."""
    # the ratio from log-probs (a difference, then one exp): dividing two tiny probabilities would underflow
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
    loss = -torch.minimum(unclipped, clipped)
    # The clipped term won the min: its gradient is 0 (a clamped ratio is constant), so this token no longer
    # pushes the policy; the fraction of such tokens says how far the policy has moved from pi_old.
    was_clipped = clipped < unclipped
    return loss, {"clipped": was_clipped, "clip_fraction": was_clipped.float().mean(), "ratio": ratio.detach()}


POLICY_GRADIENT_LOSSES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")


def compute_policy_gradient_loss(policy_log_probs: torch.Tensor, loss_type: str,
                                 raw_rewards: Optional[torch.Tensor] = None,
                                 advantages: Optional[torch.Tensor] = None,
                                 old_log_probs: Optional[torch.Tensor] = None,
                                 cliprange: Optional[float] = None):
    """Dispatch: "no_baseline" (raw rewards), "reinforce_with_baseline" (group-normalized advantages),
    "grpo_clip" (advantages + the clipped ratio). Returns (per-token loss (B, T), metadata)."""
    def need(name, value):
        if value is None:
            raise ValueError(f"loss_type {loss_type!r} needs {name}")
        return value
    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(need("raw_rewards", raw_rewards), policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(need("advantages", advantages), policy_log_probs), {}
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(need("advantages", advantages), policy_log_probs,
                                      need("old_log_probs", old_log_probs), need("cliprange", cliprange))
    raise ValueError(f"loss_type must be one of {list(POLICY_GRADIENT_LOSSES)}, got {loss_type!r}")


def grpo_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                               gradient_accumulation_steps: int, loss_type: str,
                               raw_rewards: Optional[torch.Tensor] = None,
                               advantages: Optional[torch.Tensor] = None,
                               old_log_probs: Optional[torch.Tensor] = None,
                               cliprange: Optional[float] = None,
                               normalize_constant: Optional[float] = None):
    """One GRPO micro-batch: per-token policy-gradient loss, reduced over each response, averaged over the
    batch, divided by gradient_accumulation_steps; calls backward(). Returns (loss, metadata).
    Reduction over a response: GRPO's masked MEAN (each response counts once, so a long response's tokens
    each get a smaller share: a length bias), or with `normalize_constant` Dr. GRPO's sum / constant (e.g.
    the generation budget: every token weighted the same, whatever its response's length)."""
    per_token, meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
                                                   old_log_probs, cliprange)
    if normalize_constant is None:
        per_example = masked_mean(per_token, response_mask, dim=-1)  # (B,)
    else:
        per_example = masked_normalize(per_token, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = per_example.mean() / gradient_accumulation_steps
    loss.backward()  # gradients accumulate in .grad across micro-batches; the caller steps the optimizer
    meta = {k: v for k, v in meta.items() if k != "ratio"}
    if "clipped" in meta:  # the fraction over RESPONSE tokens only (padding is not a decision)
        meta["clip_fraction"] = masked_mean(meta["clipped"].float(), response_mask).detach()
    return loss.detach(), meta

# ---- 5. DPO: preferences without a reward model ----
# RLHF maximizes E[r(x, y)] - beta * KL(pi || pi_ref). Its optimal policy is pi*(y|x) ~ pi_ref(y|x) exp(r/beta),
# so a reward is implied by a policy: r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + (a term of x alone).
# Put that into the Bradley-Terry likelihood of "chosen beats rejected" and the x-term cancels:
#     L = -log sigmoid( beta * [ (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) ] ).
# Only log-probabilities of given responses are needed: no sampling, no reward model inside the loss.

def sequence_log_probs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Summed log-probability of each response given its prompt: (B,). pairs = [(prompt_ids, response_ids)]."""
    batch = pack_prompt_response_ids(pairs, pad_id)
    dev = next(model.parameters()).device
    lp = get_response_log_probs(model, batch["input_ids"].to(dev), batch["labels"].to(dev))["log_probs"]
    return masked_normalize(lp, batch["response_mask"].to(dev), dim=-1)


def dpo_loss(policy, reference, prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
             beta: float, pad_id: int):
    """Batched DPO loss (mean over pairs) and metadata (preference accuracy, implied reward margin).
    Chosen and rejected go through the model in ONE batch (2B rows), and the reference without gradients."""
    # rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones, in the same prompt order
    pairs, B = list(zip(prompts, chosen)) + list(zip(prompts, rejected)), len(prompts)
    logp = sequence_log_probs(policy, pairs, pad_id)  # (2B,)
    with torch.no_grad():
        ref = sequence_log_probs(reference, pairs, pad_id)
    # implied reward of each response = beta * log(pi / pi_ref); the loss wants chosen's above rejected's.
    # logsigmoid(x) = -softplus(-x) is stable for large |x| (log(sigmoid(x)) would underflow to log 0).
    margin = beta * ((logp[:B] - ref[:B]) - (logp[B:] - ref[B:]))  # (B,)
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {"pref_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


def compute_per_instance_dpo_loss(lm, lm_ref, tokenizer, beta: float, prompt: str, response_chosen: str,
                                  response_rejected: str) -> torch.Tensor:
    """The DPO loss of ONE preference pair in the course's format: the prompt inside the Alpaca template,
    each response after "### Response:\\n" followed by end-of-text. Returns a scalar tensor (differentiable
    through `lm`; `lm_ref` is only read)."""
    eot = getattr(tokenizer, "eot_id", None)
    eot = getattr(tokenizer, "eos_token_id", None) if eot is None else eot
    if eot is None:
        raise ValueError("the tokenizer has no end-of-text token to end the responses with")
    # The template up to "### Response:\n" is the prompt; the response is tokenized separately so both sequences
    # share the prompt's exact ids (its log-probability is then identical in both and cancels in the margin).
    p_ids = _encode(tokenizer, ALPACA_TEMPLATE.format(instruction=prompt, response=""))
    c_ids = _encode(tokenizer, response_chosen) + [eot]
    r_ids = _encode(tokenizer, response_rejected) + [eot]
    loss, _ = dpo_loss(lm, lm_ref, [p_ids], [c_ids], [r_ids], beta, pad_id_of(tokenizer))
    return loss


# ---- 6. Rollouts: G responses per prompt, decoded together through model.py's KV cache ----
# Every feedback step starts with INFERENCE: P prompts x G samples, decoded as one batch of P*G rows (one
# forward per new token for all of them) through model.py's KV cache, so each new token costs one position,
# not the whole prefix. The G rows of a group share their prompt: `Menu: faster rollouts` prefills it once.

@torch.no_grad()
def sample_rollouts(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
                    eos_id: Optional[int], generator: Optional[torch.Generator] = None,
                    share_prefill: bool = True, use_cache: bool = True) -> list[list[int]]:
    """len(prompts) * group_size responses (token ids; a response ends with eos_id when it emitted it),
    ordered prompt by prompt: [p0 x G, p1 x G, ...]. temperature 0 = greedy. By default each prompt is
    prefilled once for its whole group (shared_prefill_rollouts); share_prefill=False prefills every row
    (model.generate, the comparison in `bench`); use_cache=False recomputes the whole sequence each step."""
    cfg = model.config
    if group_size < 1 or not prompts:
        raise ValueError(f"need at least one prompt and group_size >= 1 (got {len(prompts)}, {group_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.context_length:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {cfg.context_length}; shorten the prompt or lower max_new_tokens")
    if use_cache and share_prefill:
        return shared_prefill_rollouts(model, prompts, group_size, max_new_tokens, temperature, eos_id, generator)
    rows = [list(p) for p in prompts for _ in range(group_size)]  # the plain path: model.generate on every row
    return M.generate(model, rows, max_new_tokens, temperature=temperature, eos_id=eos_id,
                      use_cache=use_cache, generator=generator) if max_new_tokens else [[] for _ in rows]


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text without its end-of-text (the reward looks at what the model said, not how it stopped).
    Nothing else is dropped: a response that emits stray bytes is graded on what it actually said."""
    return tokenizer.decode([t for t in ids if t != tokenizer.eot_id])


# ---- 7. Evaluation: held-out accuracy with an interval, format rate, length, entropy ----
# What to report after each stage, and why each number is there:
#   accuracy       on problems no stage trained on (the only number that says the model got better, not
#                  that it memorized), with a 95% interval (without one, a 3-point gain on 500 problems is
#                  indistinguishable from luck)
#   format rate    RL can raise the reward by learning the format alone; this separates the two
#   length         a policy gradient can drift toward longer or shorter answers (GRPO's length bias)
#   entropy        how peaked the policy is on its own answers: RL sharpens it (and an entropy collapse
#                  means the model stopped exploring, so later RL steps have nothing left to learn from)

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: unlike p +- 1.96 sqrt(p(1-p)/n) it stays inside [0, 1]
    and is honest at p near 0 or 1 (where the normal approximation claims zero uncertainty).
    It inverts the score test: the interval holds every true p for which |p_hat - p| <= z sqrt(p(1-p)/n),
    a quadratic in p whose two roots are centre +- half below."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_task(model, tokenizer, problems: list[Problem], max_new_tokens: int = 48, batch_size: int = 128,
                  reward_fn: Callable = r1_zero_reward_fn, prompt_fn: Optional[Callable] = None) -> dict:
    """Greedy responses to every problem, graded by `reward_fn`: the four numbers above (accuracy = answer
    reward; length in tokens; entropy per response token, in nats) and decoding throughput.
    prompt_fn: Problem -> prompt text (default task_prompt, the built-in task's R1-Zero prompt)."""
    prompt_fn = prompt_fn or task_prompt
    # Greedy decoding: the accuracy of the policy's single best guess, deterministic, so two checkpoints are
    # compared on exactly the same footing (sampling would add noise of its own to every comparison).
    t0, correct, formatted, lengths, ent_sum, ent_n, examples = time.time(), 0, 0, [], 0.0, 0, []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [_encode(tokenizer, prompt_fn(p)) for p in chunk]
        outs = sample_rollouts(model, prompts, 1, max_new_tokens, 0.0, tokenizer.eot_id)
        for p, o in zip(chunk, outs):
            r = reward_fn(decode_response(tokenizer, o), p.answer)
            correct += int(r["answer_reward"] > 0)
            formatted += int(r["format_reward"] > 0)
            lengths.append(len(o))
            if len(examples) < 3:  # a few question -> response lines for the log
                examples.append(p.question[:60] + " ->" + decode_response(tokenizer, o).replace("\n", "\\n")[:100])
        with torch.no_grad():  # entropy of the policy over its own response tokens
            batch = pack_prompt_response_ids([(p, o) for p, o in zip(prompts, outs) if o], pad_id_of(tokenizer))
            if batch["input_ids"].shape[1] > 0:
                dev = next(model.parameters()).device
                r = get_response_log_probs(model, batch["input_ids"].to(dev), batch["labels"].to(dev), True)
                m = batch["response_mask"].to(dev)
                ent_sum += float((r["token_entropy"] * m).sum())
                ent_n += int(m.sum())
    # With 500 problems a 95% interval is about +-4 points at 50% accuracy: differences smaller than that
    # are noise, which is why every comparison in the demo is made on 500 held-out problems.
    n, dt = len(problems), time.time() - t0
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "accuracy": correct / max(n, 1), "ci_low": lo, "ci_high": hi, "format_rate": formatted / max(n, 1),
            "mean_length": sum(lengths) / max(n, 1), "entropy": ent_sum / max(ent_n, 1), "seconds": dt,
            "tokens_per_s": sum(lengths) / max(dt, 1e-9), "examples": examples}


# ---- 8. The stages: SFT, expert iteration, GRPO (on- and off-policy), DPO -- one step function each ----
# On- versus off-policy. The policy gradient is an expectation under the CURRENT policy, so rollouts are only
# exactly right for the first update after they were sampled. Sampling is the expensive part, so GRPO reuses
# a batch for several updates (epochs_per_batch x minibatches) and corrects with the importance ratio
# pi_theta / pi_old, clipped so that stale rollouts cannot drag the policy far. Expert iteration and DPO are
# off-policy by nature (a fixed set of examples), and need no ratio: their losses are likelihoods.
#
# Each stage is a loop of STEPS; a step function takes (context, step index) and returns a dict of metrics.
# What differs between the methods is only what a step does:
#   sft   a batch of worked solutions -> cross-entropy on the response tokens -> one optimizer step
#   ei    rollouts -> keep the verified ones -> the SFT update on them (the model's own correct answers)
#   grpo  rollouts -> group-normalized advantages -> policy-gradient update(s), on- or off-policy
#   dpo   rollouts -> (verified, rejected) pairs per prompt -> the DPO loss against the frozen start
# Everything a step samples is a function of (seed, step), which is what makes resuming after a kill exact.
# The plumbing holds the rest: the options (AlignConfig), the step's context and run_stage's loop around it.

def _rows_in_micro_batches(n: int, micro: int):
    """[(start, end)] spans of at most `micro` rows: the forward/backward pieces of one optimizer step. Memory
    grows with rows x tokens x vocab (the logits), so big rollout batches are processed a slice at a time and
    their gradients accumulate before the single optimizer step."""
    return [(i, min(i + micro, n)) for i in range(0, n, micro)]


def _step(model, opt, cfg) -> float:
    """Clip the global gradient norm (RL gradients are noisy: one lucky group can produce a huge step), take
    the optimizer step, clear the gradients. Returns the norm before clipping (a health signal in the log)."""
    gnorm = T.gradient_clipping(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else float("nan")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(gnorm)


def sft_update(model, opt, pairs: list[tuple[list[int], list[int]]], cfg, pad_id: int) -> dict:
    """One optimizer step of SFT on (prompt_ids, response_ids) pairs: mean negative log-likelihood per response
    token over the whole batch (normalize_constant = response tokens per example), micro-batched."""
    total_tokens, nll = sum(len(o) for _, o in pairs), 0.0
    for a, b in _rows_in_micro_batches(len(pairs), cfg.micro_batch):
        batch = pack_prompt_response_ids(pairs[a:b], pad_id)
        lp = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        # sum over this micro-batch's tokens / all tokens of the step: exactly the step's per-token mean
        loss, _ = sft_microbatch_train_step(lp, batch["response_mask"], 1, normalize_constant=total_tokens / (b - a))
        nll += float(loss)  # each micro-batch's share of the step's mean
    return {"loss": nll, "grad_norm": _step(model, opt, cfg)}


def sft_step(ctx: StageContext, step: int) -> dict:
    """SFT: a batch of worked solutions from a fixed pool (epochs over it in a fixed shuffled order)."""
    cfg = ctx.cfg
    # step s covers examples s*B .. s*B+B-1 of an endless sequence of epochs, each its own fixed shuffle
    # (a pool smaller than a batch simply wraps into the next epoch)
    n, perms, chosen = len(ctx.sft_pool), {}, []
    for k in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(f"{cfg.seed}-epoch-{epoch}").shuffle(perms[epoch])
        chosen.append(perms[epoch][pos])
    return sft_update(ctx.model, ctx.opt, [ctx.sft_pool[i] for i in chosen], cfg, ctx.pad_id)


UNFINISHED = {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}


def rollout_batch(ctx: StageContext, step: int) -> dict:
    """Sample G responses for each of batch_size training prompts and score them with the verifier.
    Deterministic in (seed, step): a resumed run samples exactly what the killed one would have."""
    cfg, tok, t0 = ctx.cfg, ctx.tokenizer, time.time()
    # batch_size distinct prompts; each is sampled group_size times (consecutive rows form a group)
    problems = random.Random(f"{cfg.seed}-{step}").sample(ctx.train_pool, cfg.batch_size)
    prompts = [_encode(tok, ctx.prompt_fn(p)) for p in problems]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    outs = sample_rollouts(ctx.model, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, tok.eot_id, gen)
    t1 = time.time()
    # A response cut off by the token budget is scored as a failure, whatever it said before the cut: else
    # "correct answer, then rambling on" is rewarded, and fine-tuning on it teaches the model never to stop.
    texts = [decode_response(tok, o) if (o and o[-1] == tok.eot_id) or not ctx.require_eot else None for o in outs]
    truths = [p.answer for p in problems for _ in range(cfg.group_size)]
    reward_fn = lambda text, gt: ctx.reward_fn(text, gt) if text is not None else UNFINISHED  # noqa: E731
    adv, raw, meta = compute_group_normalized_rewards(reward_fn, texts, truths, cfg.group_size, 1e-6,
                                                      cfg.normalize_by_std)
    # pairs[i] = (prompt ids, response ids) of rollout i; advantages/rewards are (P*G,) tensors
    prompt_rows = [p for p in prompts for _ in range(cfg.group_size)]
    return {"pairs": list(zip(prompt_rows, outs)), "advantages": adv, "rewards": raw, "meta": meta,
            "rollout_s": t1 - t0, "score_s": time.time() - t1, "mean_length": sum(map(len, outs)) / len(outs)}


def ei_step(ctx: StageContext, step: int) -> dict:
    """Expert iteration: sample, keep what the verifier accepts (one copy per distinct response), and
    fine-tune on it -- SFT on the model's own correct answers.

    It is the policy gradient with a 0/1 reward and no baseline, restricted to the successes: failures are
    ignored instead of pushed down, and a prompt it already solves every time still contributes (GRPO's
    advantage for such a group is 0). Cheap and stable; it learns nothing from prompts it never solves."""
    cfg = ctx.cfg
    rb, t0 = rollout_batch(ctx, step), time.time()  # t0: the update's clock starts after the rollouts
    # Duplicates are dropped: a prompt the model already answers right 8 times out of 8 would otherwise
    # dominate the batch with 8 copies of a lesson it does not need (the easy problems crowd out the rest).
    keep = {(tuple(p), tuple(o)): (p, o) for (p, o), r in zip(rb["pairs"], rb["rewards"].tolist()) if r > 0}
    kept = list(keep.values())
    random.Random(f"{cfg.seed}-ei-{step}").shuffle(kept)
    stats = {"loss": float("nan"), "grad_norm": float("nan")}  # a batch with nothing verified: no update
    for _ in range(cfg.epochs_per_batch):
        for a, b in _rows_in_micro_batches(len(kept), max(1, -(-len(kept) // cfg.minibatches))):
            stats = sft_update(ctx.model, ctx.opt, kept[a:b], cfg, ctx.pad_id)
    return _rl_row(rb, t0, **stats, kept=len(kept))


def grpo_step(ctx: StageContext, step: int) -> dict:
    """GRPO: rollouts -> group-normalized advantages -> policy-gradient updates. With epochs_per_batch > 1 (or
    several minibatches) later updates use rollouts of an older policy: off-policy, corrected by the clipped
    ratio against the log-probs recorded before the first update.

    No KL penalty to a reference model (DeepSeekMath adds one; DAPO and Dr. GRPO drop it): on a verifiable
    reward with few steps there is nothing to protect, and it would cost a reference forward per batch."""
    cfg, model = ctx.cfg, ctx.model
    rb, t0 = rollout_batch(ctx, step), time.time()  # t0: the update's clock starts after the rollouts
    adv, raw, n = rb["advantages"], rb["rewards"], len(rb["pairs"])
    nconst = float(cfg.max_new_tokens) if cfg.length_normalization == "constant" else None
    batch = pack_prompt_response_ids(rb["pairs"], ctx.pad_id)  # right-padded (N, L) rows, N = P*G
    ids, labels, old = batch["input_ids"], batch["labels"], None
    if cfg.loss_type == "grpo_clip":
        with torch.no_grad():  # log pi_old: the policy that sampled the rollouts
            old = torch.cat([get_response_log_probs(model, ids[a:b], labels[a:b])["log_probs"]
                             for a, b in _rows_in_micro_batches(n, cfg.micro_batch)])
    losses, clips, gnorm = [], [], float("nan")
    # epochs x minibatches optimizer steps on the same rollouts; only the first is exactly on-policy
    for epoch in range(cfg.epochs_per_batch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch))
        per_mb = -(-n // cfg.minibatches)
        for m0 in range(0, n, per_mb):
            rows = order[m0:m0 + per_mb]
            spans = _rows_in_micro_batches(len(rows), cfg.micro_batch)
            for a, b in spans:  # gradient accumulation: each micro-batch carries 1/len(spans) of the step
                r = rows[a:b]
                lp = get_response_log_probs(model, ids[r], labels[r])["log_probs"]
                loss, meta = grpo_microbatch_train_step(
                    lp, batch["response_mask"][r], len(spans), cfg.loss_type, raw_rewards=raw[r, None],
                    advantages=adv[r, None], old_log_probs=None if old is None else old[r], cliprange=cfg.cliprange,
                    normalize_constant=nconst)
                losses.append(float(loss) * len(spans))
                if "clip_fraction" in meta:
                    clips.append(float(meta["clip_fraction"]))
            gnorm = _step(model, ctx.opt, cfg)
    extra = {"clip_fraction": sum(clips) / len(clips)} if clips else {}
    return _rl_row(rb, t0, loss=sum(losses) / max(len(losses), 1), grad_norm=gnorm, **extra)


def dpo_step(ctx: StageContext, step: int) -> dict:
    """DPO on verifier-ranked pairs: per prompt, one response the verifier accepts (chosen) against one it
    rejects (rejected), both sampled from the current policy; the reference is the starting model.

    This is "online" DPO (pairs from the current policy at every step) rather than the original's fixed
    data set of human preferences; the verifier plays the human. Each pair uses one chosen and one rejected
    response out of G, so DPO sees fewer of the sampled tokens than GRPO does on the same rollouts."""
    cfg, G = ctx.cfg, ctx.cfg.group_size
    rb, t0 = rollout_batch(ctx, step), time.time()  # t0: the update's clock starts after the rollouts
    # One pair per group, only from groups with both outcomes: a group the model always (or never) solves
    # says nothing about which of two answers is better. Unfinished responses count as rejected.
    rng, rewards, pairs = random.Random(f"{cfg.seed}-dpo-{step}"), rb["rewards"].tolist(), rb["pairs"]
    prompts, chosen, rejected = [], [], []
    for g in range(len(rewards) // G):
        good = [i for i in range(g * G, (g + 1) * G) if rewards[i] > 0]
        bad = [i for i in range(g * G, (g + 1) * G) if rewards[i] <= 0]
        if good and bad:
            i, j = rng.choice(good), rng.choice(bad)
            prompts.append(pairs[i][0])
            chosen.append(pairs[i][1])
            rejected.append(pairs[j][1])
    stats = {"loss": float("nan"), "grad_norm": float("nan"), "pref_accuracy": float("nan")}
    if prompts:  # chosen + rejected: 2 rows per pair, hence half as many pairs per micro-batch
        total, accs = 0.0, []
        for a, b in _rows_in_micro_batches(len(prompts), max(1, cfg.micro_batch // 2)):
            loss, meta = dpo_loss(ctx.model, ctx.reference, prompts[a:b], chosen[a:b], rejected[a:b], cfg.beta,
                                  ctx.pad_id)
            (loss * (b - a) / len(prompts)).backward()
            total += float(loss.detach()) * (b - a) / len(prompts)
            accs.append(meta["pref_accuracy"])
        stats = {"loss": total, "grad_norm": _step(ctx.model, ctx.opt, cfg), "pref_accuracy": sum(accs) / len(accs)}
    return _rl_row(rb, t0, **stats, pairs=len(prompts))


STEP_FUNCTIONS = {"sft": sft_step, "ei": ei_step, "grpo": grpo_step, "dpo": dpo_step}


# ===== Menu: packed SFT data =====
# Two ways to batch SFT data. Per example (tokenize_prompt_and_output: one row per example, padded, loss only
# on the response) is what the stages above use. PACKED (below) is what pretraining-style SFT on instruction
# data uses at scale: no padding at all, the loss on every token, templates included.

def get_packed_sft_dataset(tokenizer, dataset_path, seq_length: int, shuffle: bool, seed: int = 0) -> list[dict]:
    """Read a JSONL file of {"prompt", "response"} examples (malformed lines skipped and reported), format
    each with the Alpaca template, append end-of-text, concatenate (shuffled first if asked) and cut into
    fixed windows of L = seq_length tokens: item i is {"input_ids": stream[i*L:(i+1)*L], "labels":
    stream[i*L+1:(i+1)*L+1]} (LongTensors), a map-style data set (len, [i]) for iterate_batches or a DataLoader.
    Packing wastes no compute on padding; an example may straddle two windows, which is harmless because
    end-of-text separates it from its neighbour (what the course's packed SFT does)."""
    rows = read_jsonl(dataset_path, required=("prompt", "response"))
    # shuffle the EXAMPLES before packing (shuffling windows later would keep neighbours glued together)
    if shuffle:
        random.Random(seed).shuffle(rows)
    eot = tokenizer.eot_id if getattr(tokenizer, "eot_id", None) is not None else pad_id_of(tokenizer)
    stream: list[int] = []
    for r in rows:
        stream += _encode(tokenizer, ALPACA_TEMPLATE.format(instruction=r["prompt"], response=r["response"]))
        stream.append(eot)
    s, L = torch.tensor(stream, dtype=torch.long), seq_length
    # windows of L inputs need L + 1 tokens (the labels run one ahead); a leftover tail is dropped
    windows = [{"input_ids": s[i * L:(i + 1) * L], "labels": s[i * L + 1:(i + 1) * L + 1]}
               for i in range((len(s) - 1) // L)]
    if not windows:
        raise ValueError(f"{dataset_path}: {len(stream)} tokens, fewer than one sequence of {seq_length} + 1")
    return windows


def iterate_batches(dataset, batch_size: int, shuffle: bool, seed: Optional[int] = None) -> Iterable[dict]:
    """One pass over `dataset` in batches of `batch_size` (the last may be smaller), items stacked per key."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(dataset)))
    if shuffle:  # a seeded order: the same seed gives the same batches (reproducible, resumable)
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        items = [dataset[j] for j in order[i:i + batch_size]]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ===== Menu: faster rollouts =====
# One prefill per PROMPT instead of one per sample: sample_rollouts (the core's rollouts) calls
# shared_prefill_rollouts by default; share_prefill=False is model.generate's per-row prefill, which `bench` compares.
# The cost model of a rollout batch (P prompts of length Tp, G samples each, Tn new tokens, N parameters):
#   without a cache   every new token re-runs the whole prefix: ~2N * P*G * sum_t (Tp + t) FLOPs, quadratic in Tn
#   with a KV cache   prefill 2N * P*G*Tp once, then 2N * P*G per new token: linear in Tn
#   shared prefill    the prefill once per PROMPT (2N * P*Tp), the cache copied G times
# On a CPU a 1M-parameter model is bound by per-step overhead more than by FLOPs, which is why the batch of
# P*G rows decodes together: one forward per new token for all of them. `python align.py bench` measures it.

@torch.no_grad()
def shared_prefill_rollouts(model, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                            temperature: float, eos_id: Optional[int],
                            generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """sample_rollouts' fast path: prefill the P distinct prompts ONCE into a KV cache (P rows), copy each row
    G times and decode all P*G rows one token per step: G times less prefill, the cost of long prompts."""
    cfg, longest = model.config, max(len(p) for p in prompts)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        # Prompts of different lengths are LEFT-padded so every row's next token lands in the same cache slot;
        # pad_lens tells the cache to mask the padding and to start each row's positions at its first token.
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (P, Tp)
        cache = M.KVCache(cfg, len(prompts), longest + max_new_tokens, pad, device=device, dtype=dtype)
        logits = model(ids, kv_cache=cache, last_only=True)[:, -1]  # (P, V): one prefill per prompt
        # Copy every cache row G times (row i -> rows i*G .. i*G+G-1): memory traffic of L layers x P*G x Hkv x
        # capacity x dh floats, against a forward over P*(G-1) prompts; for any prompt over a few tokens it wins.
        cache.k = [k.repeat_interleave(group_size, dim=0) for k in cache.k]  # (P*G, Hkv, cap, dh) per layer
        cache.v = [v.repeat_interleave(group_size, dim=0) for v in cache.v]
        if cache.pad_lens is not None:
            cache.pad_lens = cache.pad_lens.repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)  # (P*G, V)
        return _decode_loop(model, cache, logits, max_new_tokens, temperature, eos_id, generator)
    finally:
        model.train(was_training)


def _decode_loop(model, cache, logits, max_new_tokens, temperature, eos_id, generator) -> list[list[int]]:
    """Sample one token per row per step, feeding only the newest token through the cache."""
    n = logits.shape[0]  # logits: (N, V) for the next token of each row
    out: list[list[int]] = [[] for _ in range(n)]
    # A finished row keeps being fed (the batch stays rectangular) but nothing it samples is recorded;
    # the loop ends early once every row has emitted end-of-text.
    done = torch.zeros(n, dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        if temperature == 0:  # greedy (evaluation); ties go to the lowest id, deterministically
            nxt = logits.argmax(-1)
        else:  # softmax(logits / T), inverse-CDF sampling with the caller's generator (reproducible rollouts)
            nxt = M.sample_from_probs(M.logits_to_probs(logits, temperature), generator)  # (N,)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:  # one new position per row: (N, 1) in, (N, V) out
            logits = model(nxt[:, None], kv_cache=cache, last_only=True)[:, -1]
    return out


# ===== Menu: real benchmarks (GSM8K, MMLU) =====
# The same evaluation as evaluate_task (the core), on standard data: GSM8K graded by its last number, MMLU by
# the option letter and by the log-likelihood of each option; `python align.py eval --task gsm8k|mmlu`.
# The lessons of evaluation, as they show up here:
#   * The SAME model scores differently under different protocols. A small model asked for a letter may
#     never write one (its letter accuracy can fall below the 25% of guessing), while comparing the
#     log-likelihood of the four options always yields an answer; report the protocol with the number.
#   * Parsing is part of the metric: "the last number in the output" is GSM8K's convention, and a model that
#     restates the question's numbers after its answer is graded wrong by it.
#   * Benchmarks leak into pretraining corpora (MMLU ships a list of possibly contaminated URLs); the
#     built-in task avoids the question by construction (held-out problems are excluded by hash).


# a number in free text: an optional minus, digits with optional commas, a decimal part or "/denominator"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_gsm8k_response(model_output: str) -> Optional[str]:
    """GSM8K's convention: the LAST number in the output is the answer ("... so she makes $18." -> "18").
    Thousands separators are dropped; None if the output has no number."""
    nums = _NUMBER.findall(model_output)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def parse_mmlu_response(mmlu_example: dict, model_output: str) -> Optional[str]:
    """The option letter (A-D) the output commits to, or None. Looks for "answer is X" first, then a lone
    capital letter A-D as a word; with several candidates the last one wins (models restate options)."""
    letters = "ABCD"[:len(mmlu_example.get("options", "ABCD"))]
    # "The answer is (C)", "Answer: C", "answer C" -- the explicit commitment, if the output has one
    m = re.findall(rf"[Aa]nswer(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])\b", model_output)
    if m:
        return m[-1]
    # else a capital letter standing alone ("B", "(B)", "B."), not one inside a word ("Because")
    m = re.findall(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", model_output)
    return m[-1] if m else None


def evaluate_gsm8k(model, tokenizer, examples: list[dict], max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    """Exact match of the LAST number of a greedy response (R1-Zero prompt) against the reference answer."""
    # A GSM8K question is ~60-200 tokens with GPT-2's tokenizer; a model with a short context cannot even
    # read the long ones, so they are skipped (and counted) rather than silently truncated.
    prompt, ctx = lambda p: R1_ZERO_PROMPT.format(question=p.question), model.config.context_length  # noqa: E731
    probs = [Problem(e["question"], e["answer"], "") for e in examples]
    sized = [(p, len(_encode(tokenizer, prompt(p)))) for p in probs]
    keep = [(p, n) for p, n in sized if n + 1 < ctx]
    if len(keep) < len(sized):
        print(f"gsm8k: {len(sized) - len(keep)} question(s) longer than the context of {ctx} skipped", file=sys.stderr)
    if not keep:
        raise ValueError(f"every GSM8K prompt is longer than the model's context ({ctx} tokens)")
    last_number = lambda resp, gt: {"format_reward": float(parse_gsm8k_response(resp) is not None),  # noqa: E731
                                    "answer_reward": float(grade_answer(parse_gsm8k_response(resp) or "", gt))}
    # the generation budget shrinks to what the context has left after the longest kept prompt
    budget = min(max_new_tokens, ctx - max(n for _, n in keep))
    return evaluate_task(model, tokenizer, [p for p, _ in keep], budget, batch_size, last_number, prompt)


def mmlu_prompt(e: dict) -> str:
    """The MMLU paper's zero-shot prompt: subject line, question, lettered options, "Answer:"."""
    opts = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(e["options"]))
    return f"The following is a multiple choice question about {e['subject'].replace('_', ' ')}.\n\n" \
           f"{e['question']}\n{opts}\nAnswer:"


@torch.no_grad()
def evaluate_mmlu(model, tokenizer, examples: list[dict], batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Two scorings of the same questions.
    letter:    greedy-generate after "Answer:" and parse the letter (a model that never writes a letter
               scores 0 -- small models often do).
    loglik:    score each option's TEXT as a continuation of the question, by its log-likelihood per byte
               (length-normalized, so long options are not penalized for being long); the best one is the
               answer. Every model gets an answer, and chance is 25%."""
    t0, n_letter, n_ll, n_tokens = time.time(), 0, 0, 0
    dev, ctx, pad = next(model.parameters()).device, model.config.context_length, pad_id_of(tokenizer)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [_encode(tokenizer, mmlu_prompt(e))[-(ctx - max_new_tokens):] for e in chunk]
        outs = sample_rollouts(model, prompts, 1, max_new_tokens, 0.0, tokenizer.eot_id)
        n_tokens += sum(map(len, outs))
        for e, o in zip(chunk, outs):
            n_letter += int(parse_mmlu_response(e, decode_response(tokenizer, o)) == e["answer"])
        for e, p in zip(chunk, prompts):  # the four options as continuations of the same prompt
            conts = [_encode(tokenizer, " " + o)[:ctx // 2] for o in e["options"]]  # (a very long option: cut)
            # a prompt too long for the context keeps its END (the question and "Answer:"), never the option
            pairs = [(p[-(ctx - len(c)):], c) for c in conts]
            lp = sequence_log_probs(model, pairs, pad)  # (4,) summed log-prob of each option
            n_bytes = [max(len(tokenizer.decode(c).encode("utf-8")), 1) for c in conts]  # bytes actually scored
            per_byte = lp / torch.tensor(n_bytes, dtype=lp.dtype, device=dev)
            n_ll += int("ABCD"[int(per_byte.argmax())] == e["answer"])
    # throughput counts questions (both scorings) and generated tokens (the letter scoring's decode)
    n, dt = len(examples), time.time() - t0
    res = {"n": n, "seconds": dt, "questions_per_s": n / max(dt, 1e-9), "tokens_per_s": n_tokens / max(dt, 1e-9)}
    for name, k in (("letter", n_letter), ("loglik", n_ll)):
        lo, hi = wilson_interval(k, n)
        res[name] = {"accuracy": k / max(n, 1), "ci_low": lo, "ci_high": hi}
    return res

# The official sources: GSM8K's JSONL files in OpenAI's repository; MMLU's tar of CSVs from its authors. Both are
# fetched with model.py's download (resumable, size-checked, renamed into place only when complete; file:// too).
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"


def load_gsm8k(path: Optional[str] = None, split: str = "test", cache_dir: str = "data_cache/gsm8k",
               url: Optional[str] = None) -> list[dict]:
    """GSM8K as [{"question", "answer" (the number after '####'), "solution"}]. `path` is a JSONL file;
    without it the split is downloaded once (from `url`, default the official repository) and cached."""
    if path is None:
        path = M.download(url or GSM8K_URL.format(split=split), Path(cache_dir) / f"{split}.jsonl")
    # The official format: the reference solution's last line is "#### <answer>"; a row without one cannot
    # be graded and counts as malformed (reported with its line number like a line that is not JSON).
    has_final = lambda r: "####" in str(r["answer"]) and str(r["answer"]).rsplit("####", 1)[1].strip()  # noqa: E731
    out = []
    for r in read_jsonl(path, required=("question", "answer"), check=has_final):
        solution, final = str(r["answer"]).rsplit("####", 1)
        out.append({"question": r["question"], "answer": final.strip().replace(",", ""), "solution": solution})
    return out


def load_mmlu(path: Optional[str] = None, split: str = "test", cache_dir: str = "data_cache/mmlu",
              url: Optional[str] = None, subjects: Optional[list] = None) -> list[dict]:
    """MMLU as [{"subject", "question", "options" (4), "answer" ("A".."D")}] from the standard folder of
    CSVs (<path>/<split>/<subject>_<split>.csv, no header: question, A, B, C, D, answer). Without `path` the
    official archive is downloaded and unpacked once. Malformed rows are skipped with file and line number."""
    if path is None:
        root = Path(cache_dir)
        if not (root / "data" / split).is_dir():  # the archive unpacks to data/{dev,val,test,...}/
            archive = M.download(url or MMLU_URL, root / "data.tar")
            with tarfile.open(archive) as t:
                t.extractall(root, filter="data")  # "data" filter: no absolute paths, links or devices
        path = str(root / "data")
    folder = Path(path) / split if (Path(path) / split).is_dir() else Path(path)
    files = sorted(folder.glob(f"*_{split}.csv")) or sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU CSV files in {folder}")
    out, bad = [], []
    for fp in files:
        subject = fp.stem.removesuffix("_" + split)
        if subjects and subject not in subjects:
            continue
        # csv handles quoted fields with commas and newlines inside; line_num is the file line a row ENDS on
        with open(fp, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                line = f"{fp.name}:{reader.line_num}"
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D") or not row[0].strip():
                    bad.append(line)
                    continue
                out.append({"subject": subject, "question": row[0], "options": row[1:5], "answer": row[5].strip()})
    if bad:
        print(f"MMLU: skipped {len(bad)} malformed row(s): {', '.join(bad[:20])}", file=sys.stderr)
    return out


# ===== Appendix: plumbing =====
# The options of a run, the stage loop with its checkpoints, resume, lock and log, the built-in task, and
# the demo's preset and driver: needed for a real tool, not for the ideas above.

# ---- the options of a stage run ----
@dataclass
class AlignConfig:
    """Every option of a stage run (`python align.py <stage> --flag`: each field below is a flag).

    stage: sft | ei | grpo | dpo
    name: label of this run in logs and plots (default: the stage)
    init: checkpoint to start from (train.py's ckpt.pt or a previous stage's)
    pretrained: instead of --init: gpt2 (Hugging Face weights, downloaded once) or a local safetensors folder
    out_dir: run folder (command line default: runs/align/<stage>)
    steps: optimizer steps (sft, dpo) / rollout batches (ei, grpo)
    lr: AdamW learning rate
    weight_decay: AdamW weight decay (0: fine-tuning stays near the weights it started from)
    grad_clip: clip the global gradient norm to this (0: off)
    batch_size: sft: examples per step; ei/grpo/dpo: prompts per rollout batch
    micro_batch: rows per forward/backward (gradient accumulation above it)
    group_size: rollouts per prompt
    max_new_tokens: token budget of a rollout
    temperature: sampling temperature of the rollouts
    sft_examples: sft: size of the pool of worked solutions
    loss_type: grpo: no_baseline | reinforce_with_baseline | grpo_clip
    epochs_per_batch: passes over each rollout batch (>1 is off-policy: use grpo_clip)
    minibatches: grpo/ei: optimizer steps per pass over a rollout batch
    cliprange: grpo_clip: the ratio is clipped to [1 - cliprange, 1 + cliprange]
    normalize_by_std: divide advantages by the group std (Dr. GRPO: --no-normalize-by-std)
    length_normalization: mean (GRPO) | constant (Dr. GRPO: sum / max_new_tokens)
    beta: dpo: strength of the KL anchor to the reference
    eval_problems: held-out test problems evaluated at the end
    hard_problems: problems of the harder (4-operand) split evaluated at the end
    seed: seed of every batch and rollout (a function of seed and step)
    ckpt_interval: steps between checkpoints
    log_path: JSONL log (default <out_dir>/log.jsonl)
    threads: CPU threads (0: torch's default)
    """
    stage: str = "sft"
    name: str = ""
    init: str = ""
    pretrained: str = ""
    out_dir: str = "runs/align/sft"
    steps: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 32
    micro_batch: int = 64
    group_size: int = 8
    max_new_tokens: int = 40
    temperature: float = 1.0
    sft_examples: int = 256
    loss_type: str = "reinforce_with_baseline"
    epochs_per_batch: int = 1
    minibatches: int = 1
    cliprange: float = 0.2
    normalize_by_std: bool = True
    length_normalization: str = "mean"
    beta: float = 0.1
    eval_problems: int = 500
    hard_problems: int = 200
    seed: int = 0
    ckpt_interval: int = 10
    log_path: str = ""
    threads: int = 0


# The ranges argparse's types cannot express, one row per option (AlignConfig's fields, then eval's and
# bench's), checked before anything is loaded: `--steps 0` fails in milliseconds, not after a model load.
# NaN fails every comparison, so `--lr nan` is refused by the same row as `--lr -1`.
OPTION_RANGES = {"steps": ">= 1", "batch_size": ">= 1", "micro_batch": ">= 1", "group_size": ">= 1",
                 "max_new_tokens": ">= 1", "epochs_per_batch": ">= 1", "minibatches": ">= 1", "ckpt_interval": ">= 1",
                 "sft_examples": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0",
                 "temperature": ">= 0", "cliprange": "> 0", "beta": "> 0", "eval_problems": ">= 0",
                 "hard_problems": ">= 0", "threads": ">= 0", "limit": ">= 0", "prompts": ">= 1", "repeats": ">= 1",
                 "new_tokens": ">= 1", "prompt_lengths": ">= 1", "d_model": ">= 1", "num_layers": ">= 1"}
# GRPO's advantage and DPO's pairs compare the responses WITHIN a group: one response, or G identical greedy
# ones, carry no signal at all.
STAGE_RANGES = {stage: {"group_size": ">= 2", "temperature": "> 0"} for stage in ("grpo", "dpo")}
CHOICES = {"loss_type": POLICY_GRADIENT_LOSSES, "length_normalization": ("mean", "constant")}


def option_error(values: dict, stage: str = "") -> Optional[str]:
    """The first option in `values` ({field: value}; None = not given) outside its range or choices, as
    one line naming the flag; None when all are fine."""
    for k, rule in {**OPTION_RANGES, **STAGE_RANGES.get(stage, {})}.items():
        op, bound = rule.split()
        given = values.get(k)
        for v in given if isinstance(given, list) else [given]:  # --prompt-lengths takes several values
            if v is None or (math.isfinite(v) and (v >= float(bound) if op == ">=" else v > float(bound))):
                continue
            why = f" for {stage} (it compares the responses within a group)" if k in STAGE_RANGES.get(stage, {}) \
                else ""
            return f"--{k.replace('_', '-')} must be {rule}{why}, got {v}"
    for k, allowed in CHOICES.items():
        if values.get(k) not in (None, *allowed):
            return f"--{k.replace('_', '-')} must be one of {list(allowed)}, got {values[k]!r}"
    return None


# ---- the built-in task: multi-step arithmetic with exact answers ----
# "Compute 27 + 8 - 5." -> worked solution "27 + 8 = 35. 35 - 5 = 30." -> answer 30.
# Difficulty = the number of operands: each extra operand is one more step to get right, so a model with
# per-step accuracy p solves an n-operand problem with probability about p^(n-1). Numbers stay small
# (first operand 1..30, the others 1..9, every partial result in 0..59) so a tiny model can learn the
# arithmetic facts in a few CPU minutes. Splits:
#   train  2-3 operands, problems whose hash is NOT in the held-out bucket
#   test   3 operands, problems whose hash IS in the held-out bucket (never seen in any training stage)
#   hard   4 operands (training never shows a problem this long)
TASK_SPLITS = {"train": (2, 3), "test": (3,), "hard": (4,)}
HELD_OUT_BUCKETS = 8  # 1 in 8 problems (by a stable hash of its text) is held out


@dataclass(frozen=True)
class Problem:
    """One problem of a verifiable task (the built-in arithmetic, see the plumbing appendix; GSM8K): what the
    model is asked, the exact answer the verifier checks, the worked solution SFT imitates. Frozen: hashable."""
    question: str  # "Compute 27 + 8 - 5."
    answer: str  # "30"
    solution: str  # "27 + 8 = 35. 35 - 5 = 30."


def task_prompt(p: Problem) -> str:
    """The prompt a policy sees: the short R1-Zero template around the question, ending in "<think>"."""
    return SHORT_R1_PROMPT.format(question=p.question)


def task_response(p: Problem) -> str:
    """The SFT target: the worked solution in the R1-Zero format (end-of-text is appended as an id)."""
    return f" {p.solution} </think> <answer> {p.answer} </answer>"


def make_problem(rng: random.Random, n_operands: int) -> Problem:
    """One problem with `n_operands` operands, its worked solution and exact answer."""
    # The bounds are a choice of difficulty: ~60 x 9 x 2 one-step facts (a +- b with b <= 9) is what a 1M
    # parameter model can learn in minutes, and 30 x 9^2 x 4 ~ 10^4 three-operand problems leave over a
    # thousand held out. Larger operands or more operands make every split harder at once.
    value = rng.randint(1, 30)
    expr, steps = [str(value)], []
    for _ in range(n_operands - 1):
        b, op = rng.randint(1, 9), rng.choice("+-")
        if op == "-" and value - b < 0:
            op = "+"  # keep every partial result >= 0 ...
        elif op == "+" and value + b > 59:
            op = "-"  # ... and <= 59 (value >= 51 here, so value - b >= 42)
        new = value + b if op == "+" else value - b
        steps.append(f"{value} {op} {b} = {new}.")
        expr += [op, str(b)]
        value = new
    return Problem(f"Compute {' '.join(expr)}.", str(value), " ".join(steps))


def is_held_out(question: str) -> bool:
    """Stable across runs and machines (crc32 of the text, not Python's salted hash())."""
    return zlib.crc32(question.encode()) % HELD_OUT_BUCKETS == 0


def task_problems(split: str, n: int, seed: int = 0, unique: bool = True) -> list[Problem]:
    """`n` problems of a split, deterministic in (split, seed). Held-out splits are de-duplicated."""
    if split not in TASK_SPLITS:
        raise ValueError(f"unknown task split {split!r}; choose one of {list(TASK_SPLITS)}")
    rng = random.Random(f"align-task-{split}-{seed}")  # a string seed: stable across Python versions
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"split {split!r} has fewer than {n} distinct problems")
        p = make_problem(rng, rng.choice(TASK_SPLITS[split]))
        if (split == "train") == is_held_out(p.question) and split != "hard":
            continue  # train never sees a held-out problem; test only holds held-out ones
        if unique and p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def pretraining_text(n_bytes: int, seed: int = 0, arithmetic_share: float = 0.6) -> str:
    """Text for the base model: worked arithmetic written as plain prose ("Compute 7 + 5. 7 + 5 = 12. The
    result is 12.") mixed with train.py's synthetic stories, documents separated by end-of-text. It never
    shows the <think>/<answer> format: that is what SFT has to teach."""
    # Why pretrain on the arithmetic at all: SFT and RL only SURFACE and sharpen what the base model can
    # already do; a base model that never saw arithmetic has no skill for 256 examples to surface.
    rng = random.Random(f"align-pretrain-{seed}")
    stories = T.SyntheticCorpus(seed).stories()
    parts, size, prng = [], 0, random.Random(f"align-task-train-{seed + 1}")
    while size < n_bytes:
        if rng.random() < arithmetic_share:
            lines = []
            while len(lines) < 8:
                p = make_problem(prng, prng.choice(TASK_SPLITS["train"]))
                if not is_held_out(p.question):
                    lines.append(f"{p.question} {p.solution} The result is {p.answer}.")
            doc = "\n".join(lines)
        else:
            doc = next(stories)[0]
        parts.append(doc + EOT)
        size += len(doc) + len(EOT)
    return "".join(parts)


# ---- what a step function gets, and what it returns ----
@dataclass
class StageContext:
    """What a step function needs: the config, the policy and its optimizer, the tokenizer, the data."""
    cfg: AlignConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    tokenizer: object
    pad_id: int
    train_pool: list  # training problems to draw rollout prompts from
    sft_pool: list  # (prompt_ids, response_ids) worked solutions (sft only)
    reference: Optional[torch.nn.Module] = None  # the frozen starting model (dpo only)
    reward_fn: Callable = r1_zero_reward_fn  # (response, ground_truth) -> {"reward", ...}
    prompt_fn: Callable = task_prompt  # Problem -> prompt text
    require_eot: bool = True  # a rollout that never emitted end-of-text scores 0 (see rollout_batch)


def _rl_row(rb: dict, t0: float, **stats) -> dict:
    """A feedback step's metrics: the batch's rewards, the update's numbers, and where the time went
    (rollout = sampling, score = the verifier, update = the gradient steps since t0)."""
    return {**rb["meta"], **stats, "rollout_s": rb["rollout_s"], "score_s": rb["score_s"],
            "update_s": time.time() - t0, "mean_length": rb["mean_length"]}


# ---- running one stage: lock, load, resume, the step loop, the final evaluation ----
def run_stage(cfg: AlignConfig, log: Callable = print) -> dict:
    """Run one stage from cfg.init to <out_dir>/ckpt.pt, resuming from that file if a run was killed.

    Every `ckpt_interval` steps the policy, optimizer and step are saved atomically; rollouts and batches
    are functions of (seed, step), so a resumed run continues exactly. The end: evaluation on the held-out
    test split and the harder split, logged and returned."""
    if cfg.stage not in STEP_FUNCTIONS:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {list(STEP_FUNCTIONS)}")
    problem = option_error(dataclasses.asdict(cfg), cfg.stage)
    if problem:
        raise ValueError(problem)
    # Everything that can fail cheaply is checked before any work: the folder is writable, the checkpoint
    # loads and fits its tokenizer, a checkpoint already in the folder belongs to this very run.
    if cfg.threads or torch.get_num_threads() > 1:
        T.set_cpu_threads(cfg.threads)
    out = T.check_out_dir(cfg.out_dir)
    # one process per run folder: a second one would resume the same checkpoint and interleave the two logs
    with run_lock(out):
        ckpt_path, log_path = out / "ckpt.pt", Path(cfg.log_path or out / "log.jsonl")
        model, tokenizer, init_info = load_policy(cfg.init, pretrained=cfg.pretrained)
        # rollout prompts come from the train split only; every evaluation uses the held-out splits
        train_pool = task_problems("train", 4096, seed=cfg.seed + 11)
        # SFT targets end with the end-of-text id: the model must learn WHERE to stop as well as what to say
        sft_pool = [(_encode(tokenizer, task_prompt(p)), _encode(tokenizer, task_response(p)) + [tokenizer.eot_id])
                    for p in train_pool[:cfg.sft_examples]] if cfg.stage == "sft" else []
        check_context(cfg, model.config.context_length, tokenizer, train_pool, sft_pool)
        # AdamW without weight decay: fine-tuning should stay near the pretrained weights, and decay would pull
        # them toward zero, not toward where they started. A fresh optimizer state per stage (Adam's moments
        # describe the previous objective's gradients, not this one's).
        opt = T.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        step = resume_stage(ckpt_path, cfg, model, opt, init_info, log)
        trim_log(log_path, cfg.name or cfg.stage, step)
        # DPO's reference is a second copy of the STARTING weights (not of the resumed ones): the implied reward
        # beta * log(pi / pi_ref) must always be measured against the same anchor.
        reference = None
        if cfg.stage == "dpo":  # the starting policy, frozen
            reference = load_policy(cfg.init, pretrained=cfg.pretrained)[0].requires_grad_(False)
        ctx = StageContext(cfg, model, opt, tokenizer, pad_id_of(tokenizer), train_pool, sft_pool, reference)
        save = lambda s: save_stage_checkpoint(ckpt_path, model, opt, s, cfg, tokenizer, init_info)  # noqa: E731
        model.train()
        # The loop: one step, one log line (JSONL, appended at once), a checkpoint every ckpt_interval steps.
        while step < cfg.steps:
            t0 = time.time()
            row = STEP_FUNCTIONS[cfg.stage](ctx, step)
            step += 1
            row = {"kind": "train", "stage": cfg.name or cfg.stage, "step": step, "seconds": time.time() - t0, **row}
            if not math.isfinite(row.get("loss", 0.0)) and cfg.stage == "sft":
                raise FloatingPointError(f"{cfg.stage} loss is {row['loss']} at step {step}; the last checkpoint "
                                         f"{ckpt_path} is intact (try a lower --lr)")
            append_log(log_path, row)  # the log first: a kill right after a step still leaves its numbers
            log(format_step(row))
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                save(step)
        # A zero-step run still leaves a valid --init for the next stage. A run that was already complete
        # (re-run after it finished) skips the loop entirely and only re-evaluates.
        if step == 0 or not ckpt_path.exists():
            save(step)
        return evaluate_stage(model, tokenizer, cfg, log_path, log)


def check_context(cfg: AlignConfig, context: int, tokenizer, train_pool: list, sft_pool: list) -> None:
    """A model whose context cannot hold what this stage feeds it would fail deep inside a forward pass (or,
    worse, after the training, in the final evaluation): say so before any work, with the numbers."""
    longest = lambda probs: max(len(_encode(tokenizer, task_prompt(p))) for p in probs)  # noqa: E731
    needs = {}  # what must fit -> tokens
    if sft_pool:
        needs["the longest prompt + worked solution"] = max(len(p) + len(o) for p, o in sft_pool)
    else:
        needs[f"the longest training prompt + --max-new-tokens {cfg.max_new_tokens}"] = \
            longest(train_pool) + cfg.max_new_tokens
    for split, n in (("test", cfg.eval_problems), ("hard", cfg.hard_problems)):
        if n > 0:  # evaluate_stage decodes max_new_tokens + 8
            needs[f"the longest {split} prompt + {cfg.max_new_tokens + 8} new tokens (evaluation)"] = \
                longest(task_problems(split, n, seed=1000)) + cfg.max_new_tokens + 8
    what, need = max(needs.items(), key=lambda kv: kv[1])
    if need > context:
        raise ValueError(f"the model's context of {context} tokens is too short for {cfg.stage}: {what} is "
                         f"{need} tokens; use a model with a longer context, or a lower --max-new-tokens")


def evaluate_stage(model, tokenizer, cfg: AlignConfig, log_path: Path, log: Callable = print) -> dict:
    """Held-out accuracy (test split, and the harder split) of `model`, printed and logged."""
    # seed=1000: the same held-out problems for every stage and every run, so accuracies compare directly
    result = {}
    for split, n in (("test", cfg.eval_problems), ("hard", cfg.hard_problems)):
        if n <= 0:
            continue
        r = evaluate_task(model, tokenizer, task_problems(split, n, seed=1000), cfg.max_new_tokens + 8)
        append_log(log_path, {"kind": "eval", "stage": cfg.name or cfg.stage, "split": split, "step": cfg.steps,
                              **{k: v for k, v in r.items() if k != "examples"}})
        log(format_eval(f"[{cfg.name or cfg.stage}] held-out {split}", r))
        result[split] = r
    if "test" in result:
        for e in result["test"]["examples"]:
            log(f"    e.g. {e}")
    return result


# ---- checkpoints: load a policy, save and resume a stage ----
def find_tokenizer(ckpt_path: Path, ckpt: dict):
    """The tokenizer saved next to a checkpoint (train.py's run folder layout, found by model.py's
    find_tokenizer_dir), checked against the fingerprint the checkpoint recorded: a tokenizer from another
    corpus would silently garble every id."""
    folder = M.find_tokenizer_dir(ckpt_path, ckpt)
    if folder is None:
        raise FileNotFoundError(f"no tokenizer for {ckpt_path} (looked in {ckpt_path.parent / 'tokenizer'} and "
                                f"{ckpt.get('tokenizer_dir')!r})")
    tok = tk.Tokenizer.load(folder)
    M.check_tokenizer_matches(ckpt, tok, ckpt_path)
    return tok


def load_policy(path: str, device: str = "cpu", pretrained: str = ""):
    """(model, tokenizer, info) from a train.py or align.py checkpoint, with clear errors for a missing or
    foreign file, weights that do not fit their config, or a tokenizer whose vocabulary does not fit.
    pretrained="gpt2" (or a folder of Hugging Face safetensors) loads GPT-2 through model.from_pretrained
    with GPT-2's tokenizer instead: the same stages then fine-tune and evaluate a real pretrained model."""
    if pretrained:  # GPT-2's 1,024-token context holds any prompt here; its tokenizer is tiktoken's gpt2
        model, tok = M.from_pretrained(pretrained, device=device).train(), tk.gpt2_tokenizer()
        where = f"pretrained:{pretrained}"
    elif not path:
        raise ValueError("no checkpoint given (--init CKPT)")
    else:
        # the architecture comes from the checkpoint itself (train.py stores model_config), so any shape loads;
        # model.py names the file in every error (missing, corrupt, no config, weights that do not fit it)
        model, ckpt = M.load_checkpoint_model(path, device)
        tok, where = find_tokenizer(Path(path), ckpt), str(Path(path).resolve())
        if tok.vocab_size != model.config.vocab_size:
            raise ValueError(f"checkpoint {path}: the model has a vocabulary of {model.config.vocab_size} but its "
                             f"tokenizer has {tok.vocab_size}")
        if tok.eot_id is None:
            raise ValueError(f"the tokenizer of {path} has no {EOT} token (responses need an end)")
    info = {"path": where, "model_config": model.config.to_dict(), "tokenizer_fingerprint": tok.fingerprint()}
    return model, tok, info


def save_stage_checkpoint(path: Path, model, opt, step: int, cfg: AlignConfig, tokenizer, init_info: dict):
    """train.py's checkpoint (atomic: a kill mid-write leaves the previous one intact) plus the stage's settings
    and starting point; the tokenizer goes next to it, so the file is a valid --init for later stages."""
    tok_dir = path.parent / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        tokenizer.save(str(tok_dir))
    # A diverged step (NaN/inf weights) must never overwrite the last good checkpoint: refuse and say so.
    n_bad = sum(not bool(torch.isfinite(p).all()) for p in model.parameters())
    if n_bad:
        raise FloatingPointError(f"non-finite weights at step {step}: not saved; {path} (if any) is intact "
                                 "(try a lower --lr)")
    # weights_only-safe contents: tensors, dicts, lists, strings and numbers (train.read_checkpoint loads
    # with weights_only=True, so a checkpoint can never run code)
    T.save_checkpoint(model, opt, step, path, model_config=model.config.to_dict(), init=init_info,
                      align_config=dataclasses.asdict(cfg), tokenizer_fingerprint=tokenizer.fingerprint(),
                      tokenizer_dir=str(tok_dir.resolve()))


# What may change between a killed run and its resumption: how long it runs (--steps, to extend a finished
# run), how it is named, logged, checkpointed and evaluated, where it starts from (compared by the resolved
# path), and how rows are split into micro-batches (memory, not the mathematics). Anything else would mix two runs.
RESUME_MAY_CHANGE = ("steps", "name", "init", "pretrained", "out_dir", "log_path", "ckpt_interval", "threads",
                     "eval_problems", "hard_problems", "micro_batch")


def resume_stage(path: Path, cfg: AlignConfig, model, opt, init_info: dict, log: Callable) -> int:
    """Continue a killed run from `path` if it holds the same stage from the same --init; returns its step.
    A checkpoint of another run in the same folder is an error (never silently overwritten)."""
    if not path.exists():
        return 0
    ckpt = T.read_checkpoint(path)
    # "the same run" = the same stage from the same starting weights (compared here), with the same
    # settings (compared below, except RESUME_MAY_CHANGE)
    old = ckpt.get("align_config", {})
    # configs compared after a round trip through ModelConfig, so a checkpoint written before a new (default-off)
    # switch existed still matches: its missing field takes the default the current code would use
    saved_cfg = M.ModelConfig.from_dict(ckpt.get("model_config") or {}).to_dict() if ckpt.get("model_config") else None
    if old.get("stage") != cfg.stage or ckpt.get("init", {}).get("path") != init_info["path"] \
            or saved_cfg != M.ModelConfig.from_dict(init_info["model_config"]).to_dict():
        raise ValueError(f"{path} holds another run (stage {old.get('stage')!r} from "
                         f"{ckpt.get('init', {}).get('path')!r}); choose another --out-dir or delete it")
    # a field missing from an older checkpoint did not exist yet: that run had the field's default
    differ = [f"--{f.name.replace('_', '-')} {old.get(f.name, f.default)!r} -> {getattr(cfg, f.name)!r}"
              for f in dataclasses.fields(AlignConfig)
              if f.name not in RESUME_MAY_CHANGE and old.get(f.name, f.default) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(f"{path} was trained with other settings ({'; '.join(differ)}): resuming would mix two "
                         "runs; give the same settings, or choose another --out-dir")
    M.load_model_state(model, ckpt["model"])  # strict: every key and shape must fit
    T.load_optimizer_state(opt, ckpt, path)  # Adam's moments, so the resumed steps are the ones it would take
    if "rng" in ckpt:
        T.set_rng_state(ckpt["rng"])
    step = int(ckpt["iteration"])
    log(f"[{cfg.name or cfg.stage}] resumed from {path} at step {step}")
    return step


# ---- one run per folder, and its JSONL log ----
@contextlib.contextmanager
def run_lock(folder: Path):
    """One run per folder at a time: two processes resuming the same checkpoint would interleave their logs
    and overwrite each other's checkpoints. The lock file holds the owner's pid; a lock left by a process
    that no longer exists (killed with -9) is taken over."""
    lock = folder / ".lock"
    # O_CREAT | O_EXCL is the atomic "create only if absent": of two processes racing here exactly one wins.
    # Two tries: the second follows the removal of a stale lock (whose owner was killed without cleaning up).
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                if pid <= 0:
                    raise ValueError("no pid in the lock file")
                os.kill(pid, 0)  # signal 0: only asks whether the process exists
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            except PermissionError:
                pass  # it exists (owned by another user)
            raise RuntimeError(f"{folder} is in use by another run (pid {pid}); wait for it or use another "
                               "--out-dir") from None
    else:
        raise RuntimeError(f"could not lock {folder}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:  # released on success, on any error and on Ctrl-C; only kill -9 leaves it (and it is then stale)
        lock.unlink(missing_ok=True)


def append_log(path: Path, row: dict) -> None:
    """One JSON object per line; appended and flushed at once, so a kill loses at most the line in flight."""
    # (appending is not atomic, but a torn last line is the only possible damage, and readers skip it)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def trim_log(path: Path, stage: str, step: int) -> None:
    """On (re)start at `step`, drop this stage's rows after it, so a resumed run's log reads as one run."""
    if not path.exists():
        return
    # Rows of OTHER stages are kept whatever their step; of this stage only training rows up to the resumed
    # step survive (its evaluation rows are re-made at the end); a line torn by a kill goes. Rewritten
    # atomically: a kill here leaves the old log, never half of it.
    rows = read_jsonl(path, log=lambda _: None)
    keep = [r for r in rows if r.get("stage") != stage or (r.get("kind") == "train" and r.get("step", 0) <= step)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path, required: tuple = (), log: Callable = None, check: Callable = None) -> list[dict]:
    """Rows of a JSONL file. A malformed line (not JSON, not an object, missing a required key, or failing
    `check(row)`) is skipped; the skipped line numbers are reported once, so one bad line never loses a
    whole data set -- and a silently shrinking data set never goes unnoticed."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None  # torn by a kill, or not JSON at all
            if not isinstance(r, dict) or any(k not in r for k in required) or (check and not check(r)):
                bad.append(i)
            else:
                rows.append(r)
    if bad:
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"{path}: skipped {len(bad)} malformed line(s): {', '.join(map(str, bad[:20]))}"
            + (" ..." if len(bad) > 20 else ""))
    return rows


# ---- The demo preset: pretrain -> SFT -> expert iteration | GRPO on-policy | GRPO off-policy | DPO ----------
# Expert iteration, the two GRPO variants and DPO all start from the SAME SFT checkpoint with the same
# budget (rollout batches x prompts x group size), so their held-out accuracies compare directly.
# The base model: train.py's demo architecture (0.9M parameters, 4 layers of width 128, a 512-token BPE
# vocabulary trained on the corpus below), 600 steps of 2,048 tokens; capped at 8 minutes on a slow machine.
DEMO_PRETRAIN = dict(vocab_size=512, context_length=128, d_model=128, num_layers=4, num_heads=4, batch_size=16,
                     max_steps=600, max_minutes=8.0, warmup_iters=50)
# SFT on purpose SHORT: 45 steps over 256 worked solutions teach the format and part of the skill (measured:
# 4-68% held-out accuracy across runs, see the README), leaving the feedback methods something to improve. Run to convergence (80 steps,
# 1,024 examples) SFT alone reaches ~94% on the test split -- and 3% on the 4-operand split.
DEMO_SFT = dict(steps=45, lr=1e-3, batch_size=32, sft_examples=256)
# Feedback methods: 40 rollout batches of 16 prompts x 8 samples (5,120 rollouts) each, temperature 1.
DEMO_RL = dict(steps=40, batch_size=16, group_size=8, temperature=1.0, max_new_tokens=40)
# One learning rate for all four (AdamW's step size is the per-step change of every weight, whatever the
# loss's scale). Measured: expert iteration at SFT's 1e-3 collapsed held-out accuracy from 56% to 3% within
# 40 steps of ~10 kept samples each (Adam's first steps move every weight by ~lr, and tiny batches make that
# noise); at 3e-4 see the README.
DEMO_METHODS = {  # name -> (stage, options on top of DEMO_RL)
    "ei": ("ei", dict(lr=3e-4)),
    "grpo": ("grpo", dict(lr=3e-4, loss_type="reinforce_with_baseline")),
    "grpo_off": ("grpo", dict(lr=3e-4, loss_type="grpo_clip", epochs_per_batch=2, minibatches=2, cliprange=0.2)),
    "dpo": ("dpo", dict(lr=3e-4, beta=0.1)),
}


def pretrain_base(out: Path, seed: int = 0, steps: Optional[int] = None, log: Callable = print) -> Path:
    """The base model, with train.py's own loop (resumable; skipped when already done). Returns ckpt path."""
    # done.json marks a finished base model; until then train.py's own resume continues a killed run
    done = T.check_out_dir(out / "base") / "done.json"
    if done.exists():
        return out / "base" / "ckpt.pt"
    corpus = out / "pretrain.txt"
    if not corpus.exists():
        atomic_write_text(corpus, pretraining_text(2_500_000, seed))
    kw = dict(DEMO_PRETRAIN, max_steps=steps or DEMO_PRETRAIN["max_steps"])
    cfg = T.TrainConfig(preset="align-base", data=str(corpus), data_dir=str(out / "data_cache"), val_fraction=0.05,
                        bpe_train_bytes=1_000_000, budget_includes_prep=False, eval_interval=10 ** 9,
                        ckpt_interval=200, final_eval_tokens=65_536, out_dir=str(out / "base"), resume=True,
                        num_samples=0, plot=False, seed=seed + 1337, log_interval=100, **kw)
    # eval_interval huge: no periodic validation (the task accuracy is the measure here); the final val
    # loss and bits per byte still come out of train.train and are kept in done.json
    summary = T.train(cfg, log=log)
    atomic_write_json(done, {"steps": summary["steps"], "val": summary["val"],
                             "minutes": summary["train_seconds"] / 60})
    return out / "base" / "ckpt.pt"


def check_demo_settings(out: Path, settings: dict) -> None:
    """A demo folder holds the results of ONE setting: rerun with the same settings, it reuses what finished;
    with others, it is refused (naming them) instead of printing the earlier run's table as this one's.
    The settings are recorded in demo.json; a folder from before that file has its seed in the base model."""
    old, base = {}, out / "base" / "ckpt.pt"
    if (out / "demo.json").exists():
        old = json.loads((out / "demo.json").read_text())
    elif base.exists():  # pretrain_base trains with seed + 1337
        old = {"seed": T.read_checkpoint(base).get("config", {}).get("seed", 1337) - 1337}
    differ = [f"{k} {old[k]!r} (this run: {v!r})" for k, v in settings.items() if k in old and old[k] != v]
    if differ:
        raise ValueError(f"{out} holds a demo made with {', '.join(differ)}; choose another --out-dir (or delete "
                         "it) to run with these settings")
    atomic_write_json(out / "demo.json", settings)


def run_demo(out_dir: str = "runs/align", seed: int = 0, scale: float = 1.0, log: Callable = print) -> dict:
    """The whole chapter in one command. `scale` shrinks every stage (tests use a tiny one). Each finished
    stage leaves result.json, so a re-run after a kill skips it and resumes the interrupted one."""
    out = T.check_out_dir(out_dir)
    check_demo_settings(out, {"seed": seed, "scale": scale})
    # one JSONL log for the whole demo: "train" rows (one per step, per stage) and "eval" rows (per stage)
    t0, log_path, results = time.time(), out / "align_log.jsonl", {}
    n = lambda k: max(1, int(round(k * scale)))  # noqa: E731
    base = pretrain_base(out, seed, n(DEMO_PRETRAIN["max_steps"]), log)
    # the base model in the R1 format: it has never seen <think>/<answer>, so it scores ~0 -- the baseline
    model, tokenizer, _ = load_policy(str(base))
    log("\n== base model (completes text; never saw the answer format) ==")
    base_cfg = AlignConfig(stage="base", eval_problems=n(500), hard_problems=n(200))
    results["base"] = cached(out / "base" / "eval.json", lambda: evaluate_stage(model, tokenizer, base_cfg, log_path,
                                                                                 log), log)
    # the same seed, log and evaluation sizes for every stage; each stage writes its own folder under out_dir,
    # and its result.json there makes a re-run skip it
    common = dict(seed=seed, log_path=str(log_path), eval_problems=n(500), hard_problems=n(200))

    def stage(name: str, title: str, kw: dict) -> None:
        log(f"\n== {title} ==")
        cfg = AlignConfig(name=name, out_dir=str(out / name), **common, **kw)
        results[name] = cached(out / name / "result.json", lambda: run_stage(cfg, log), log, name)
    sized = {"steps": n(DEMO_SFT["steps"]), "sft_examples": n(DEMO_SFT["sft_examples"])}
    stage("sft", "SFT on worked solutions", {**DEMO_SFT, **sized, "stage": "sft", "init": str(base)})
    for name, (kind, kw) in DEMO_METHODS.items():
        stage(name, f"{name}: from the SFT checkpoint, {n(DEMO_RL['steps'])} rollout batches of "
              f"{DEMO_RL['batch_size']} prompts x {DEMO_RL['group_size']}",
              {**DEMO_RL, **kw, "stage": kind, "init": str(out / "sft" / "ckpt.pt"), "steps": n(DEMO_RL["steps"])})
    # The verdict for each method against its common starting point: a difference counts only when the two
    # 95% intervals do not overlap (a conservative test: overlapping intervals can still differ).
    log("\n== summary: held-out accuracy (95% interval) ==")
    for name, r in results.items():
        log(format_eval(f"{name:>9s} test", r["test"]))
    start = results["sft"]["test"]
    for name in DEMO_METHODS:
        r = results[name]["test"]
        verdict = "outside" if (r["ci_low"] > start["ci_high"] or r["ci_high"] < start["ci_low"]) else "inside"
        log(f"{name:>9s}: {100 * (r['accuracy'] - start['accuracy']):+.1f} points vs SFT (intervals {verdict} "
            f"each other)")
    try:
        plot_demo(log_path, out / "align.png")
        log(f"plot: {out / 'align.png'}")
    except Exception as e:  # a plotting problem must never lose a finished run
        log(f"(plot skipped: {e})")
    log(f"log: {log_path}; total {(time.time() - t0) / 60:.1f} min")
    return results


def format_step(row: dict) -> str:
    """One progress line per step; RL stages show where the time went (rollout / scoring / update)."""
    s = f"[{row['stage']}] step {row['step']:4d} | loss {row.get('loss', float('nan')):8.4f}"
    if "reward_mean" in row:
        s += f" | reward {row['reward_mean']:.3f} | format {row['format_reward_mean']:.2f}"
        s += f" | len {row['mean_length']:.1f}"
    for k, label in (("clip_fraction", "clip"), ("kept", "kept"), ("pairs", "pairs"), ("pref_accuracy", "pref acc")):
        if k in row:
            s += f" | {label} {row[k]:.3g}"
    if "rollout_s" in row:
        s += f" | rollout {row['rollout_s']:.2f}s score {row['score_s']:.2f}s update {row['update_s']:.2f}s"
    else:
        s += f" | {row['seconds']:.2f}s"
    return s


def format_eval(name: str, r: dict) -> str:
    """One line per evaluation: accuracy [interval] on n | format rate | length | entropy | throughput."""
    return (f"{name}: accuracy {100 * r['accuracy']:.1f}% [95% CI {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}] "
            f"on {r['n']} | format {100 * r['format_rate']:.1f}% | length {r['mean_length']:.1f} tok | "
            f"entropy {r['entropy']:.3f} nats | {r['tokens_per_s']:.0f} tok/s")


def cached(done: Path, compute: Callable[[], dict], log: Callable, label: str = "") -> dict:
    """compute(), remembered in the JSON file `done` (a stage's result.json, the base model's eval.json): a demo
    re-run after a kill skips what already finished and resumes the interrupted stage."""
    if done.exists():
        if label:
            log(f"({label}: already done, {done})")
        return json.loads(done.read_text())
    res = compute()
    atomic_write_json(done, res)
    return res


def plot_demo(log_path: Path, png: Path) -> None:
    """Left: held-out accuracy by stage with 95% intervals. Right: training reward by step for each method."""
    from matplotlib.figure import Figure  # a Figure without pyplot: no display, no global figure to close
    rows = read_jsonl(log_path)
    # the last test-split evaluation of each stage (a re-run stage replaces its earlier row)
    evals = {r["stage"]: r for r in rows if r["kind"] == "eval" and r.get("split") == "test"}
    fig = Figure(figsize=(12, 4.5))
    a, b = fig.subplots(1, 2)
    names = list(evals)
    acc = [100 * evals[k]["accuracy"] for k in names]
    err = [[100 * (evals[k]["accuracy"] - evals[k]["ci_low"]) for k in names],
           [100 * (evals[k]["ci_high"] - evals[k]["accuracy"]) for k in names]]
    # error bars are asymmetric: the Wilson interval is not centred on the observed accuracy
    a.bar(names, acc, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    a.set_ylabel("held-out accuracy (%)")
    a.set_title("accuracy by stage (95% Wilson interval)")
    for stage in dict.fromkeys(r["stage"] for r in rows if r["kind"] == "train" and "reward_mean" in r):
        pts = [(r["step"], r["reward_mean"]) for r in rows if r["kind"] == "train" and r["stage"] == stage]
        b.plot([p[0] for p in pts], [p[1] for p in pts], label=stage, alpha=0.8)
    b.set_xlabel("rollout batch")
    b.set_ylabel("mean reward of the batch's rollouts")
    b.set_title("training reward by step")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(png, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


# ===== Appendix: benchmarks =====

def bench(args) -> list[str]:
    """Rollout throughput, side by side and interleaved: KV cache with one shared prefill per group (ours),
    KV cache with every row prefilled (model.generate), and no cache (recompute every step). A randomly
    initialized demo-sized model; no end-of-text stop, so every row decodes the full budget."""
    # Weights do not change the cost of a forward pass, so a random model measures the same throughput as a
    # trained one; eos_id=None makes every row run the whole budget (no early stop to blur the comparison).
    torch.manual_seed(0)
    T.set_cpu_threads(args.threads)
    cfg = M.ModelConfig(vocab_size=512, context_length=256, d_model=args.d_model, num_layers=args.num_layers,
                        num_heads=4)
    model = M.TransformerLM.from_config(cfg).eval()
    rows, machine = [], machine_label()
    print(f"machine: {machine}; model d_model {args.d_model}, {args.num_layers} layers")
    # Two prompt lengths: a short prompt (the demo's ~16 tokens), where decoding dominates and sharing the
    # prefill changes little, and a long one, where the prefill dominates and sharing saves (G-1)/G of it.
    for plen in args.prompt_lengths:
        prompts = [torch.randint(0, 512, (plen,)).tolist() for _ in range(args.prompts)]
        n_tok = args.prompts * args.group_size * args.new_tokens
        runs = {"shared": dict(), "per_row": dict(share_prefill=False), "recompute": dict(use_cache=False)}
        best = {k: float("inf") for k in runs}
        for _ in range(args.repeats):  # interleaved: load on a shared machine hits all three alike
            for k, kw in runs.items():
                t0 = time.perf_counter()
                sample_rollouts(model, prompts, args.group_size, args.new_tokens, 1.0, None,
                                torch.Generator().manual_seed(0), **kw)
                best[k] = min(best[k], time.perf_counter() - t0)
        # tokens/s = generated tokens (P x G x new) / best wall time; the prefill counts as cost, not output
        tps = {k: n_tok / v for k, v in best.items()}
        print(f"prompt {plen} tokens, {args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens: "
              + " | ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items()), flush=True)
        shape = f"{args.prompts} prompts x {args.group_size}, prompt {plen}, {args.new_tokens} new"
        for peer, what in (("recompute", "rollouts, KV cache vs recompute"),
                           ("per_row", "shared group prefill vs per-row prefill")):
            rows.append(f"| align | {what} ({shape}) | `python align.py bench` | {tps['shared']:,.0f} tok/s | "
                        f"{tps[peer]:,.0f} tok/s | {tps['shared'] / tps[peer]:.2f}x |")
    print("\n".join(rows))
    return rows


# ===== Command line =====
def build_parser() -> tk.OneLineParser:
    """No command: the demo. sft/ei/grpo/dpo: every AlignConfig field as a flag, derived from the dataclass
    (name, type, default, the help line of its docstring). eval and bench have their own few options."""
    p = tk.OneLineParser(prog="align.py", description="Stage 8: SFT, expert iteration, GRPO, DPO and "
                         "evaluation. No command: the whole demo (pretrain -> SFT -> EI | GRPO | DPO).")
    p.add_argument("--out-dir", default="runs/align", help="demo run folder (default runs/align)")
    p.add_argument("--seed", type=int, default=0, help="demo seed (default 0)")
    sub = p.add_subparsers(dest="command")
    fields = dataclasses.fields(AlignConfig)
    # fields whose default means "not given" ("") say in their help what happens then; the others show theirs
    quiet = [f.name for f in fields if f.default == ""] + ["out_dir"]
    for stage in STEP_FUNCTIONS:  # one sub-command per stage, all with the same flags
        sp = sub.add_parser(stage, help=f"run the {stage} stage from a checkpoint (resumes if --out-dir has one)")
        sp.add_config(AlignConfig, skip=[f.name for f in fields if f.name not in quiet] + ["name", "log_path"],
                      defaults={"out_dir": ""})
        sp.add_config(AlignConfig, skip=["stage", "name", "log_path", *quiet], note=" (default: {default})")
    ev = sub.add_parser("eval", help="evaluate a checkpoint on the built-in task, GSM8K or MMLU")
    ev.add_argument("--checkpoint", default="", help="checkpoint (train.py or align.py)")
    ev.add_argument("--pretrained", default="", help="instead of --checkpoint: gpt2 (downloaded once, cached) or "
                    "a folder with Hugging Face model.safetensors + config.json")
    ev.add_argument("--task", choices=("builtin", "gsm8k", "mmlu"), default="builtin", help="(default builtin)")
    ev.add_argument("--data", default=None, help="gsm8k: a JSONL file; mmlu: the folder of CSVs "
                    "(default: download once into --cache-dir)")
    ev.add_argument("--cache-dir", default="data_cache", help="where downloads are cached (default data_cache)")
    ev.add_argument("--split", default=None, help="builtin: test|hard|train; gsm8k: test|train; "
                    "mmlu: test|val|dev (default test)")
    ev.add_argument("--limit", type=int, default=500, help="number of problems (0: all; default 500)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: builtin 48, gsm8k 256, mmlu 8")
    ev.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default 32)")
    b = sub.add_parser("bench", help="rollout throughput: KV cache vs recompute, shared vs per-row prefill",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--prompts", type=int, default=16, help="distinct prompts per rollout batch")
    b.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    b.add_argument("--new-tokens", type=int, default=40, help="tokens decoded per row")
    b.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 128], help="prompt lengths to measure")
    b.add_argument("--d-model", type=int, default=128, help="width of the random model")
    b.add_argument("--num-layers", type=int, default=4, help="depth of the random model")
    b.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the best time counts)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    return p


def cmd_eval(args) -> dict:
    """`python align.py eval`: one checkpoint (or GPT-2), one task, accuracy with its interval, throughput."""
    model, tokenizer, _ = load_policy(args.checkpoint, pretrained=args.pretrained)
    model.eval()
    limit = args.limit or None
    if args.task == "builtin":
        r = evaluate_task(model, tokenizer, task_problems(args.split or "test", limit or 500, seed=1000),
                          args.max_new_tokens or 48, args.batch_size)
        print(format_eval(f"builtin {args.split or 'test'}", r))
    elif args.task == "gsm8k":
        data = load_gsm8k(args.data, args.split or "test", str(Path(args.cache_dir) / "gsm8k"))[:limit]
        r = evaluate_gsm8k(model, tokenizer, data, args.max_new_tokens or 256, args.batch_size)
        print(format_eval("gsm8k (last number)", r))
    else:
        data = load_mmlu(args.data, args.split or "test", str(Path(args.cache_dir) / "mmlu"))
        # a fixed random subset across all 57 subjects (the files are sorted by subject; a prefix would
        # evaluate only abstract algebra and anatomy)
        data = random.Random(0).sample(data, min(limit or len(data), len(data)))
        r = evaluate_mmlu(model, tokenizer, data, args.batch_size, args.max_new_tokens or 8)
        for k in ("letter", "loglik"):
            print(f"mmlu ({k}): accuracy {100 * r[k]['accuracy']:.1f}% [95% CI {100 * r[k]['ci_low']:.1f}-"
                  f"{100 * r[k]['ci_high']:.1f}] on {r['n']} questions")
        print(f"throughput: {r['questions_per_s']:.1f} questions/s")
    return r


def main(argv: Optional[list] = None) -> None:
    """Usage errors: one line, exit 2, before anything is loaded. Errors in the inputs (a missing or foreign
    checkpoint, a bad data file, a failed download): one line `align.py: error: ...`, exit 1. A traceback
    means a bug in align.py."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = option_error(vars(args), args.command or "")
    if problem:
        parser.error(problem)
    source = "checkpoint" if args.command == "eval" else "init" if args.command in STEP_FUNCTIONS else None
    if source and bool(getattr(args, source)) == bool(args.pretrained):
        parser.error(f"give exactly one of --{source} CKPT and --pretrained gpt2|PATH")
    # Expected failures become one line; anything else (a bug) keeps its traceback.
    try:
        if args.command is None:
            run_demo(args.out_dir, args.seed)
        elif args.command == "bench":
            bench(args)
        elif args.command == "eval":
            cmd_eval(args)
        else:
            kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(AlignConfig) if hasattr(args, f.name)}
            kw["out_dir"] = kw["out_dir"] or str(Path("runs/align") / args.command)  # runs/align/<stage>
            run_stage(AlignConfig(**kw, stage=args.command))
    except (ValueError, FileNotFoundError, ConnectionError, PermissionError, FloatingPointError, RuntimeError) as e:
        print(f"align.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint is complete (atomic writes), say how to go on
        print("align.py: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
