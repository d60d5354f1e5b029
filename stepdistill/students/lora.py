"""LoRA students and critics through peft: adding adapters, switching them off, and a network's base as a module."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from stepdistill.config.schema import UNET_LORA_TARGETS


def add_lora(backbone: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Freeze the backbone and add a peft LoRA adapter (named "default") on the target modules."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {n for n, _ in backbone.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"none of the LoRA targets {targets} exist in {type(backbone).__name__}")
    backbone.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=present)
    if hasattr(backbone, "add_adapter"):  # diffusers models with peft integration (add_adapter, save/load)
        backbone.add_adapter(config)
        return backbone
    return inject_adapter_in_model(config, backbone)  # MLPs, and diffusers models without it (PixArt)


def is_diffusers_model(net: nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(net, ModelMixin)


def lora_targets(backbone: nn.Module) -> list[str]:
    """Default LoRA targets of a backbone: the diffusers recipe's for UNets and transformers, every Linear layer
    of the analytic benches' MLP (whose layer names the recipe's do not match)."""
    if is_diffusers_model(backbone):
        return list(UNET_LORA_TARGETS)
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]


def adapter_layers(net: nn.Module) -> list[nn.Module]:
    """The peft adapter layers (LoRA-wrapped Linear / Conv modules) of `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights of `net` in peft naming (lora_A / lora_B), empty when it has none."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(net) if adapter_layers(net) else {}


def load_adapter_state_dict(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load LoRA weights saved by `adapter_state_dict` into `net`'s adapter; every key and shape must match."""
    from peft.utils import set_peft_model_state_dict

    expected = adapter_state_dict(net)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"the LoRA weights do not fit this adapter ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(reshaped)} of another shape, e.g. {(missing + unexpected + reshaped)[:2]}):"
                         " use an adapter of the same rank and targets")
    set_peft_model_state_dict(net, state)


def adapters_to_fp32(net: nn.Module) -> nn.Module:
    """Adapter weights in fp32 (peft creates them in the base layer's dtype, bf16 on a bf16 teacher)."""
    for layer in adapter_layers(net):
        for name in layer.adapter_layer_names:
            getattr(layer, name).float()
    return net


@contextmanager
def adapters_off(net: nn.Module) -> Iterator[nn.Module]:
    """`net` computing with its base weights only: peft's `enable_adapters(False)` on every adapter layer, then each
    layer's previous state and each parameter's requires_grad flag restored (peft's `enable_adapters(True)` would
    mark every adapter trainable, even inside a `frozen(...)` block)."""
    layers = adapter_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no peft adapters to switch off")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer, on in zip(layers, enabled):
            layer.enable_adapters(on)
        for p, flag in flags:
            p.requires_grad_(flag)


class BaseNetwork(nn.Module):
    """The base of a network with peft adapters, as a module of its own: every call runs with the adapters off.
    It holds `net` itself, not a copy, so the base weights exist once."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not adapter_layers(net):
            raise ValueError(f"{type(net).__name__} has no peft adapters: BaseNetwork would be the network itself")
        self.net = net

    @property
    def config(self):
        """The diffusers config of the network (teachers read sample_size, in_channels from it)."""
        return self.net.config

    def forward(self, *args, **kwargs):
        with adapters_off(self.net):
            return self.net(*args, **kwargs)


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval()
