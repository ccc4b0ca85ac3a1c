"""Where a defense hooks into a transformer, found by the model's structure (not by class name),
and forward hooks that are always removed: shared by Vaccine, T-Vaccine, RepNoise, LDIFS and
Antidote's calibration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from plumbing.errors import InputError

# hook_target -> the names that submodule has in the decoder layers of the HF architectures
# (Llama, Mistral, Qwen2, Gemma/Gemma2: self_attn / mlp; GPT-2: attn / mlp; Falcon, Bloom:
# self_attention / mlp); `layer` is the decoder layer itself.
HOOK_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn", "attn", "self_attention", "attention"),
    "mlp": ("mlp", "feed_forward"),
    "layer": (),
}


def decoder_stack(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the module that holds the decoder layers, the layers): the first ModuleList with
    config.num_hidden_layers entries."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return model.get_submodule(name.rpartition(".")[0]), module
    raise InputError(
        f"{type(model).__name__} has no list of {n} decoder layers (config.num_hidden_layers); "
        "this defense needs a decoder-only transformer"
    )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers."""
    return list(decoder_stack(model)[1])


def hooked_modules(model: torch.nn.Module, target: str) -> list[torch.nn.Module]:
    """One submodule per decoder layer: the `target` child of each layer (or the layer itself)."""
    layers = decoder_layers(model)
    if target == "layer":
        return layers
    found = []
    for i, layer in enumerate(layers):
        children = dict(layer.named_children())
        name = next((n for n in HOOK_TARGETS[target] if n in children), None)
        if name is None:
            raise InputError(
                f"decoder layer {i} ({type(layer).__name__}) has no {target} submodule named any of "
                f"{HOOK_TARGETS[target]}; its children are {list(children)}"
            )
        found.append(children[name])
    return found


def _main_output(output):
    return output[0] if isinstance(output, tuple) else output


def _with_main_output(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


@contextmanager
def forward_hooks(modules: list[torch.nn.Module], hook_for: Callable) -> Iterator[None]:
    """During the block, module l runs the forward hook `hook_for(l)`; the hooks are removed on
    exit, also when the block raises."""
    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def recording_outputs(modules: list[torch.nn.Module], outputs: list):
    """During the block, any forward pass stores the output of module l (its main tensor, with
    its graph) in outputs[l]."""

    def hook_for(index):
        def hook(module, args, output):
            outputs[index] = _main_output(output)

        return hook

    return forward_hooks(modules, hook_for)


def recording_output_grads(modules: list[torch.nn.Module], grads: list):
    """During the block, the backward of any forward pass stores ∂loss/∂(output of module l) in
    grads[l] (the output's main tensor)."""

    def hook_for(index):
        def store(grad):
            grads[index] = grad.detach()

        def hook(module, args, output):
            _main_output(output).register_hook(store)  # a tensor hook: no module hook is left

        return hook

    return forward_hooks(modules, hook_for)


def perturbed_outputs(modules: list[torch.nn.Module], epsilon: list[torch.Tensor]):
    """During the block, module l returns its output + epsilon[l]."""

    def hook_for(index):
        return lambda module, args, output: _with_main_output(
            output, _main_output(output) + epsilon[index]
        )

    return forward_hooks(modules, hook_for)
