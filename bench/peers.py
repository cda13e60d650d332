"""The peers layerscope is timed against, written the way a researcher writes them by hand
on top of TransformerLens, nnsight or plain transformers, batch by batch over the same
windows.

Each returns its answer as a flat dict of named numbers, so that the benchmark can check
it against layerscope's before it compares times.  Peers time only their library calls
(their bookkeeping runs outside the clock), which makes every ratio against them strict.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from jaxtyping import Float

# TransformerLens's names for the residual stream around block `layer`.
TL_RESIDUAL_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class HandMoments:
    """Per (point, layer), in float64: the mean L2 norm and the unbiased variance over the
    dims of every non-first position, and the largest |x| over all positions."""

    def __init__(self):
        # tokens, sum of norms, elements, sum, sum of squares, max |x|
        self.sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0, 0.0])

    def add(self, point: str, layer: int, x: Float[torch.Tensor, "batch pos d_model"]) -> None:
        rest = x[:, 1:].double()
        s = self.sums[(point, layer)]
        s[0] += rest.shape[0] * rest.shape[1]
        s[1] += rest.norm(dim=-1).sum().item()
        s[2] += rest.numel()
        s[3] += rest.sum().item()
        s[4] += rest.square().sum().item()
        s[5] = max(s[5], x.abs().max().item())

    def values(self) -> dict[str, float]:
        out = {}
        for (point, layer), (tokens, sum_norm, elements, sum_x, sum_x_sq, max_abs) in self.sums.items():
            mean = sum_x / elements
            out[f"{point}.{layer}.mean_norm"] = sum_norm / tokens
            out[f"{point}.{layer}.variance"] = (sum_x_sq - elements * mean * mean) / (elements - 1)
            out[f"{point}.{layer}.max_abs"] = max_abs
        return out


@torch.no_grad()
def transformer_lens_residuals(bridge, windows, n_layers: int, filtered: bool) -> tuple[float, dict[str, float]]:
    """`run_with_cache` per batch, either with a `names_filter` for the residual hooks or
    caching every hook; the residual statistics come from the cache."""
    names = {template.format(layer=layer): (point, layer)
             for point, template in TL_RESIDUAL_HOOKS.items() for layer in range(n_layers)}
    stats, seconds = HandMoments(), 0.0
    for input_ids in windows:
        started = time.perf_counter()
        if filtered:
            _, cache = bridge.run_with_cache(input_ids, names_filter=lambda name: name in names)
        else:
            _, cache = bridge.run_with_cache(input_ids)
        seconds += time.perf_counter() - started
        for name, (point, layer) in names.items():
            stats.add(point, layer, cache[name])
        del cache
    return seconds, stats.values()


@torch.no_grad()
def nnsight_layer_outputs(envoy, windows) -> tuple[float, dict[str, float]]:
    """One nnsight trace per batch saving every decoder layer's output (resid_post)."""
    stats, seconds = HandMoments(), 0.0
    for input_ids in windows:
        saved = []
        started = time.perf_counter()
        with envoy.trace(input_ids):
            for layer in envoy.model.layers:
                saved.append(layer.output.save())
        seconds += time.perf_counter() - started
        for layer, output in enumerate(saved):
            stats.add("resid_post", layer, _tensor(output))
    return seconds, stats.values()


@torch.no_grad()
def hf_hidden_states(model, windows) -> tuple[float, dict[str, float]]:
    """A plain HF forward with `output_hidden_states`; entry l is block l's input.  The
    last entry is after the final norm, so it is not a block's residual and is left out."""
    stats, seconds = HandMoments(), 0.0
    for input_ids in windows:
        started = time.perf_counter()
        hidden = model(input_ids, output_hidden_states=True).hidden_states
        seconds += time.perf_counter() - started
        for layer, x in enumerate(hidden[:-1]):
            stats.add("resid_pre", layer, x)
    return seconds, stats.values()


@torch.no_grad()
def shortgpt_block_influence(model, windows) -> list[float]:
    """ShortGPT's loop (Men et al. 2024): 1 - mean cosine of consecutive HF hidden states.
    Its last entry compares the last block's input with the output after the final norm."""
    cos_sums, count = None, 0
    for input_ids in windows:
        hidden = model(input_ids, output_hidden_states=True).hidden_states
        batch = torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).sum()
                             for a, b in zip(hidden[:-1], hidden[1:])])
        cos_sums = batch if cos_sums is None else cos_sums + batch
        count += input_ids.numel()
    return (1 - cos_sums / count).tolist()


@torch.no_grad()
def nnsight_skip_sweep(envoy, windows, n_layers: int, skipped_layers: list[int] | None = None) -> dict[str, float]:
    """The naive sweep: per batch one clean trace, then one trace per layer with that layer
    `.skip()`ped (its input passed through as its output).  Token sums over next-token
    positions of cross-entropy, KL(clean || skipped), top-1 agreement, the change of the
    final residual, and each later block's change of contribution, as means."""
    sums: dict[str, float] = defaultdict(float)
    tokens = 0
    for input_ids in windows:
        layers = envoy.model.layers
        clean, saved = [], {}
        with envoy.trace(input_ids):
            for layer in layers:
                clean.append((layer.input.save(), layer.output.save()))
            saved["logits"] = envoy.output.logits.save()
        clean_logits = saved["logits"]
        clean_contribs = [(_tensor(out) - x)[:, 1:].double() for x, out in clean]
        clean_final = _tensor(clean[-1][1])[:, 1:].double()
        reference = torch.log_softmax(clean_logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        for skipped in range(n_layers) if skipped_layers is None else skipped_layers:
            later = []
            with envoy.trace(input_ids):
                saved["passed"] = layers[skipped].input.save()
                layers[skipped].skip(saved["passed"])
                for m in range(skipped + 1, n_layers):
                    later.append((layers[m].input.save(), layers[m].output.save()))
                saved["logits"] = envoy.output.logits.save()
            logits = saved["logits"]
            final = later[-1][1] if later else saved["passed"]
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            sums[f"{skipped}.ce_skipped"] += -logprobs.gather(-1, targets[..., None]).sum().item()
            sums[f"{skipped}.kl"] += (reference.exp() * (reference - logprobs)).sum().item()
            sums[f"{skipped}.top1_agreement"] += (logprobs.argmax(-1) == reference.argmax(-1)).sum().item()
            change = (_tensor(final)[:, 1:].double() - clean_final).norm(dim=-1) / clean_final.norm(dim=-1)
            sums[f"{skipped}.final_change"] += change.sum().item()
            for m, (x, out) in enumerate(later, start=skipped + 1):
                delta = ((_tensor(out) - x)[:, 1:].double() - clean_contribs[m]).norm(dim=-1)
                sums[f"{skipped}.future.{m}"] += (delta / clean_contribs[m].norm(dim=-1)).sum().item()
        tokens += targets.numel()
    return {key: value / tokens for key, value in sums.items()}


@torch.no_grad()
def hf_forward(model, windows) -> float:
    """Seconds of one plain HF forward (with the logits) over every batch."""
    seconds = 0.0
    for input_ids in windows:
        started = time.perf_counter()
        model(input_ids)
        seconds += time.perf_counter() - started
    return seconds


@torch.no_grad()
def hf_base_model(model, windows) -> tuple[float, dict[str, float]]:
    """The base model's forward (`model.model`: every block and the final norm, no
    unembedding) with `output_hidden_states`: what any capture of the residual stream
    must at least run.  Statistics as `hf_hidden_states`."""
    stats, seconds = HandMoments(), 0.0
    for input_ids in windows:
        started = time.perf_counter()
        hidden = model.model(input_ids, output_hidden_states=True).hidden_states
        seconds += time.perf_counter() - started
        for layer, x in enumerate(hidden[:-1]):
            stats.add("resid_pre", layer, x)
    return seconds, stats.values()


@torch.no_grad()
def logit_lens_before(loaded, windows) -> tuple[float, dict[str, float]]:
    """layerscope's logit lens as it was before chunking (kept as the peer its successor
    is timed against): a full forward with the logits, then per layer the whole batch's
    [tokens x vocab] logits, their log-softmax, and the KL against the final distribution's
    log-probabilities and probabilities prepared once per batch; also the first window's
    top-token grid.  Per layer, mean CE, top-1 accuracy and KL to the final distribution."""
    from layerscope.probes.backends import get_backend, points
    from layerscope.probes.replay import unembed

    wanted = points(["resid_post"], loaded.n_layers)
    runner = get_backend("hooks", loaded)
    sums = torch.zeros(loaded.n_layers, 3, dtype=torch.float64)
    tokens, seconds = 0, 0.0
    for index, input_ids in enumerate(windows):
        started = time.perf_counter()
        logits, acts = runner.run(loaded, input_ids, wanted)
        targets = input_ids[:, 1:]
        final = torch.log_softmax(logits[:, :-1], dim=-1)
        final_probs = final.exp()
        final.argmax(-1)  # the replaced code prepared the final top-1 with the distribution
        for layer, point in enumerate(wanted):
            lens = unembed(loaded, acts[point])
            logprobs = torch.log_softmax(lens[:, :-1], dim=-1)
            top = logprobs.argmax(-1)
            sums[layer, 0] += -logprobs.gather(-1, targets[..., None]).sum().item()
            sums[layer, 1] += (top == targets).sum().item()
            sums[layer, 2] += (final_probs * (final - logprobs)).sum().item()
            if index == 0:
                torch.softmax(lens[0], dim=-1).max(dim=-1)
        seconds += time.perf_counter() - started
        tokens += targets.numel()
    means = sums / tokens
    return seconds, {f"{layer}.{name}": means[layer, i].item()
                     for layer in range(loaded.n_layers) for i, name in enumerate(("ce", "top1_accuracy", "kl_to_final"))}
