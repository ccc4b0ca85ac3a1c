"""RepNoise's tiny setup, a fit that records the batches each step used, and the step's loss
computed independently (torch.func, the reference's full-tensor arithmetic, no module code but
the noise-seed convention)."""

from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datamodules.formatting import collate
from helpers.training import alignment_data, fit_steps, tiny_lora
from lightning_modules.repnoise import RepNoiseModule, noise_seed_for


def repnoise_setup(fmt, lr=1.0, n_safe=4, batch_size=4, n_defender=3, **kwargs):
    """The tiny LoRA model, 4 refusal samples (one batch of 4) and 3 defender pairs of varied
    length (one harmful batch of 3): the two batches differ in rows and in width."""
    model = tiny_lora()
    dm = alignment_data(fmt, n_safe, batch_size, n_defender, harm_growth=3)
    kwargs.setdefault("harmful_batch_size", n_defender)
    module = RepNoiseModule(model, optimizer=partial(torch.optim.SGD, lr=lr), **kwargs)
    return model, dm, module


def fixed_batches(fmt, dm):
    """(harmful, harmless): all defender pairs and all alignment samples, in order."""
    pad = fmt.tokenizer.pad_token_id
    harmful = collate([fmt.encode(fmt.prompt(p.prompt), p.answer) for p in dm.defender_pairs], pad)
    harmless = collate([fmt.encode(s["prompt"], s["answer"]) for s in dm.samples], pad)
    return harmful, harmless


class RecordBatches(L.Callback):
    """The (harmless batch, harmful batch) of every step, as the module received them."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append({"harmless": batch})
        if not getattr(module.harmful, "recorded", False):
            draw = module.harmful.next

            def recorded_draw(device):
                drawn = draw(device)
                self.steps[-1]["harmful"] = drawn
                return drawn

            module.harmful.next, module.harmful.recorded = recorded_draw, True


def fit_recording(module, dm, steps):
    record = RecordBatches()
    fit_steps(module, dm, steps, callbacks=[record])
    return record.steps


# --- the independent computation -------------------------------------------------------------------
def loop_mask(ids, attention, other_ids, other_attention):
    """M[b,t] by loops: a real token of `ids` that the other batch does not hold, as a real token,
    at the same (row, column)."""
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.size(0)):
        for t in range(ids.size(1)):
            if not attention[b, t]:
                continue
            inside = b < other_ids.size(0) and t < other_ids.size(1)
            same = inside and bool(other_attention[b, t]) and other_ids[b, t] == ids[b, t]
            mask[b, t] = not same
    return mask


def reference_masked_ce(logits, ids, mask):
    """The reference's masked CE on the full tensors: logits at t times M[t], targets X[t+1]
    ignored where M[t+1] = 0, mean over the rest."""
    shift_logits = logits[:, :-1, :].float() * mask[:, :-1].unsqueeze(-1).float()
    labels = ids[:, 1:].clone()
    labels[~mask[:, 1:]] = -100
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), ignore_index=-100
    )


def reference_mmd(x, y):
    """The MMD of the spec with the [2B, 2B, D] difference tensor."""
    total = torch.cat([x, y])
    n = total.size(0)
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    base = d2.detach().sum() / (n * n - n) / 4
    k = sum(torch.exp(-d2 / (base * 2**i)) for i in range(5))
    b = x.size(0)
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def independent_terms(model, params, harmful, harmless, alpha, beta, ascent_mean, seed, step):
    """The step's loss and parts at `params` (a dict of the trainable tensors) on the tiny
    PEFT-wrapped Llama (paths written out)."""
    llama = model.base_model.model
    layers = llama.model.layers
    m_h = loop_mask(
        harmful["input_ids"],
        harmful["attention_mask"],
        harmless["input_ids"],
        harmless["attention_mask"],
    )
    m_s = loop_mask(
        harmless["input_ids"],
        harmless["attention_mask"],
        harmful["input_ids"],
        harmful["attention_mask"],
    )
    mlp_out = {}
    handles = [
        layer.mlp.register_forward_hook(lambda mod, a, o, i=i: mlp_out.__setitem__(i, o))
        for i, layer in enumerate(layers)
    ]
    try:
        out = functional_call(
            model,
            params,
            (harmful["input_ids"],),
            {"attention_mask": harmful["attention_mask"], "output_hidden_states": True},
        )
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(noise_seed_for(seed, step))
    m = m_h.unsqueeze(-1).float()
    mmds = []
    for i in range(len(layers)):
        hidden = mlp_out[i] * m
        z = torch.randn(hidden.shape, generator=gen) * m
        mmds.append(reference_mmd(hidden.reshape(hidden.size(0), -1), z.reshape(z.size(0), -1)))
    noise = sum(mmds) / len(mmds)
    l0 = reference_masked_ce(out.logits, harmful["input_ids"], m_h)
    lens = [
        reference_masked_ce(llama.lm_head(llama.model.norm(h)), harmful["input_ids"], m_h)
        for h in out.hidden_states
    ]
    n = len(out.hidden_states)
    if ascent_mean == "reference":
        h_bar = (l0 + sum(lens)) / n + 1
    else:
        h_bar = (l0 + sum(lens)) / (n + 1)
    logits_s = functional_call(
        model, params, (harmless["input_ids"],), {"attention_mask": harmless["attention_mask"]}
    ).logits
    ls = reference_masked_ce(logits_s, harmless["input_ids"], m_s)
    loss = ls + beta * noise - alpha * torch.log(h_bar)
    return {
        "loss": loss,
        "harmless_loss": ls,
        "harmful_loss": l0,
        "noise": noise,
        "ascent_mean": h_bar,
        "lens": lens,
    }


def trainable_copy(model):
    return {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
