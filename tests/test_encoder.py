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
