"""First-EOS masks and left-padding positions (core.sequences), the helpers generation, evaluation and the
toy share."""

import torch

from fdpg_scale.core.sequences import first_eos_mask, position_ids_from_mask

EOS = 9


def test_first_eos_mask_keeps_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[1, 2, EOS, 3, EOS],
                        [EOS, EOS, 1, 1, 1],
                        [1, 2, 3, 4, 5]])
    assert first_eos_mask(ids, EOS).int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_first_eos_mask_within_ignores_eos_outside_it():
    """Prompt + generation: an EOS in the prompt (outside ``within``) does not end the sequence."""
    ids = torch.tensor([[EOS, 5, 1, EOS, 2, 0],
                        [0, 5, 1, 2, 3, 0]])
    within = torch.tensor([[0, 0, 1, 1, 1, 0],
                           [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert first_eos_mask(ids, EOS, within=within).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
