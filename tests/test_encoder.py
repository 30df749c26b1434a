import pytest
import torch

from captioner.encoder import Encoder, EncoderConfig, load_state_dict_file
from tests.conftest import tiny_encoder_config


@pytest.mark.parametrize(
    "config, dim, grid",
    [
        (EncoderConfig(name="small_cnn", input_size=64, grid_size=0, width=8), 32, (8, 8)),
        (EncoderConfig(name="small_cnn", input_size=64, grid_size=3, width=8), 32, (3, 3)),
        (EncoderConfig(name="resnet18", input_size=64, grid_size=2), 512, (2, 2)),
        (EncoderConfig(name="resnet50", input_size=64, grid_size=0), 2048, (2, 2)),
        (EncoderConfig(name="vgg16", input_size=64, grid_size=0), 512, (4, 4)),
        (EncoderConfig(name="efficientnet_lite0", input_size=64, grid_size=2), 1280, (2, 2)),
    ],
    ids=lambda c: getattr(c, "name", None),
)
def test_grid_and_pooled_shapes(config, dim, grid):
    enc = Encoder(config, load_weights=False).eval()
    with torch.no_grad():
        g, pooled = enc(torch.randn(2, 3, config.input_size, config.input_size))
    assert g.shape == (2, grid[0] * grid[1], dim)
    assert pooled.shape == (2, dim)
    assert enc.grid_hw == grid and enc.feature_dim == dim
    torch.testing.assert_close(pooled, g.mean(1))


def test_packaged_efficientnet_weights_load_offline():
    enc = Encoder(EncoderConfig(name="efficientnet_lite0", input_size=64, weights="imagenet"))
    fresh = Encoder(EncoderConfig(name="efficientnet_lite0", input_size=64), load_weights=False)
    a = enc.blocks[0][0].weight
    b = fresh.blocks[0][0].weight
    assert not torch.equal(a, b)
    assert enc.frozen


def test_local_state_dict_file_loads(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    for name in ("r18.pth", "r18.safetensors"):
        enc = Encoder(EncoderConfig(name="resnet18", input_size=64, weights=str(tmp_path / name)))
        assert torch.equal(enc.blocks[0][0].weight, ref.conv1.weight)


def test_weights_file_that_is_a_pickled_object_is_refused(tmp_path):
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(ValueError, match="plain tensors"):
        load_state_dict_file(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pth")


def test_fine_tune_blocks_controls_trainable_params_and_frozen_batchnorm_stays_eval():
    enc = Encoder(tiny_encoder_config(fine_tune_blocks=1))
    trainable = [any(p.requires_grad for p in b.parameters()) for b in enc.blocks]
    assert trainable == [False, False, True]
    enc.train()
    assert not enc.blocks[0].training and enc.blocks[2].training


@pytest.mark.parametrize("bad", [dict(name="alexnet"), dict(grid_size=-1), dict(input_size=4)])
def test_bad_config_names_the_value(bad):
    with pytest.raises(ValueError, match=str(list(bad.values())[0])):
        EncoderConfig(**bad)


def test_wrong_image_shape_is_a_clear_error():
    enc = Encoder(tiny_encoder_config())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.randn(2, 1, 32, 32))


def _blur(enc: Encoder) -> Encoder:
    """The encoder's geometry (kernels, strides, padding) with every kernel an average: a feature
    then answers most to what lies nearest its receptive field's centre."""
    with torch.no_grad():
        for module in enc.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
    return enc.eval()


def _receptive_centre(enc: Encoder, size: int, cell: int) -> tuple[float, float]:
    """Where grid cell (cell, cell) of the native grid looks, in pixels: the centroid of the
    gradient of its output with respect to the image, through the encoder's geometry alone."""
    torch.manual_seed(0)  # small positive noise: max-pool ties broken, ReLU6 never saturated
    images = (0.01 * (1 + torch.rand(4, 3, size, size))).requires_grad_()
    grid, _ = _blur(enc)(images)
    side = enc.grid_hw[0]
    grid[:, cell * side + cell].sum().backward()
    weight = images.grad.abs().sum((0, 1)).double()  # (H, W)
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    return (
        float((weight.sum(1) * centres).sum() / weight.sum()),
        float((weight.sum(0) * centres).sum() / weight.sum()),
    )


@pytest.mark.parametrize(
    "name, size",
    [("small_cnn", 72), ("resnet18", 224), ("vgg16", 48), ("efficientnet_lite0", 224)],
)
def test_each_grid_cell_looks_where_the_overlay_draws_it(name, size):
    """Cell i of an h-cell grid is drawn over pixels [i, i + 1) * size / h: its receptive field
    is centred there (within a tenth of a cell), where it was about half a cell up-left
    (down-right for EfficientNet) before. The sizes give
    an odd grid, so the middle cell's field is cut by the image's borders alike on each side."""
    config = EncoderConfig(name=name, input_size=size, grid_size=0, width=8)
    stride = size / Encoder(config, load_weights=False).grid_hw[0]
    cell = int(size / stride) // 2
    nominal = (cell + 0.5) * stride
    centred = _receptive_centre(Encoder(config, load_weights=False).eval(), size, cell)
    assert all(abs(c - nominal) < 0.1 * stride for c in centred), (centred, nominal)
    if name != "vgg16":  # VGG's max-pools tile exactly; the others were off by ~0.4 cells
        legacy = EncoderConfig(name=name, input_size=size, grid_size=0, width=8, centred=False)
        before = _receptive_centre(Encoder(legacy, load_weights=False).eval(), size, cell)
        assert all(abs(c - nominal) > 0.3 * stride for c in before), (before, nominal)


@pytest.mark.parametrize("centred", [True, False])
def test_a_dot_in_a_cell_excites_that_cell_most(centred):
    """Dots a quarter and three quarters across each inner cell of the small CNN's 8 x 8 grid (the
    border cells' fields reach into the zero padding, which dims them): the cell whose features
    answer most is the dot's own; before `centred`, every 3/4 dot lit the next cell."""
    config = EncoderConfig(name="small_cnn", input_size=64, grid_size=0, width=4, centred=centred)
    enc = _blur(Encoder(config, load_weights=False))
    blank = torch.zeros(1, 3, 64, 64)
    wrong = []
    with torch.no_grad():
        base = enc(blank)[0]
        for i in range(1, 7):
            for frac in (0.25, 0.75):
                y = x = int((i + frac) * 8)
                dot = blank.clone()
                dot[..., y : y + 1, x : x + 1] = 1.0
                change = (enc(dot)[0] - base).abs().sum(2).view(8, 8)
                peak = divmod(int(change.argmax()), 8)
                if peak != (i, i):
                    wrong.append((i, frac, peak))
    if centred:
        assert wrong == []
    else:
        said = {(i, frac) for i, frac, _ in wrong}  # (the last one's next cell is dimmed)
        assert {(i, 0.75) for i in range(1, 6)} <= said <= {(i, 0.75) for i in range(1, 7)}


def test_a_folder_saved_before_centred_existed_keeps_its_grid():
    saved = EncoderConfig(name="small_cnn", input_size=64).to_dict()
    del saved["centred"]
    assert EncoderConfig.from_dict(saved).centred is False
    assert EncoderConfig.from_dict({**saved, "centred": True}).centred is True
