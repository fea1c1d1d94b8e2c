"""`adapters/vision.py`: the scored SigLIP layer's own forward, run so that it also makes the first pass of the
received-attention score, is the layer's forward bit for bit, and its score is the two-pass score's."""

import pytest
import torch

import transprune
from transprune import VisionZipConfig
from transprune.adapters import adapter_for, vision
from transprune.testing import sample_inputs, tiny_model, tiny_processor

# (model type, image sizes): the families whose VisionZip hooks share the layer's pass (CLS-free SigLIP towers)
FAMILIES = [("gemma3", [(64, 64)] * 2), ("smolvlm", [(96, 64), (64, 64)]), ("llava_onevision", [(64, 64), (96, 48)])]


def layer_call(model, inputs):
    """The scored attention layer and the (args, kwargs) of its first call in an unpruned forward."""
    attn = adapter_for(model).vision_hooks().attention_layer()
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return attn, *seen[0]


@pytest.mark.parametrize("kind,sizes", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_the_shared_forward_is_the_layers_and_its_score_the_two_pass_score(kind, sizes):
    model = tiny_model(kind, seed=0)
    inputs = sample_inputs(tiny_processor(kind), len(sizes), seed=5, sizes=sizes)
    attn, args, kwargs = layer_call(model, inputs)
    hooks = adapter_for(model).vision_hooks()
    with torch.no_grad():
        own = attn(*args, **kwargs)[0]
        shared, layer_pass = hooks.forward_with_lse(attn, args, kwargs)
        received, keys = hooks.capture(attn, args, kwargs)  # both passes the score's own
    assert torch.equal(shared[0], own)  # the kernel sdpa runs on a CPU, called directly: the same bits
    got_received, got_keys = layer_pass.received()
    assert torch.allclose(got_received, received, rtol=1e-5, atol=1e-7)
    assert torch.equal(got_keys, keys)


def test_a_padding_mask_is_applied_as_sdpa_applies_it():
    """A bool and an additive mask hiding some patches as keys: the layer's output and the score equal the
    layer's own sdpa forward and the two-pass score under the same mask."""
    model = tiny_model("gemma3", seed=0)
    inputs = sample_inputs(tiny_processor("gemma3"), 2, seed=6, sizes=[(64, 64)] * 2)
    attn, args, kwargs = layer_call(model, inputs)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    b, t, _ = hidden.shape
    allowed = torch.ones(b, 1, t, t, dtype=torch.bool)
    allowed[1, :, :, t - 9:] = False  # sample 1's last 9 patches are padding
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive):
        with torch.no_grad():
            own = attn(hidden, attention_mask=mask)[0]
            (shared, _), layer_pass = vision.forward_with_lse(attn, hidden, mask)
            q = attn.q_proj(hidden).view(b, t, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(hidden).view(b, t, -1, attn.head_dim).transpose(1, 2)
            two_pass = vision.received_from_qk(q, k, attn.scale, allowed[:, 0])
        assert torch.allclose(shared, own, atol=1e-6) and torch.equal(shared[0], own[0])
        got = layer_pass.received()[0]
        assert torch.allclose(got, two_pass, rtol=1e-5, atol=1e-7)
        assert got[1, t - 9:].abs().max() == 0 and torch.allclose(got.sum(1), torch.ones(b))  # padding receives none


def test_other_backends_run_the_layer_as_it_is():
    """Eager attention (or half precision, sdpa's flash kernel switched off, CPU autocast, a training layer) is left
    to its own forward: no shared pass."""
    model = tiny_model("gemma3", seed=0, attn_implementation="eager")
    inputs = sample_inputs(tiny_processor("gemma3"), 1, seed=5, sizes=[(64, 64)])
    attn, args, kwargs = layer_call(model, inputs)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    assert vision.forward_with_lse(attn, hidden, None) is None
    sdpa = tiny_model("gemma3", seed=0)
    attn = adapter_for(sdpa).vision_hooks().attention_layer()
    assert vision.forward_with_lse(attn, hidden.half(), None) is None
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):  # sdpa would not run flash
        assert vision.forward_with_lse(attn, hidden, None) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vision.forward_with_lse(attn, hidden, None) is None
    assert vision.forward_with_lse(attn, hidden, None) is not None
    attn.train()
    assert vision.forward_with_lse(attn, hidden, None) is None


@pytest.mark.parametrize("kind,sizes", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_visionzip_takes_the_shared_pass_and_chooses_as_the_two_pass_score(kind, sizes, monkeypatch):
    """Pruned with the shared pass (counted) and without: the same kept tokens and logits."""
    model = tiny_model(kind, seed=0)
    inputs = sample_inputs(tiny_processor(kind), len(sizes), seed=7, sizes=sizes)
    taken = []
    received = vision.LayerPass.received
    monkeypatch.setattr(vision.LayerPass, "received", lambda self: taken.append(1) or received(self))
    runs = []
    for share in (True, False):
        taken.clear()
        monkeypatch.setattr(vision, "_SHARE_LAYER_PASS", share)
        with transprune.pruned(model, VisionZipConfig(6, 2)) as handle, torch.no_grad():
            logits = model(**inputs).logits
        runs.append(([s.kept_indices for s in handle.last_stats], logits))
        assert bool(taken) == share
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-5)
