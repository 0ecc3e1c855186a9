"""timm's ResNets in the zoo: parameter counts, weights both ways against timm's and
torchvision's own model code, timm's published form (model.safetensors + config.json, a
local Hugging Face cache) and its preprocessing, `Run.export` back to PyTorch."""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.convert import ConversionError
from resnet_jax.convert import timm as timm_convert
from resnet_jax.convert import torchvision as tv_convert
from resnet_jax.convert.torchvision import torchvision_models
from resnet_jax.models import get_model, get_spec

from conftest import param_count, rngs
from test_convert import randomized_batch_norm, rel_err

pytestmark = pytest.mark.torch

TOL = 1e-4  # float32 against float32 through ~50 layers: measured 5e-7 to 1.4e-6
NEW = ("resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d", "resnet152d",
       "resnet50c", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
       "resnext101_32x8d", "resnext101_64x4d")


def timm_package():
    """timm, importable beside the CPU build of torch (torchvision entered without its C
    extension, as `torchvision_models` does)."""
    torchvision_models()
    import timm

    return timm


def randomized_timm_model(name: str, num_classes: int, seed: int = 0):
    """timm's model with random weights and BatchNorm statistics far from (0, 1), eval mode."""
    import torch

    torch.manual_seed(seed)
    return randomized_batch_norm(
        timm_package().create_model(name, pretrained=False, num_classes=num_classes))


def torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def load_strict(model, state_dict: dict) -> None:
    import torch

    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                          strict=True)


@pytest.mark.parametrize("name", NEW)
def test_the_new_zoo_models_have_timms_and_torchvisions_parameter_counts(name):
    import torch

    shape = jax.ShapeDtypeStruct((1, *get_spec(name).input_shape), jnp.float32)
    ours = param_count(jax.eval_shape(get_model(name).init, rngs(), shape)["params"])
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        theirs = timm_package().create_model(name, pretrained=False)
        assert ours == sum(p.numel() for p in theirs.parameters())
        if name in tv_convert.MODELS:
            tv = getattr(torchvision_models(), name)()
            assert ours == sum(p.numel() for p in tv.parameters())


# plain (torchvision's names), D (deep stem, pooled shortcut; 80 px makes the last
# downsampling pool meet an odd 5x5 map: PyTorch's ceil_mode), wide, ResNeXt (grouped 3x3)
PARITY = [("resnet18", 64), ("resnet26d", 80), ("wide_resnet50_2", 64), ("resnext50_32x4d", 64)]


@pytest.mark.parametrize("name,size", PARITY)
def test_timm_weights_give_timms_logits_and_go_back_to_timm_and_torchvision(name, size):
    model = randomized_timm_model(name, num_classes=10)
    x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    expected = torch_logits(model, x)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    variables = timm_convert.convert(state_dict, name)
    ours = np.asarray(get_model(name, num_classes=10).apply(variables, jnp.asarray(x)))
    errors = {"timm -> resnet_jax": rel_err(ours, expected)}

    back = timm_convert.export(variables, name)
    assert set(back) == set(state_dict)
    fresh = timm_package().create_model(name, pretrained=False, num_classes=10).eval()
    load_strict(fresh, back)
    errors["resnet_jax -> timm"] = rel_err(torch_logits(fresh, x), expected)
    if name in tv_convert.MODELS:
        tv = getattr(torchvision_models(), name)(num_classes=10).eval()
        load_strict(tv, tv_convert.export(variables, name))
        errors["resnet_jax -> torchvision"] = rel_err(torch_logits(tv, x), expected)
    print(f"{name} {size}x{size}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(v < TOL for v in errors.values()), errors


def test_conversion_names_the_tensor_both_ways():
    model = randomized_timm_model("resnet18d", num_classes=4)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    del state_dict["layer2.0.downsample.1.weight"]
    with pytest.raises(ConversionError, match=r"lacks 'layer2.0.downsample.1.weight'"):
        timm_convert.convert(state_dict, "resnet18d")
    with pytest.raises(ValueError, match=r"timm layouts exist for"):
        timm_convert.convert(state_dict, "alexnet")
    variables = timm_convert.convert(
        {k: v.numpy() for k, v in model.state_dict().items()}, "resnet18d")
    del variables["params"]["layer1_0"]["conv1"]
    with pytest.raises(ConversionError, match=r"lack params/layer1_0/conv1/kernel"):
        timm_convert.export(variables, "resnet18d")
    with pytest.raises(ValueError, match=r"torchvision layouts exist for"):
        tv_convert.export(variables, "resnet18d")


# --- timm's published form, the local Hugging Face cache --------------------------------

A1_CFG = {"interpolation": "bicubic", "crop_pct": 0.95, "test_input_size": (3, 288, 288),
          "test_crop_pct": 1.0, "mean": (0.5, 0.45, 0.4), "std": (0.25, 0.24, 0.23)}


def hub_entry(cache: str, repo: str, model, cfg: dict) -> str:
    """`repo` in a Hugging Face hub cache under `cache` as huggingface_hub lays it out
    (refs/main naming a snapshot), written by timm's own save_for_hf."""
    import torch  # noqa: F401 - timm saves through it

    from timm.models import save_for_hf

    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(folder, "snapshots", "0123abcd")
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg}
    save_for_hf(model, snapshot, safe_serialization=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write("0123abcd")
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A local hub cache holding timm/resnet18d.test (5 classes, A1's preprocessing with
    distinctive mean and std), HF_HUB_CACHE pointing at it for the module's tests."""
    cache = str(tmp_path_factory.mktemp("hub"))
    model = randomized_timm_model("resnet18d", num_classes=5, seed=3)
    hub_entry(cache, "timm/resnet18d.test", model, A1_CFG)
    before = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = cache
    yield cache, {k: v.numpy() for k, v in model.state_dict().items()}
    if before is None:
        os.environ.pop("HF_HUB_CACHE", None)
    else:
        os.environ["HF_HUB_CACHE"] = before


def test_a_timm_checkpoint_loads_from_the_hub_cache_with_its_preprocessing(hub_cache, tmp_path):
    cache, state_dict = hub_cache
    variables, info = timm_convert.load("hf-hub:timm/resnet18d.test")
    expected = timm_convert.convert(state_dict, "resnet18d")
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    assert info["model"] == "resnet18d" and info["num_classes"] == 5
    pre = info["preprocess"]
    assert pre["crop"] == 224 and pre["resize"] == 235 and pre["crop_pct"] == 0.95
    assert pre["interpolation"] == "bicubic" and pre["mean"] == (0.5, 0.45, 0.4)
    assert pre["test_crop"] == 288 and pre["test_crop_pct"] == 1.0
    # the same from the snapshot directory itself
    again, _ = timm_convert.load(info["directory"])
    jax.tree.map(np.testing.assert_array_equal, again, expected)
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache .*runs "
                                                r"never download.*hf download timm/resnet50"):
        timm_convert.load("hf-hub:timm/resnet50.a1_in1k")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or config.json"):
        timm_convert.load(str(tmp_path))
    # the command line converts it too, recording the preprocessing that runs then apply
    from experiments import convert_weights

    out = tmp_path / "converted"
    assert convert_weights.main(["--from", "timm", "--input", "hf-hub:timm/resnet18d.test",
                                 "--output", str(out)]) == 0
    recorded = json.loads((out / "conversion.json").read_text())
    assert recorded["model"] == "resnet18d" and recorded["preprocess"]["crop_pct"] == 0.95


def test_the_evaluation_crop_of_a_timm_entry_matches_timms_own_transform():
    """A JPEG photograph through this pipeline's evaluation crop with timm/resnet50.a1_in1k's
    preprocessing (bicubic, crop_pct 0.95: resize to 235, centre 224) against timm's
    resolve_data_config + create_transform. Measured mean differences: 0.89-1.64 grey levels
    of 255 over five photographs. What differs: this pipeline decodes with libjpeg's fast
    integer IDCT (tf.data's default; 0.95 grey levels from the accurate one on such photos)
    and, where the crop keeps twice the output's size, at half scale (the 512-pixel
    astronaut: 1.64)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from benchmarks.jpeg_folder import PHOTOS, photographs
    from resnet_jax.data import images

    cfg = {**timm_package().create_model("resnet50", pretrained=False).pretrained_cfg,
           "interpolation": "bicubic", "crop_pct": 0.95}
    pre = timm_convert.preprocess_of(cfg)
    theirs = create_transform(**resolve_data_config(pretrained_cfg=cfg))
    means = []
    for name, photo in list(zip(PHOTOS, photographs()))[:5]:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=95)
        data = buffer.getvalue()
        reference = theirs(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        reference = reference.transpose(1, 2, 0) * np.array(pre["std"]) + np.array(pre["mean"])
        ours = images.crop_resize(
            data, name, pre["crop"],
            lambda h, w: images.center_crop_box(h, w, pre["crop_pct"], pre["crop"]),
            interpolation=pre["interpolation"])
        assert ours.shape == reference.shape == (224, 224, 3)
        means.append(float(np.abs(ours / 255.0 - reference).mean() * 255))
    assert max(means) < 2.5, means


# --- a run from timm's weights, and back ------------------------------------------------

@pytest.fixture(scope="module")
def timm_run(hub_cache, tmp_path_factory):
    """Two steps of a resnet18d fine-tuned from hf-hub:timm/resnet18d.test (the learning rate
    tiny: the weights stay the cached ones) on a folder of JPEGs."""
    import resnet_jax
    from benchmarks.jpeg_folder import write_folder

    root = tmp_path_factory.mktemp("timm_run")
    folder = write_folder(str(root / "photos"), train=16, val=8, classes=4)
    workdir = str(root / "run")
    config = resnet_jax.load_config(
        "imagenet_resnet50", model="resnet18d", dataset="image_folder", data_dir=folder,
        eval_split="test", init_from="hf-hub:timm/resnet18d.test", image_size=64, batch_size=8,
        eval_batch_size=8, num_steps=2, warmup_epochs=0.0, learning_rate=1e-12,
        weight_decay=0.0, validation_split=0.0, progress_bar=False, cpu_kernels=True,
        dtype="float32")
    resnet_jax.train(config, workdir)
    return workdir


def test_a_run_from_the_hub_cache_starts_from_its_weights_and_preprocessing(timm_run, hub_cache):
    import resnet_jax

    run = resnet_jax.Run.load(timm_run)
    c = run.config
    assert tuple(c.input_mean) == (0.5, 0.45, 0.4) and tuple(c.input_std) == (0.25, 0.24, 0.23)
    assert c.eval_crop_pct == 0.95 and c.interpolation == "bicubic"
    cached = timm_convert.convert(hub_cache[1], "resnet18d")
    # the backbone is the cached one (a step of 1e-12 moves nothing measurable); the head of
    # 5 classes met a folder of 4 and was initialised afresh
    np.testing.assert_allclose(run.variables["params"]["stem_conv1"]["kernel"],
                               cached["params"]["stem_conv1"]["kernel"], atol=1e-6)
    assert run.variables["params"]["fc"]["kernel"].shape == (512, 4)


def test_run_export_goes_back_to_timm_strict_with_the_runs_preprocessing(timm_run, tmp_path):
    import resnet_jax
    from safetensors.numpy import load_file

    run = resnet_jax.Run.load(timm_run)
    out = run.export(str(tmp_path / "export"))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["architecture"] == "resnet18d" and config["num_classes"] == 4
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == [0.5, 0.45, 0.4] and cfg["crop_pct"] == 0.95
    assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == [3, 64, 64]
    model = timm_package().create_model("resnet18d", pretrained=False, num_classes=4).eval()
    load_strict(model, load_file(os.path.join(out, "model.safetensors")))
    photos = np.random.default_rng(0).integers(0, 256, (2, 80, 96, 3), dtype=np.uint8)
    x = run.preprocess(photos)
    ours = np.asarray(run.model.apply(run.variables, jnp.asarray(x)))
    assert rel_err(torch_logits(model, x), ours) < TOL
    # timm reads the directory as a pretrained checkpoint with its config
    assert timm_convert.read_config(out)["pretrained_cfg"]["crop_pct"] == 0.95
    with pytest.raises(ValueError, match=r"torchvision layouts exist for"):
        run.export(str(tmp_path / "tv"), layout="torchvision")
    with pytest.raises(ValueError, match=r"layout='onnx'; expected one of"):
        run.export(str(tmp_path / "x"), layout="onnx")
