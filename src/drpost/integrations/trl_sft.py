"""Dr. Post-Training inside TRL's ``SFTTrainer``.

    from drpost.integrations import DrPostSFTConfig, DrPostSFTTrainer

    args = DrPostSFTConfig(output_dir="out", feasible_set="layerwise", frac=0.5, target_batch_size=4,
                           per_device_train_batch_size=16, max_steps=200, assistant_only_loss=True)
    trainer = DrPostSFTTrainer(model="...", args=args, train_dataset=general, target_dataset=target,
                               processing_class=tokenizer, peft_config=LoraConfig(...))
    trainer.train()

Moving an ``SFTTrainer`` script to drpost is the two class renames plus ``target_dataset=``. Both
datasets may be in any format SFTTrainer accepts (``messages``, ``prompt``/``completion``, ``text``;
raw or already tokenised) and both go through SFTTrainer's own preparation with the run's
``processing_class`` and arguments: chat template, ``assistant_only_loss`` / ``completion_only_loss``
labels, ``max_length`` truncation, ``padding_free`` collation, ``peft_config``. The general data may
also be packed (``packing=True``); the target data is never packed (each target row is one example:
the :class:`~drpost.integrations.TargetSampler` draws rows).

The step is :class:`~drpost.integrations.hf.DrPostTrainerMixin`'s, the same code as
:class:`~drpost.integrations.DrPostTrainer`: each micro-batch goes through
``DataRegularizer.backward(general, target, finalize=...)`` instead of SFTTrainer's ``compute_loss`` +
``accelerator.backward``; clipping, optimizer, scheduler, logging cadence, evaluation (SFTTrainer's
own ``compute_loss``, with its entropy and token-accuracy metrics) and checkpoints are the stock
ones. What differs from a stock SFTTrainer run:

* **The loss.** drpost's per-sample loss is the token sum of the next-token cross-entropy over the
  supervised tokens, normalised by the chosen samples' tokens (METHOD §1.6): SFTTrainer's ``nll``
  loss. ``loss_type='dft'``, label smoothing, a ``compute_loss_func`` and the MoE router auxiliary
  loss change that objective and are refused at construction.
* **Training logs.** ``loss`` is the step's token-mean general loss as in SFTTrainer, ``num_tokens``
  is counted as SFTTrainer counts it, and the drpost keys (``general_loss``, ``target_loss``,
  ``selected_*``, ``skipped_steps``) are added; ``entropy`` and ``mean_token_accuracy`` need the
  logits of the general batch, which drpost's backward does not return, so they are logged for
  evaluation only.
* **Target rows** are prepared without SFTTrainer's silent drop of rows left without supervised
  tokens by truncation (a target row dropped silently would shrink the target set unnoticed): the
  target set is truncated the same way (``truncation_mode``) and every row without a supervised token
  is reported by index, with the reason. The two datasets must be formatted alike: pre-tokenised rows
  whose ids are not this tokenizer's, or general and target rows framed by different special tokens
  (two chat templates), are refused (:func:`check_same_tokenization`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer

from ..training_options import DrPostTrainerOptions
from .hf import DrPostTrainerMixin, rows_shown

__all__ = ["DrPostSFTConfig", "DrPostSFTTrainer", "check_assistant_turns", "check_same_tokenization"]

_FORMAT_KEYS = ("messages", "prompt", "completion", "text", "input_ids")


@dataclass
class DrPostSFTConfig(SFTConfig, DrPostTrainerOptions):
    """TRL's ``SFTConfig`` plus the Dr. Post-Training options (every field of
    :class:`drpost.training_options.DrPostTrainerOptions`: the engine's options, ``target_batch_size``,
    the frac='auto' knobs, ``n_target``, ``selection_log``), so ``TrlParser`` / ``HfArgumentParser``
    offer them all as flags. ``seed`` is SFTConfig's and also seeds the target sampler and drpost."""

    def __post_init__(self):
        self.check_trainer_options(type(self).__name__)
        SFTConfig.__post_init__(self)


class DrPostSFTTrainer(DrPostTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose backward is ``DataRegularizer.backward``.

    Args (besides SFTTrainer's own):
        args: ``DrPostSFTConfig``.
        train_dataset: the *general* data, in any format SFTTrainer accepts.
        target_dataset: the *target* data (a list of dicts or a ``datasets.Dataset``), in any format
            SFTTrainer accepts; prepared like the general data. May be None only for
            ``feasible_set="standard"``.
    """

    ARGS_CLASS = DrPostSFTConfig

    def __init__(self, model, args: DrPostSFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *trainer_args, target_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DrPostSFTConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-DrPost-SFT")
        self._check_args(args)
        _refuse_other_objectives(args, kwargs.get("compute_loss_func"))
        if train_dataset is not None:
            check_assistant_turns(train_dataset, "general")
        if target_dataset is not None and hasattr(target_dataset, "__len__"):
            check_assistant_turns(target_dataset, "target")
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         *trainer_args, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("DrPostSFTTrainer supports text datasets (messages, prompt/completion, text); the "
                             "general dataset has images")
        if self.aux_loss_enabled:
            raise ValueError(f"DrPostSFTTrainer trains on the per-sample cross-entropy only; the model's MoE router "
                             f"auxiliary loss (router_aux_loss_coef={self.router_aux_loss_coef}) is not a per-sample "
                             "token sum: set router_aux_loss_coef=0.0")
        self._init_drpost(target_dataset)

    # ------------------------------------------------------------------ target data
    def _prepare_target(self, target):
        """SFTTrainer's preparation of the target rows, unpacked, unshuffled, truncated without dropping."""
        if target is None:
            return None
        if isinstance(target, (list, tuple)):
            from datasets import Dataset

            _check_format(target)
            target = Dataset.from_list(list(target))
        elif not hasattr(target, "map") or not hasattr(target, "column_names"):
            raise TypeError("target_dataset must be a list of dicts or a datasets.Dataset in one of SFTTrainer's "
                            f"formats ({', '.join(_FORMAT_KEYS)}), got {type(target).__name__}")
        if self._skip_prepare_dataset:
            rows = target
        else:
            args = self.args
            saved = args.max_length, args.shuffle_dataset
            args.max_length, args.shuffle_dataset = None, False   # truncation below reports, never drops
            try:
                rows = self._prepare_dataset(target, self.processing_class, args, False, self._formatting_func,
                                             "target")
            except RuntimeError as err:                            # e.g. assistant_only_loss, no assistant turn
                raise ValueError(f"the target dataset could not be prepared: {err}") from err
            finally:
                args.max_length, args.shuffle_dataset = saved
            rows = self._truncate_target(rows)
        if "input_ids" not in rows.column_names or "labels" not in rows.column_names:
            raise ValueError(f"the prepared target rows need 'input_ids' and 'labels', got {rows.column_names}; with "
                             "dataset_kwargs={'skip_prepare_dataset': True} pass tokenised rows with labels")
        general = self.train_dataset
        if general is not None and hasattr(general, "column_names") and "input_ids" in general.column_names:
            check_same_tokenization(general, rows, self.processing_class)
        return rows

    def _truncate_target(self, rows):
        """``max_length`` truncation as SFTTrainer does it (``truncation_mode``), but rows left without a
        supervised token stay, so that :meth:`_check_target` names them."""
        length = self.args.max_length
        if length is None:
            return rows
        keep_end = self.args.truncation_mode == "keep_end"
        long = [i for i, ids in enumerate(rows["input_ids"]) if len(ids) > length]
        if not long:
            return rows
        sl = slice(-length, None) if keep_end else slice(None, length)
        cut = rows.map(lambda ex: {"input_ids": ex["input_ids"][sl], "labels": ex["labels"][sl]})
        lost = [i for i in long if all(v == -100 for v in cut[i]["labels"][1:])]
        if lost:
            raise ValueError(f"{len(lost)} target example(s) have no supervised tokens left after truncation to "
                             f"max_length={length} (truncation_mode={self.args.truncation_mode!r}): "
                             f"rows {rows_shown(lost)}; "
                             "raise max_length, use truncation_mode='keep_end' for long prompts, or drop those rows")
        return cut

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.maybe_activation_offload_context:
            loss = DrPostTrainerMixin.training_step(self, model, inputs, num_items_in_batch)
        self._count_tokens(inputs)
        return loss

    def _count_tokens(self, inputs) -> None:
        """SFTTrainer's ``num_tokens`` log: input tokens seen so far, over all ranks."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            return
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum()) // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


def _refuse_other_objectives(args: DrPostSFTConfig, compute_loss_func) -> None:
    if compute_loss_func is not None:
        raise ValueError("DrPostSFTTrainer computes the per-sample cross-entropy itself (the feasible set is built "
                         "from per-sample gradients of that loss): compute_loss_func is not supported")
    if args.loss_type != "nll":
        raise ValueError(f"DrPostSFTTrainer supports loss_type='nll' only, got {args.loss_type!r}: the drpost step "
                         "scores and selects per-sample gradients of the token-summed cross-entropy")
    if args.label_smoothing_factor:
        raise ValueError(f"DrPostSFTTrainer does not support label smoothing (label_smoothing_factor="
                         f"{args.label_smoothing_factor}): set it to 0")


def _format_of(row) -> str | None:
    if not hasattr(row, "keys"):
        return None
    if "input_ids" in row:
        return "tokenised"
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "text" in row:
        return "text"
    return None


def _check_format(rows) -> None:
    """One of SFTTrainer's formats, the same for every row (SFTTrainer prepares a dataset by the format
    of its first row)."""
    first = None
    for i, row in enumerate(rows):
        kind = _format_of(row)
        if kind is None:
            keys = sorted(row.keys()) if hasattr(row, "keys") else type(row).__name__
            raise ValueError(f"target example {i} is in none of SFTTrainer's formats: it needs 'messages', "
                             f"'prompt' and 'completion', 'text' or 'input_ids'; got {keys}")
        if first is None:
            first = kind
        elif kind != first:
            raise ValueError(f"target example {i} is in the {kind} format but example 0 in the {first} format: "
                             "SFTTrainer prepares a dataset by the format of its first row; convert the target rows "
                             "to one format")


def check_assistant_turns(data, role: str) -> None:
    """Every conversation of a ``messages`` dataset has an assistant turn (else it teaches no answer)."""
    names = getattr(data, "column_names", None)
    if names is not None:
        if "messages" not in names:
            return
        conversations = data["messages"]
    else:
        conversations = [row.get("messages") for row in data if hasattr(row, "get")]
    bad = [i for i, conv in enumerate(conversations)
           if conv is not None and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in conv)]
    if bad:
        raise ValueError(f"{len(bad)} {role} example(s) have no assistant turn (a 'messages' conversation needs a "
                         f"message with role 'assistant', the answer the model learns): rows {rows_shown(bad)}; "
                         "add the answers or drop those rows")


# ---------------------------------------------------------------------- the two datasets agree
def check_same_tokenization(general, target, tokenizer, rows: int = 16) -> None:
    """Refuse a target set tokenised differently from the general set (both prepared, with ``input_ids``).

    * every id must be below the tokenizer's size (a bigger id means another vocabulary);
    * the special tokens framing the rows (those found in at least 90 % of a side's first ``rows``
      rows, other than end-of-sequence and padding, which plain text also gets) must be the same on
      both sides when both have some: a chat template leaves its markers in every row, so different
      sets mean different templates. Plain text without markers on one side (pre-training style
      general data) is accepted. A template whose markers are not special tokens of this tokenizer,
      or another tokenizer whose ids all fall inside this vocabulary, is not detected.
    """
    if tokenizer is None:
        return
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}

    def framing(data, role):
        n = min(rows, len(data))
        counts = Counter()
        for i in range(n):
            ids = list(data[i]["input_ids"])
            if ids and max(ids) >= size:
                raise ValueError(f"{role} example {i} has token id {max(ids)}, outside this tokenizer's vocabulary "
                                 f"({size} tokens): it was tokenised with another tokenizer; pass it raw "
                                 "(messages / prompt-completion / text) so the trainer tokenises it, or re-tokenise "
                                 "it with the trainer's processing_class")
            counts.update(set(ids) & special)
        return {t for t, c in counts.items() if n and c >= 0.9 * n} - plain

    plain = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}

    g, t = framing(general, "general"), framing(target, "target")
    if g and t and g != t:
        names = lambda ids: ", ".join(sorted(tokenizer.convert_ids_to_tokens(sorted(ids))))  # noqa: E731
        raise ValueError(f"the general and target rows are framed by different special tokens (general: {names(g)}; "
                         f"target: {names(t)}): the two datasets were formatted with different chat templates; "
                         "pass both in a raw format (e.g. 'messages') so that SFTTrainer applies the processing "
                         "class's template to both, or format both with the same template")
