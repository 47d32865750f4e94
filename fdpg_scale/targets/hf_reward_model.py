"""``target.scorer: hf-reward-model``: a Hugging Face reward model that reads the prompt and the completion.

Reward models are trained on (prompt, response) pairs, so the text scored is the sample's context followed by
its completion, not the completion alone (what ``hf-classifier`` scores):

- when the reward model's tokenizer has a chat template: ``apply_chat_template([{"role": "user", "content":
  prompt}, {"role": "assistant", "content": completion}], tokenize=False)``, tokenised as it is (the template
  writes its own special tokens);
- otherwise: ``prompt + completion``, tokenised with the tokenizer's special tokens;
- an unconditional target (no prompt): the completion alone.

The reward is the raw output (logit) ``logits[label]``: ``label`` defaults to the only output of a one-output
head (the usual reward model), and must name one (an ``id2label`` name or an index) when the head has several.
Loading is ``hf-classifier``'s (``HFClassifier``): a local directory or a Hub id in the local cache, once per
rank, frozen, in eval mode, in ``dtype`` (in a run: ``scorer_args.dtype``, else the run's ``model.dtype``), on the
rank's device, ``batch_size`` texts per forward under ``torch.no_grad``. ``fdpg-scale plan`` counts its parameters
(a full copy per rank) in each GPU's memory. The prompt each sample sees is its context
text (``Samples.contexts``: a string prompt, or the last message of a chat prompt).
"""

from __future__ import annotations

import inspect

import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.hf_classifier import HFClassifier, local_model_dir
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.user_scorers import checked_values

__all__ = ["HFRewardModel", "build_hf_reward_model"]


class HFRewardModel:
    """Samples -> float32 [B]: the reward model's logit for each (prompt, completion) pair (module docstring)."""

    def __init__(self, *, path: str, label: str | int | None = None, batch_size: int = 32,
                 max_length: int | None = None, dtype: str = "fp32", device: str | torch.device = "cpu",
                 where: str = "target.scorer hf-reward-model"):
        """path: a local directory or a Hub id in the local cache; label: which output is the reward (None: the
        only one); batch_size: pairs per forward; max_length: tokens kept per pair (default: the model's
        positions); dtype: fp32, bf16 or fp16 (a run passes its model.dtype unless scorer_args sets one); device:
        the rank's device; where: the config key for errors."""
        if label is None:  # checked on config.json, before the weights load
            from transformers import AutoConfig

            local = local_model_dir(path, f"{where} {path!r}")
            outputs = AutoConfig.from_pretrained(local).num_labels if (local / "config.json").is_file() else 1
            if outputs != 1:
                raise ConfigError(f"{where} {path!r}: the model has {outputs} outputs; name the reward's in "
                                  f"scorer_args.label (a name of its id2label or an index)")
        self.classifier = HFClassifier(path=path, label=0 if label is None else label, batch_size=batch_size,
                                       max_length=max_length, dtype=dtype, device=device, where=where)
        self.where = self.classifier.where
        self.label_index = self.classifier.label_index
        self.chat = getattr(self.classifier.tokenizer, "chat_template", None) is not None

    def texts(self, samples: Samples) -> list[str]:
        """The text scored for each sample: prompt + completion as the module docstring says."""
        if samples.texts is None:
            raise ValueError(f"{self.where} reads decoded texts, but these samples have none")
        if samples.contexts is None:
            return list(samples.texts)
        if not self.chat:
            return [c + t for c, t in zip(samples.contexts, samples.texts)]
        return [self.classifier.tokenizer.apply_chat_template(
            [{"role": "user", "content": c}, {"role": "assistant", "content": t}], tokenize=False)
            for c, t in zip(samples.contexts, samples.texts)]

    def __call__(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: r(x | c) = logits[label] of each pair, checked finite."""
        logits = self.classifier.logits(self.texts(samples), add_special_tokens=not (self.chat and samples.contexts))
        return checked_values(logits[:, self.label_index], samples, self.where)


def build_hf_reward_model(scorer_args: dict, *, where: str, device) -> HFRewardModel:
    """An ``HFRewardModel`` from ``target.scorer_args``, the arguments checked against its signature."""
    allowed = [p for p in inspect.signature(HFRewardModel.__init__).parameters if p not in ("self", "device", "where")]
    unknown = sorted(set(scorer_args) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} hf-reward-model: unknown scorer_args {unknown} (valid: {', '.join(allowed)})")
    if "path" not in scorer_args:
        raise ConfigError(f"{where} hf-reward-model: scorer_args ['path'] is required (valid: {', '.join(allowed)})")
    return HFRewardModel(**scorer_args, device=device, where=where)
