"""The lmms-eval plugin, through lmms-eval's own CLI: entry point, the `transprune_mini` task, batching, the
per-sample log, model_args errors, loglikelihood. Needs lmms-eval (installed as the README says; CI does)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (see the README's lmms-eval section)")

from transprune.integrations.lmms_eval import TASKS_DIR  # noqa: E402
from transprune.mini.evaluate import evaluate, questions  # noqa: E402
from transprune.mini.model import checkpoint_path, load_mini  # noqa: E402

CHECKPOINT = checkpoint_path()


def lmms_eval_cli(tmp_path, model_args: str, limit: int, batch_size: int = 2, processes: int = 1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:  # accelerate's multi-process launch; on a CPU machine its processes talk over gloo
        env["ACCELERATE_USE_CPU"] = "true"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "-m", "lmms_eval"]
    cmd = [*launch, "--model", "transprune", "--model_args", model_args,
           "--tasks", "transprune_mini", "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size),
           "--limit", str(limit), "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    return results["results"]["transprune_mini"], done


def test_the_entry_point_resolves_to_our_model():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("transprune").__module__ == "transprune.integrations.lmms_eval.model"


def test_lmms_eval_cli_accuracy_equals_transprune_eval(tmp_path):
    """lmms-eval's own CLI, batch size 2, on the shipped mini checkpoint: the same accuracy as `transprune eval
    --suite mini` on the same first questions, and one log line per sample with its kept tokens and TFLOPs."""
    n = 12
    log = tmp_path / "samples.jsonl"
    got, _ = lmms_eval_cli(tmp_path, f"pretrained={CHECKPOINT},method=transprune-high,reference_depth=32,"
                                     f"log_path={log}", limit=n)
    model, processor = load_mini()
    expected = evaluate(model, processor, ["transprune-high"], n=n, batch_size=5, progress=False)[0]
    assert got["accuracy,none"] == pytest.approx(expected.accuracy)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    samples, summary = lines[:-1], lines[-1]
    assert sorted(s["doc_id"] for s in samples) == list(range(n))
    assert all(s["kept_tokens"] == [224, 160, 32] and s["kept_after_layer"] == [3, 4, 5] for s in samples)
    assert summary["summary"] and summary["tflops_ratio"] == pytest.approx(expected.tflops_ratio)
    # and in lmms-eval's own per-sample output (--log_samples): the sample's token counts carry its pruning
    logged = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_transprune_mini.jsonl"))
              .read_text().splitlines()]
    assert len(logged) == n
    for sample in logged:
        counts = sample["token_counts"][0]
        assert counts["image_tokens"] == 256 and counts["kept_tokens"] == [224, 160, 32]
        assert counts["tflops"] < counts["tflops_unpruned"] and counts["output_tokens"] == 1


def test_unknown_model_args_name_the_allowed_ones():
    from transprune.integrations.lmms_eval.model import TransPrune

    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rr'\].*transprune --model_args: .*pretrained"):
        TransPrune(pretrained=str(CHECKPOINT), method="fastv", rr="0.5")
    with pytest.raises(ValueError, match="compose methods with '\\+'"):
        TransPrune(pretrained=str(CHECKPOINT), method="visionzip,fastv")


def test_loglikelihood_prunes_the_prompt_then_scores_the_continuation():
    """log p(answer | prompt): with method=none it equals the full forward's; pruned, the prompt's own prefill is
    pruned (the continuation is not in it) and the score equals the pruned prompt's next-token distribution."""
    from transprune.integrations.lmms_eval.model import TransPrune
    from transprune.mini.model import prompt

    sample = questions(1)[0]
    doc = {"question": sample.question}
    request = SimpleNamespace(args=(sample.question, sample.answer, lambda d: [sample.image], 0, "t", "test"))
    for method in ("none", "transprune-high"):
        lmm = TransPrune(pretrained=str(CHECKPOINT), method=method,
                         **({} if method == "none" else {"reference_depth": 32}))
        lmm.task_dict = {"t": {"test": [doc]}}
        (logprob, greedy), = lmm.loglikelihood([request])
        model, processor = lmm.model, lmm.processor
        inputs = processor(images=[sample.image], text=[prompt(sample.question)], return_tensors="pt")
        answer = processor.tokenizer.convert_tokens_to_ids(sample.answer)
        with torch.no_grad():
            last = model(**inputs).logits[0, -1].float().log_softmax(-1)
        assert logprob == pytest.approx(float(last[answer]), abs=1e-5)
        assert greedy == (int(last.argmax()) == answer)
        if lmm.handle is not None:
            lmm.handle.remove()


def test_accelerate_launch_two_processes_gives_the_same_accuracy(tmp_path):
    """accelerate launch --num_processes 2 on the CPU: each process its own model and half the requests; the
    gathered accuracy equals one process's."""
    n = 12
    log = tmp_path / "samples.jsonl"
    args = f"pretrained={CHECKPOINT},method=transprune-high,reference_depth=32"
    two, _ = lmms_eval_cli(tmp_path / "two", f"{args},log_path={log}", limit=n, processes=2)
    one, _ = lmms_eval_cli(tmp_path / "one", args, limit=n)
    assert two["accuracy,none"] == one["accuracy,none"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    by_rank = {r: sorted(s["doc_id"] for s in lines if s["rank"] == r and "doc_id" in s) for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and sorted(by_rank[0] + by_rank[1]) == list(range(n))
    assert sorted(s["rank"] for s in lines if s.get("summary")) == [0, 1]


def test_multi_image_requests_get_one_image_slot_per_image():
    from transprune.integrations.lmms_eval.model import TransPrune

    images = [s.image for s in questions(2)]
    request = SimpleNamespace(args=("which is brighter ?", {"max_new_tokens": 2, "until": ["\n"]},
                                    lambda doc: images, 0, "t", "test"))
    lmm = TransPrune(pretrained=str(CHECKPOINT), method="transprune-high", reference_depth=32)
    lmm.task_dict = {"t": {"test": [{}]}}
    (answer,) = lmm.generate_until([request])
    stats = lmm.handle.last_stats[0]
    lmm.handle.remove()
    assert isinstance(answer.text, str) and answer.token_counts.image_tokens == 512
    assert stats.n_image_tokens == 2 * 256 and [len(k) for k in stats.kept_indices] == [448, 320, 64]


def test_smolvlm_through_the_plugin_batched(tmp_path):
    """An image-only SmolVLM processor (no torchvision) through the plugin, batch 2: its prompts are rendered
    through the tokenizer, its images given one list per prompt; batched answers == one by one."""
    from transprune.integrations.lmms_eval.model import TransPrune
    from transprune.testing import sample_images, save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "smol", kind="smolvlm")
    images = sample_images(3, 0, [(64, 64), (128, 64), (64, 128)])
    requests = [SimpleNamespace(args=(f"what is shown {i} ?", {"max_new_tokens": 3, "until": ["\\n"]},
                                      lambda doc, i=i: [images[i]], i, "t", "test")) for i in range(3)]
    answers = {}
    for batch_size in (2, 1):
        lmm = TransPrune(pretrained=str(folder), method="fastv", batch_size=batch_size)
        lmm.task_dict = {"t": {"test": [{}] * 3}}
        answers[batch_size] = [(r.text, r.token_counts.image_tokens) for r in lmm.generate_until(requests)]
        lmm.handle.remove()
    assert answers[2] == answers[1] and [n for _, n in answers[1]] == [80, 48, 48]


def test_budget_model_arg_scales_the_method():
    import transprune
    from transprune.integrations.lmms_eval.model import TransPrune

    lmm = TransPrune(pretrained=str(CHECKPOINT), method="fastv", reference_depth=32, budget="0.5")
    want = transprune.budget(transprune.FastVConfig(reference_depth=32), lmm.model, 0.5)
    assert lmm.config == want and lmm.config.r != transprune.FastVConfig().r
    with pytest.raises(ValueError, match="budget needs a method"):
        TransPrune(pretrained=str(CHECKPOINT), method="none", budget="0.5")
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        TransPrune(pretrained=str(CHECKPOINT), method="fastv", budget="lots")
