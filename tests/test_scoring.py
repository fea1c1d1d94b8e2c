import math

import torch

from transprune import scoring


def test_module_transition_matches_a_loop():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mag, cos = scoring.module_transition(x, y)
    for b in range(2):
        for t in range(5):
            xs, ys = x[b, t].tolist(), y[b, t].tolist()
            nx = math.sqrt(sum(v * v for v in xs))
            ny = math.sqrt(sum(v * v for v in ys))
            assert math.isclose(mag[b, t].item(), ny / nx, rel_tol=1e-5)
            assert math.isclose(cos[b, t].item(), sum(a * c for a, c in zip(xs, ys)) / (nx * ny), rel_tol=1e-4, abs_tol=1e-6)


def test_module_transition_is_fp32_for_half_inputs():
    x = torch.randn(1, 3, 8).to(torch.bfloat16)
    mag, cos = scoring.module_transition(x, x * 2)
    assert mag.dtype == torch.float32 and torch.allclose(mag, torch.full_like(mag, 2.0))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_direction_variants_differ_only_for_negative_cosines():
    cos = torch.tensor([0.5, -0.5, 0.0, -1.0])
    assert scoring.direction_term(cos, "1-cos").tolist() == [0.5, 1.5, 1.0, 2.0]
    assert scoring.direction_term(cos, "1-abs-cos").tolist() == [0.5, 0.5, 1.0, 0.0]


def test_module_ttv_softmax_ignores_padding():
    torch.manual_seed(1)
    x, y = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    valid = torch.tensor([[False, False, True, True, True, True]])
    ttv = scoring.module_ttv(x, y, valid, "1-cos")
    assert ttv[0, :2].tolist() == [0.0, 0.0]
    # reference on the unpadded tokens alone: exp(u)/sum(exp(u)) * ||y||/||x||
    xs, ys = x[0, 2:], y[0, 2:]
    u = 1 - torch.nn.functional.cosine_similarity(xs, ys, dim=-1)
    ref = torch.exp(u) / torch.exp(u).sum() * ys.norm(dim=-1) / xs.norm(dim=-1)
    assert torch.allclose(ttv[0, 2:], ref, atol=1e-6)


def test_instruction_attention_matches_explicit_softmax():
    torch.manual_seed(2)
    H, S, hd = 3, 7, 4
    k = torch.randn(H, S, hd)
    query_pos = torch.tensor([4, 6])
    q = torch.randn(H, 2, hd)
    got = scoring.instruction_attention(q, k, query_pos, scaling=0.5)
    ref = torch.zeros(S)
    for h in range(H):
        for t, pos in enumerate(query_pos.tolist()):
            logits = [(q[h, t] @ k[h, j]).item() * 0.5 for j in range(pos + 1)]
            z = sum(math.exp(v) for v in logits)
            for j, v in enumerate(logits):
                ref[j] += math.exp(v) / z / (H * 2)
    assert torch.allclose(got, ref, atol=1e-6)
    assert got[5].item() == 0.0 or query_pos.max() >= 5  # key 5 is seen only by the row at 6


def test_instruction_attention_without_queries_is_zero():
    assert scoring.instruction_attention(torch.zeros(2, 0, 4), torch.randn(2, 5, 4), torch.zeros(0, dtype=torch.long), 1.0).tolist() == [0.0] * 5


def test_combine_is_alpha_mix_of_l1_normalised_parts():
    ttv, iga = torch.tensor([1.0, 3.0]), torch.tensor([0.3, 0.1])
    assert torch.allclose(scoring.combine(ttv, iga, 0.5, "transprune"), torch.tensor([0.5 * 0.25 + 0.5 * 0.75, 0.5 * 0.75 + 0.5 * 0.25]))
    assert torch.allclose(scoring.combine(ttv, iga, 0.5, "ttv"), torch.tensor([0.25, 0.75]))
    assert torch.allclose(scoring.combine(ttv, iga, 0.5, "iga"), torch.tensor([0.75, 0.25]))


def test_select_top_returns_original_order_and_breaks_ties_to_earlier():
    score = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert scoring.select_top(score, 3).tolist() == [1, 2, 3]
    assert scoring.select_top(torch.ones(5), 2).tolist() == [0, 1]
