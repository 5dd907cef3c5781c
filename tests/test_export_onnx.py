"""python -m difflab.export --format onnx: the sampling loop as one ONNX graph, run by onnxruntime without PyTorch.

The models are tiny UNets (model=unet_tiny, T=100) with random weights (the output conv starts at zero, so every
weight is perturbed: outputs depend on every layer), saved as shipped checkpoints: what export reads, no training.
"""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from difflab.cli import run
from difflab.config import PROJECT_ROOT, to_container
from difflab.editing import Inpaint, repaint_path
from difflab.export import ONNX_PINS, main, sampling_spec
from difflab.generator import SpriteGenerator
from difflab.images import snap_to_palette, to_uint8
from difflab.masks import region
from difflab.model import build_model, load_model
from difflab.samplers import EulerSampler, HeunSampler
from difflab.sampling import ImageNoise, SamplingPlan, SamplingSpec, generate
from difflab.tolerance import chain_tol

from support import compose_cfg

EXAMPLE = PROJECT_ROOT / "examples" / "onnx_sprites.py"
LABELS = torch.tensor([0, 2, 5, 3])
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches on a shared machine (conftest.py)


def save_model(root: Path, name: str, overrides: list[str], ema: bool = True) -> Path:
    model = build_model(to_container(compose_cfg(["model=unet_tiny", "timesteps=100", *overrides], root / name)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    saved = {"state_dict": {f"net.{k}": v for k, v in model.net.state_dict().items()}, "difflab_config": model.config,
             "class_names": model.class_names}
    if ema:
        saved["difflab_export"] = {"source": "test"}  # as export_weights writes: the state_dict is the EMA weights
    path = root / f"{name}.ckpt"
    torch.save(saved, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, .onnx): sampler auto (dpmpp 15 steps, guidance 2 / consistency 2 steps, its distilled 2); an
    inpainting model's graph samples from scratch (no known-pixel inputs); the --inpaint graphs take a source and a mask:
    one pass with the inpainting model, RePaint (with jumps: 5 steps, jump_length 3) with the plain one; Heun's graph
    (4 steps: 7 network calls) from the plain model."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread (a module's fixture runs before it)
    try:
        for name, overrides, extra in (("diffusion", [], []), ("consistency", ["objective=consistency"], []),
                                       ("inpainting", ["model.cond_channels=4"], []),  # samples from scratch: nothing known
                                       ("uncond", ["model.num_classes=0"], ["--batch", "3", "--sampler", "ddim", "--steps", "4"]),
                                       ("inpaint_graph", ["model.cond_channels=4"], ["--inpaint", "--steps", "4"]),
                                       ("repaint_graph", [], ["--inpaint", "--sampler", "ddim", "--steps", "5"]),
                                       ("heun", [], ["--sampler", "heun", "--steps", "4"])):
            ckpt = save_model(root, name, overrides)
            out[name] = (ckpt, main([str(ckpt), str(root / name), "--format", "onnx", *extra]))
    finally:
        torch.set_num_threads(threads)
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs on a shared machine
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_pixels_close(pixels: np.ndarray, ref_pixels: torch.Tensor, images: np.ndarray, ref_images: torch.Tensor) -> None:
    """uint8 (B, H, W, C) of images (B, C, H, W): |round(127.5 a) - round(127.5 b)| <= floor(127.5 |a - b|) + 1 (the
    clamp is 1-Lipschitz), so within one level wherever the float images are within 1/127.5."""
    gap = np.floor(127.5 * np.abs(images - ref_images.numpy())).transpose(0, 2, 3, 1)
    assert (np.abs(pixels.astype(int) - ref_pixels.numpy().astype(int)) <= gap + 1).all()


def reference(ckpt: Path, noise: torch.Tensor, labels: torch.Tensor | None) -> tuple[SpriteGenerator, torch.Tensor, torch.Tensor, float]:
    """The export's generator run by PyTorch on the same inputs -> (generator, images, pixels, tolerance)."""
    model = load_model(ckpt)
    distilled = model.objective.distilled_guidance
    generator = SpriteGenerator(model, sampling_spec("auto", None, distilled)).eval()
    outputs = []
    hook = model.net.register_forward_hook(lambda m, i, o: outputs.append(float(o.abs().max())))
    with torch.no_grad():
        images, pixels = generator(noise, labels)
    hook.remove()
    plan = generator.plan
    assert plan.guidance.scale == (0.0 if distilled is not None else 2.0)  # a consistency model: one plain network call
    return generator, images, pixels, bound(plan, max(outputs), len(outputs), plan.guidance.scale)


def bound(plan: SamplingPlan, peak: float, calls: int, guidance: float) -> float:
    """chain_tol for ``calls`` network calls of largest output ``peak`` along the plan's noise levels (an eps-model: an
    output error becomes an x_0 error times sigma_t / alpha_t, EDM's sigma)."""
    return chain_tol(plan.model.net, peak, calls, guidance, max(level.edm_sigma for level in plan.levels[:-1]))


@pytest.mark.parametrize("name", ["diffusion", "consistency"])
def test_onnx_images_equal_pytorch_on_the_same_noise(exported, name):
    ckpt, onnx_path = exported[name]
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    noise = torch.randn(len(LABELS), meta["noise_draws"], 3, 16, 16, generator=torch.Generator().manual_seed(1))
    generator, images, pixels, tol = reference(ckpt, noise, LABELS)
    expected_draws = {"diffusion": 1, "consistency": 2}[name]  # DPM-Solver++ draws x_T only; 2-step consistency re-noises once
    assert generator.draws == meta["noise_draws"] == expected_draws
    assert meta["sampling"]["sampler"] == {"diffusion": "dpmpp", "consistency": "consistency"}[name]
    assert meta["sampling"]["steps"] == {"diffusion": 15, "consistency": 2}[name] and meta["sampling"]["guidance"] == 2.0
    assert meta["output_stage"] == {"palette": "sprite", "colors": 16} and meta["class_names"][0] == "hero"
    onnx_images, onnx_pixels = session(onnx_path).run(None, {"noise": noise.numpy(), "labels": LABELS.numpy()})
    assert onnx_pixels.dtype == np.uint8 and onnx_pixels.shape == (4, 16, 16, 3)
    assert np.abs(onnx_images - images.numpy()).max() <= tol
    assert_pixels_close(onnx_pixels, pixels, onnx_images, images)
    assert torch.equal(pixels, to_uint8(images).permute(0, 2, 3, 1))
    # the bound still tells a wrong sampling apart: no guidance, or x_T's draw reused for the re-noising
    model = generator.plan.model
    wrong = SpriteGenerator(model, sampling_spec("auto", None, 0.0)).eval() if name == "diffusion" else generator
    with torch.no_grad():
        other, _ = wrong(noise if name == "diffusion" else noise[:, [0, 0]], LABELS)
    assert (other - images).abs().max() > 2 * tol
    # any batch size: the first image alone is the same image
    one, _ = session(onnx_path).run(None, {"noise": noise[:1].numpy(), "labels": LABELS[:1].numpy()})
    assert np.abs(one[0] - images[0].numpy()).max() <= tol


@pytest.mark.parametrize("name", ["diffusion", "consistency", "inpainting"])
def test_onnx_on_per_image_streams_equals_generate(exported, name):
    """With the D draws of each image's own stream (ImageNoise), in the order generate() makes them (x_T, then the
    sampler's), the graph makes generate()'s images: the export samples as the project does."""
    ckpt, onnx_path = exported[name]
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    model = load_model(ckpt)
    spec = sampling_spec("auto", None, model.objective.distilled_guidance)
    streams = ImageNoise(spec.seed, range(len(LABELS)))
    noise = torch.stack([streams.randn(model.image_shape) for _ in range(meta["noise_draws"])], 1)
    *_, tol = reference(ckpt, noise, LABELS)
    out = generate(spec.bind(model), nn.functional.one_hot(LABELS, model.num_classes).float())
    onnx_images, onnx_pixels = session(onnx_path).run(None, {"noise": noise.numpy(), "labels": LABELS.numpy()})
    assert np.abs(onnx_images - out.images.numpy()).max() <= tol
    assert_pixels_close(onnx_pixels, to_uint8(out.images).permute(0, 2, 3, 1), onnx_images, out.images)
    # the example's output stage is difflab.images.snap_to_palette, the one generate() applied
    example = runpy.run_path(str(EXAMPLE))
    raw = to_uint8(out.images)
    assert np.array_equal(example["snap_to_palette"](raw.permute(0, 2, 3, 1).numpy(), 16), snap_to_palette(raw).permute(0, 2, 3, 1).numpy())
    assert torch.equal(out.pixels, snap_to_palette(raw))


FILLS = torch.stack([region(r, 16) for r in ("top", "left", "center", "right")])[:, None]


def random_sources(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name,method", [("inpaint_graph", "replace"), ("repaint_graph", "repaint")])
def test_onnx_inpainting_equals_the_edit_and_keeps_every_kept_pixel(exported, name, method):
    """The --inpaint graph on each image's own stream makes what generate(edit=Inpaint) makes: the walk's draws are x_T,
    the kept pixels' first re-noising, then one per move along RePaint's path (a keep after each step down, a fresh draw
    for each step back up; DPM-Solver++ and DDIM draw nothing of their own)."""
    ckpt, onnx_path = exported[name]
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    model = load_model(ckpt)
    plan = sampling_spec(meta["sampling"]["sampler"], meta["sampling"]["steps"], None).bind(model)
    steps = plan.steps
    path = repaint_path(steps, 3, 4) if method == "repaint" else list(range(steps + 1))
    assert meta["inpaint"]["method"] == method and meta["noise_draws"] == len(path) + 1
    assert [i.name for i in session(onnx_path).get_inputs()] == ["noise", "labels", "source", "fill"]
    source = random_sources()
    streams = ImageNoise(plan.seed, range(len(LABELS)))
    noise = torch.stack([streams.randn(model.image_shape) for _ in range(meta["noise_draws"])], 1)
    peaks = []
    hook = plan.model.net.register_forward_hook(lambda m, i, o: peaks.append(float(o.abs().max())))
    out = generate(plan, nn.functional.one_hot(LABELS, model.num_classes).float(), edit=Inpaint(source, FILLS))
    hook.remove()
    down = sum(q == p + 1 for p, q in zip(path, path[1:]))  # the network calls: one per step down
    assert len(peaks) == down
    tol = bound(plan, max(peaks), down, plan.guidance.scale)
    feed = {"noise": noise.numpy(), "labels": LABELS.numpy(), "source": source.permute(0, 2, 3, 1).contiguous().numpy(),
            "fill": FILLS[:, 0].numpy().astype(np.uint8)}
    onnx_images, onnx_pixels = session(onnx_path).run(None, feed)
    assert np.abs(onnx_images - out.images.numpy()).max() <= tol
    kept = ~FILLS[:, 0].numpy()
    assert np.array_equal(onnx_pixels[kept], feed["source"][kept])
    assert (onnx_pixels[~kept] != feed["source"][~kept]).mean() > 0.5  # the rest is drawn
    # the bound tells the walk apart: the same draws without the jumps back (the plain replacement pass)
    if method == "repaint":
        plain = generate(plan, nn.functional.one_hot(LABELS, model.num_classes).float(),
                         edit=Inpaint(source, FILLS, "replace")).images
        assert (plain - out.images).abs().max() > 2 * tol


def test_heun_exports_and_its_graph_equals_generate(exported):
    """Heun unrolls into the graph like every sampler (its two network calls a step, the last step Euler's): on each
    image's own stream the graph makes generate()'s images, within the chain bound of its 2N - 1 calls."""
    ckpt, onnx_path = exported["heun"]
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    # no churn: x_T is the only draw
    assert (meta["sampling"]["sampler"], meta["sampling"]["steps"], meta["noise_draws"]) == ("heun", 4, 1)
    model = load_model(ckpt)
    plan = sampling_spec("heun", 4, None).bind(model)
    contexts = nn.functional.one_hot(LABELS, model.num_classes).float()
    noise = ImageNoise(plan.seed, range(len(LABELS))).randn(model.image_shape)[:, None]
    peaks = []
    hook = plan.model.net.register_forward_hook(lambda m, i, o: peaks.append(float(o.abs().max())))
    try:
        out = generate(plan, contexts)
    finally:
        hook.remove()
    assert len(peaks) == 2 * 4 - 1
    tol = bound(plan, max(peaks), len(peaks), plan.guidance.scale)
    onnx_images, onnx_pixels = session(onnx_path).run(None, {"noise": noise.numpy(), "labels": LABELS.numpy()})
    assert np.isfinite(onnx_images).all() and np.abs(onnx_images - out.images.numpy()).max() <= tol
    assert_pixels_close(onnx_pixels, to_uint8(out.images).permute(0, 2, 3, 1), onnx_images, out.images)

    class Predictor(EulerSampler):  # Heun's levels without its correction: Euler's steps alone
        def times(self, schedule):
            return HeunSampler(4).times(schedule)

    euler = generate(SamplingSpec(Predictor(4), guidance=plan.guidance.scale, precision="32", palette=None).bind(model), contexts)
    assert (euler.images - out.images).abs().max() > 2 * tol  # the bound tells the correction apart


def test_example_regions_are_the_projects():
    read_mask = runpy.run_path(str(EXAMPLE))["read_mask"]
    for name in ("top", "bottom", "left", "right", "center"):
        for size in (16, 32):
            assert np.array_equal(read_mask(name, size, size), region(name, size).numpy().astype(np.uint8))


def test_example_inpaints_a_png_and_keeps_its_pixels(exported, tmp_path):
    _, onnx_path = exported["inpaint_graph"]
    sprite = random_sources(1)[0].permute(1, 2, 0).numpy()
    Image.fromarray(sprite).save(tmp_path / "s.png")
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_path), "--image", str(tmp_path / "s.png"), "--mask", "2,3,9,12",
                             "--label", "weapon", "--n", "3", "--scale", "1", "--out", str(out), "--threads", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = np.asarray(Image.open(out))
    assert grid.shape == (17 + 1, 4 * 17 + 1, 3)  # the source, then 3 results, 16 px each with 1 px gaps
    fill = np.zeros((16, 16), bool)
    fill[3:12, 2:9] = True
    results = [grid[1:17, 1 + 17 * j : 17 + 17 * j] for j in range(1, 4)]
    assert all(np.array_equal(r[~fill], sprite[~fill]) for r in results)  # after the palette stage too
    magenta = np.array([255, 0, 255])
    assert np.array_equal(grid[1:17, 1:17][fill], np.round((sprite[fill] + magenta) / 2))  # the source, its fill tinted as edit.py does


def imported_modules(stderr: str) -> set[str]:
    # -X importtime: "import time: self | cumulative | module" per import
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:") and "|" in line}


def test_example_makes_a_png_without_torch(exported, tmp_path):
    _, onnx_path = exported["diffusion"]
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-X", "importtime", str(EXAMPLE), str(onnx_path), "--label", "all", "--n", "2",
                             "--seed", "3", "--out", str(out), "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = imported_modules(result.stderr)
    assert "onnxruntime" in modules and not [m for m in modules if m.split(".")[0] in ("torch", "difflab")]
    grid = np.asarray(Image.open(out))
    assert grid.shape == (6 * 68 + 4, 2 * 68 + 4, 3)  # 6 classes x 2 sprites of 16 px, 4x, 4 px gaps
    sprite = grid[4:68, 4:68]
    assert len(np.unique(sprite.reshape(-1, 3), axis=0)) <= 16  # the palette stage


def test_fixed_batch_unconditional_export(exported, tmp_path):
    _, onnx_path = exported["uncond"]
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    inputs = session(onnx_path).get_inputs()
    assert [i.name for i in inputs] == ["noise"] and inputs[0].shape == [3, meta["noise_draws"], 3, 16, 16]
    assert meta["class_names"] == [] and meta["batch"] == 3 and meta["sampling"]["steps"] == 4
    alone = tmp_path / "alone.onnx"  # no .json beside it: the example reads the record from the graph's metadata
    shutil.copy(onnx_path, alone)
    out = tmp_path / "u.png"
    result = subprocess.run([sys.executable, str(EXAMPLE), str(alone), "--n", "5", "--out", str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.asarray(Image.open(out)).shape == (68 + 4, 5 * 68 + 4, 3)  # 5 sprites from two chunks of the fixed 3


def foreign_graph(path: Path) -> Path:
    """A valid ONNX graph (y = x) that difflab did not export: no record inside, no .json beside it."""
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y"))
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    # the IR version of the exporter's graphs (onnx's own default may be newer than onnxruntime reads)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("graph,args,expected", [
    ("text", [], "notes.onnx is not an ONNX graph onnxruntime can load (Protobuf parsing failed.): give the .onnx that "
                 "python -m difflab.export <checkpoint> <out> --format onnx writes"),
    ("foreign", [], "identity.onnx is an ONNX graph but no difflab sprite generator (no identity.json beside it"),
    ("diffusion", ["--image", "{png}"], "this generator draws from noise: leave out --image, or export one with --inpaint"),
    ("inpaint_graph", [], "this generator inpaints: give --image sprite.png (and --mask)"),
    ("inpaint_graph", ["--image", "{big}"], "is 20x20: this generator draws 16x16 sprites"),
    ("inpaint_graph", ["--image", "{png}", "--mask", "0,0,16,16"], "that keeps some pixels"),
    ("inpaint_graph", ["--image", "{png}", "--mask", "head"], "--mask head: give top, bottom, left, right, center or a box"),
])
def test_example_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys, graph, args, expected):
    files = {"png": tmp_path / "s.png", "big": tmp_path / "big.png"}
    Image.fromarray(random_sources(1)[0].permute(1, 2, 0).numpy()).save(files["png"])
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(files["big"])
    graphs = {name: onnx_path for name, (_, onnx_path) in exported.items()}
    graphs["text"] = tmp_path / "notes.onnx"  # not a graph at all
    graphs["text"].write_text("not an ONNX graph")
    graphs["foreign"] = foreign_graph(tmp_path / "identity.onnx")
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLE))["main"]([str(graphs[graph]), *(a.format(**files) for a in args), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_example_without_onnxruntime_names_the_pin(exported, tmp_path):
    _, onnx_path = exported["diffusion"]
    code = (f"import sys, runpy; sys.modules['onnxruntime'] = None; sys.argv = ['onnx_sprites.py', {str(onnx_path)!r}, "
            f"'--out', {str(tmp_path / 'x.png')!r}]; runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: this example needs onnxruntime: pip install onnxruntime==1.31.1"
    assert not (tmp_path / "x.png").exists()


def test_pins_match_requirements():
    pinned = set((PROJECT_ROOT / "requirements.txt").read_text().split())
    assert set(ONNX_PINS.split()) <= pinned
    assert runpy.run_path(str(EXAMPLE))["ORT_PIN"] in pinned


def run_export(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """python -m difflab.export <args>, as its __main__ runs it (difflab.cli.run), in this process."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: main(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case,args,expected", [
    ("no_ema", [], "holds no EMA weights (trained without callbacks.ema)"),
    ("no_onnx", [], f"--format onnx needs the onnx package: pip install {ONNX_PINS}"),
    ("unknown", ["--sampler", "lms"], "--sampler lms: choose one of auto, consistency, ddim, ddpm, dpmpp, euler, heun, unipc"),
    ("steps", ["--steps", "0"], "steps=0: must be an integer >= 1"),
    ("ckpt_format", ["--steps", "5", "--format", "ckpt"], "--steps set the sampling of an ONNX generator: add --format onnx"),
    ("ckpt_format_inpaint", ["--inpaint", "--format", "ckpt"], "--inpaint set the sampling of an ONNX generator: add --format onnx"),
])
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys, monkeypatch, case, args, expected):
    ckpt = exported["diffusion"][0]
    if case == "no_ema":  # a training checkpoint of a run without the EMA callback: its state_dict is the raw weights
        saved = torch.load(ckpt, weights_only=True)
        del saved["difflab_export"]
        ckpt = tmp_path / "raw.ckpt"
        torch.save(saved, ckpt)
    if case == "no_onnx":
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    out = tmp_path / "out"
    code, err = run_export([str(ckpt), str(out), *(["--format", "onnx"] if not case.startswith("ckpt_format") else []), *args], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err[-2000:]
    assert not list(tmp_path.glob("out*"))
