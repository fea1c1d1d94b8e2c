import torch

from transprune.adapters.base import close_up_1d
from transprune.surgery import Layout, drop_tokens, gather_tokens, keep_index, scatter_to_input


def _layout():
    # two samples, left padded: sample 0 has 5 tokens, sample 1 has 6 (image tokens marked i)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    image = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])
    return Layout.initial(valid, image, positions)


def test_initial_layout_ranks_image_tokens():
    lay = _layout()
    assert lay.image_rank.tolist() == [[-1, -1, 0, 1, 2, -1], [-1, 0, 1, 2, -1, -1]]


def test_keep_index_left_pads_each_row():
    keep = torch.tensor([[0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    index, valid = keep_index(keep)
    assert valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert index[0, 1:].tolist() == [1, 3, 5] and index[1].tolist() == [0, 1, 2, 3]


def test_drop_compact_positions_renumber_like_arange():
    lay = _layout()
    keep = lay.valid & ~(lay.image & (lay.image_rank == 1))  # drop the middle image token of each sample
    new, index = drop_tokens(lay, keep, close_up=close_up_1d)
    assert new.valid.tolist() == [[False, True, True, True, True], [True, True, True, True, True]]
    assert new.positions[0, 1:].tolist() == [0, 1, 2, 3] and new.positions[1].tolist() == [0, 1, 2, 3, 4]
    assert new.image_rank.tolist() == [[-1, -1, 0, 2, -1], [-1, 0, 2, -1, -1]]
    assert new.orig_index[0, 1:].tolist() == [1, 2, 4, 5] and new.orig_index[1].tolist() == [0, 1, 3, 4, 5]


def test_drop_original_positions_keep_their_values():
    lay = _layout()
    keep = lay.valid & ~(lay.image & (lay.image_rank == 0))
    new, _ = drop_tokens(lay, keep, close_up=None)
    assert new.positions[0, 1:].tolist() == [0, 2, 3, 4] and new.positions[1].tolist() == [0, 2, 3, 4, 5]


def test_gather_and_scatter_round_trip():
    lay = _layout()
    h = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    keep = lay.valid & ~(lay.image & (lay.image_rank == 2))
    new, index = drop_tokens(lay, keep, close_up=close_up_1d)
    back = scatter_to_input(gather_tokens(h, index), new, 6)
    for b in range(2):
        for c in range(6):
            expected = h[b, c] if keep[b, c] else torch.zeros(2)
            assert torch.equal(back[b, c], expected)
